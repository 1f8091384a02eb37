"""Views per loader core: DINO's multi-crop views (2 x 224 + 8 x 96) on the Weizmann horses.

    .venv/bin/python bench/views_speed.py                       # 5 rounds of 50 images per mode
    .venv/bin/python bench/views_speed.py --images 100 --rounds 7 --batch 64

What a loader worker does per image (one torch thread, as in a worker): open and decode the JPEG,
then the ``dino`` recipe's ``MultiCropTransform`` under the sample's seed (as
``stratavit.data.datasets.Indexed`` runs it). Modes:

* ``before``: the loader path with the blur stratavit used before issue 15 (torchvision's
  ``GaussianBlur``, kernel 0.1 x size: 23 px at 224, 11 at 96, on PIL images);
* ``after``: the loader path as now (PIL's ``GaussianBlur(radius=σ)``, the authors' blur);
* ``device``: ``views.photometric=device``, the loader part only (decode, crop, resize, flip,
  uint8); ``decode``: opening and decoding alone, for reference.

The modes alternate within each round (the machine's load hits them alike); the median round is
reported, with ratios to ``before``. Then the device part of ``device`` (``DevicePhotometric``:
jitter, grayscale, blur, solarize, normalise of a collated batch of ``--batch`` images x 10
views) is timed on the CPU, with one thread and with all threads: on a GPU it runs in the
training step instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from PIL import Image

from stratavit.data.photometric import DevicePhotometric, photometric_seed
from stratavit.data.sampling import sample_seed, seeded_rng
from stratavit.data.views import MultiCropTransform, collate_views, torchvision_blur
from stratavit.recipe import resolve_config

HORSES = Path.home() / ".cache" / "stratavit-tests" / "weizmann-horses" / "train" / "images"
MODES = ("before", "after", "device", "decode")


def transforms(patch_size: int = 16) -> dict[str, object]:
    views = resolve_config("dino").views
    return {
        "before": MultiCropTransform(views, patch_size, blur=torchvision_blur),
        "after": MultiCropTransform(views, patch_size),
        "device": MultiCropTransform(dataclasses.replace(views, photometric="device"), patch_size),
        "decode": None,
    }


def per_image(transform: object, files: list[Path], seed: int) -> float:
    """Images per second: decode + ``transform`` of every file under its sample seed."""
    start = time.perf_counter()
    for i, f in enumerate(files):
        with Image.open(f) as im:
            img = im.convert("RGB")
        if transform is not None:
            with seeded_rng(sample_seed(seed, 0, i)):
                transform(img)  # type: ignore[operator]
    return len(files) / (time.perf_counter() - start)


def device_ops(files: list[Path], batch: int, threads: int, reps: int) -> float:
    """Images per second (each 10 views) of ``DevicePhotometric`` on a collated CPU batch."""
    views = dataclasses.replace(resolve_config("dino").views, photometric="device")
    tf = MultiCropTransform(views, 16)
    samples = []
    for i in range(batch):
        with Image.open(files[i % len(files)]) as im:
            with seeded_rng(sample_seed(0, 0, i)):
                samples.append((tf(im.convert("RGB")), 0, i))
    mvb = collate_views(samples)
    finish = DevicePhotometric(views)
    torch.set_num_threads(threads)
    finish(mvb, seed=photometric_seed(0, 0, 0, 0))  # warm-up
    times = []
    for r in range(reps):
        start = time.perf_counter()
        finish(mvb, seed=photometric_seed(0, 0, r + 1, 0))
        times.append(time.perf_counter() - start)
    torch.set_num_threads(1)
    return batch / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=HORSES, help="folder of images (default: the horses' train images)")
    ap.add_argument("--images", type=int, default=50, help="images per mode per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32, help="batch size of the device-ops timing")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of the device-ops timing")
    args = ap.parse_args()
    files = sorted(p for p in args.src.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"no images in {args.src}")
    torch.set_num_threads(1)
    tfs = transforms()
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        chunk = [files[(r * args.images + i) % len(files)] for i in range(args.images)]
        order = MODES[r % len(MODES):] + MODES[: r % len(MODES)]  # rotate who goes first
        for mode in order:
            rates[mode].append(per_image(tfs[mode], chunk, seed=r))
        print(f"round {r + 1}: " + ", ".join(f"{m} {rates[m][-1]:.1f}" for m in MODES), flush=True)
    med = {m: statistics.median(v) for m, v in rates.items()}
    cores = torch.get_num_threads()  # 1: per loader core
    print(f"\nmachine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores "
          f"available; torch {torch.__version__}; {cores} torch thread per loader core")
    print(f"DINO views (2 x 224 + 8 x 96) on {args.src} ({args.images} images x {args.rounds} rounds, median round)\n")
    print("| loader mode | images/s per core | ms per image | vs before |")
    print("|---|---|---|---|")
    for m in MODES:
        print(f"| {m} | {med[m]:.1f} | {1000 / med[m]:.1f} | {med[m] / med['before']:.1f}x |")
    one = device_ops(files, args.batch, 1, args.reps)
    full = device_ops(files, args.batch, max(1, len(os.sched_getaffinity(0))), args.reps)
    print(f"\ndevice ops on the CPU (DevicePhotometric, batch {args.batch} x 10 views): "
          f"{one:.1f} images/s on 1 thread, {full:.1f} on all threads")


if __name__ == "__main__":
    main()
