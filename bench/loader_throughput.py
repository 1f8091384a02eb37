"""Training-loader throughput: an ImageFolder vs tar shards (stratavit.data.shards) of the same images.

    .venv/bin/python bench/loader_throughput.py                      # 2,000 CIFAR-10 train JPEGs
    .venv/bin/python bench/loader_throughput.py --src DIR --images 5000 --workers 0 2 4 --reps 5

Copies ``--images`` images (the same number per class) of the ImageFolder ``--src`` into a work
folder, writes them as shards (``--shard-size``), then times, for each row and each
``num_workers``, the loader ``stratavit pretrain`` builds for that folder
(``train.build_train_loader``: the recipe's full MultiCropTransform, ``collate_views``):

* ``decode``: no transform, just reading and decoding the images (the I/O part alone);
* ``mocov3``: two 224-px global views per image;
* ``dino``: two 224-px global views + eight 96-px local views per image.

The main process runs with ``--threads`` torch threads (default 1, as in loader workers).
Each measurement builds a fresh loader, takes one warm-up batch (worker start, first reads), then
times ``--batches`` batches. Folder and shard measurements alternate and repeat ``--reps`` times
(the median is printed with the spread), so load from other processes hits both alike; the
``shards / folder`` ratio is the number to compare across machines.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from stratavit.data.datasets import ImageFolderDataset
from stratavit.data.shard_writer import write_shards
from stratavit.data.shards import ShardDataset
from stratavit.engine.train import build_train_loader
from stratavit.recipe import resolve_config

DEFAULT_SRC = Path.home() / ".cache" / "stratavit-tests" / "cifar10" / "train"


def subset(src: Path, dst: Path, images: int) -> int:
    """Copy ``images`` images (equal per class, sorted names) of ImageFolder ``src`` into ``dst``."""
    classes = sorted(p.name for p in src.iterdir() if p.is_dir())
    per = max(1, images // len(classes))
    n = 0
    for cls in classes:
        (dst / cls).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / cls).iterdir())[:per]:
            shutil.copy(f, dst / cls / f.name)
            n += 1
    return n


def loader_for(row: str, data: Path, workers: int, batch_size: int, shards: bool) -> DataLoader:
    if row == "decode":
        ds: Any = ShardDataset(data, batch_size=batch_size) if shards else ImageFolderDataset(data)
        return DataLoader(ds, batch_size=batch_size, shuffle=not shards, drop_last=True, num_workers=workers,
                          collate_fn=len, persistent_workers=workers > 0)
    cfg = resolve_config(row, [f"data.path={data}", f"data.batch_size={batch_size}", f"data.num_workers={workers}"])
    return build_train_loader(cfg, patch_size=16)


def measure(loader: DataLoader, batches: int, batch_size: int) -> float:
    """Images per second over ``batches`` batches after one warm-up batch."""
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch_size / (time.perf_counter() - start)
    del it
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=DEFAULT_SRC, help="ImageFolder to take the images from")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--shard-size", type=int, default=500)
    ap.add_argument("--rows", nargs="+", default=["decode", "mocov3", "dino"])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=6, help="timed batches per measurement")
    ap.add_argument("--decode-batches", type=int, default=40, help="timed batches per 'decode' measurement")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary one, removed at the end)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the main process (workers=0 runs the transforms there; default 1: "
                         "on a loaded machine more threads mostly measure contention)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    work = args.work or Path(tempfile.mkdtemp(prefix="loader-bench-"))
    try:
        folder, shard_dir = work / "folder", work / "shards"
        if not folder.exists():
            n = subset(args.src, folder, args.images)
        else:
            n = len(ImageFolderDataset(folder))
        if not (shard_dir / "index.json").exists():
            summary = write_shards(folder, shard_dir, shard_size=args.shard_size, progress=False)
            print(f"wrote {summary['total']} images in {summary['shards']} shards in {summary['seconds']} s")
        print(f"{n} images from {args.src}; batch {args.batch_size}; torch threads {torch.get_num_threads()}; "
              f"{args.reps} interleaved repetitions")
        results: dict[tuple[str, int, str], list[float]] = {}
        for rep in range(args.reps):
            for row in args.rows:
                batches = args.decode_batches if row == "decode" else args.batches
                for workers in args.workers:
                    order = [("folder", folder), ("shards", shard_dir)]
                    for kind, data in order if rep % 2 == 0 else order[::-1]:
                        loader = loader_for(row, data, workers, args.batch_size, kind == "shards")
                        rate = measure(loader, batches, args.batch_size)
                        del loader
                        results.setdefault((row, workers, kind), []).append(rate)
                        print(f"  rep {rep} {row:<7} workers={workers} {kind:<6} {rate:9.1f} img/s", flush=True)

        print("\n| row | workers | folder img/s | shards img/s | shards / folder |")
        print("|---|---:|---:|---:|---:|")
        for row in args.rows:
            for workers in args.workers:
                f, s = results[(row, workers, "folder")], results[(row, workers, "shards")]
                ratios = [b / a for a, b in zip(f, s)]
                print(f"| {row} | {workers} | {statistics.median(f):.0f} ({min(f):.0f}–{max(f):.0f}) "
                      f"| {statistics.median(s):.0f} ({min(s):.0f}–{max(s):.0f}) "
                      f"| {statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}) |")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
