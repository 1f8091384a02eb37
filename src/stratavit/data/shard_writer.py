"""Write tar shards from an ImageFolder (``stratavit shard``); the layout is in :mod:`stratavit.data.shard_format`."""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import tarfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from stratavit.data.datasets import NAMED_DATASETS, ImageFolderDataset, build_dataset
from stratavit.data.errors import DataError

log = logging.getLogger(__name__)

from stratavit.data.shard_format import (
    DECODE_ERRORS,
    DEFAULT_SHARD_SIZE,
    FORMAT,
    FORMAT_EXT,
    INDEX,
    SHARD_NAME,
    VERSION,
    is_shard_dir,
)

# ------------------------------------------------------------------------------------------ writing


def _check_image(item: tuple[str, int]) -> tuple[str, int, bytes | None, str]:
    """Read and decode one source image: ``(path, label, bytes to store or None, extension or error)``."""
    path, label = item
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
            img.draft("RGB", (1, 1))  # JPEG: decode at 1/8 scale (all data is still read and checked)
            img.load()
            if fmt in FORMAT_EXT:
                return path, label, data, FORMAT_EXT[fmt]
            buf = io.BytesIO()
            with Image.open(io.BytesIO(data)) as full:
                full.convert("RGB").save(buf, format="PNG")
            return path, label, buf.getvalue(), "png"
    except DECODE_ERRORS as e:
        return path, label, None, f"{type(e).__name__}: {e}"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0  # the same images give byte-identical shards
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, samples: Sequence[tuple[str, bytes, str, int]]) -> None:
    """Write ``(key, image bytes, extension, label)`` samples to ``path`` atomically (tmp + fsync + rename)."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for key, data, ext, label in samples:
                    _add(tar, f"{key}.{ext}", data)
                    _add(tar, f"{key}.cls", str(int(label)).encode("ascii"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _checked_source(src: str | Path, out: Path, overwrite: bool) -> ImageFolderDataset:
    """The ImageFolder to shard, after every check of ``src`` and ``out``; raises :class:`DataError`."""
    src_str = str(src)
    if src_str.partition(":")[0] in NAMED_DATASETS and not Path(src_str).exists():
        raise DataError(f"{src}: `stratavit shard` reads an ImageFolder directory; export {src} as one first")
    if is_shard_dir(src_str):
        raise DataError(f"{src} is already a shard folder; pass the ImageFolder it was written from")
    ds = build_dataset(src_str)
    if not isinstance(ds, ImageFolderDataset):
        raise DataError(f"{src}: `stratavit shard` reads an ImageFolder directory (root/<class>/<image>) or cifar10-sample")
    if out.resolve() == ds.root.resolve() or ds.root.resolve() in out.resolve().parents:
        raise DataError(f"--out {out} lies inside the source folder {ds.root}; choose a folder outside it")
    if out.is_dir() and any(p.name != INDEX and not p.name.startswith("shard-") for p in out.iterdir()):
        raise DataError(f"--out {out} holds other files than shards; choose an empty or new folder")
    if out.exists() and (out / INDEX).exists() and not overwrite:
        raise DataError(f"{out} already holds shards ({INDEX}); pass --overwrite to replace them or choose another --out")
    return ds


def _write_all(
    checked: Iterator[tuple[str, int, bytes | None, str]], total: int, out: Path, shard_size: int, progress: bool
) -> tuple[list[str], list[int], list[str]]:
    """Cut the checked samples, in order, into shards of ``shard_size``; returns (names, counts, skipped)."""
    width = max(8, len(str(total)))
    names: list[str] = []
    counts: list[int] = []
    skipped: list[str] = []
    pending: list[tuple[str, bytes, str, int]] = []
    written = 0

    def flush() -> None:
        name = SHARD_NAME.format(len(names))
        _write_shard(out / name, pending)
        names.append(name)
        counts.append(len(pending))
        pending.clear()

    for path, label, data, ext in tqdm(checked, total=total, desc=f"shards -> {out}", unit="img", disable=not progress):
        if data is None:
            skipped.append(path)
            log.warning("skipping unreadable image %s (%s)", path, ext)
            continue
        pending.append((f"{written:0{width}d}", data, ext, label))
        written += 1
        if len(pending) == shard_size:
            flush()
    if pending:
        flush()
    return names, counts, skipped


def write_shards(
    src: str | Path,
    out_dir: str | Path,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    seed: int = 0,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write an ImageFolder (or ``cifar10-sample[:test]``) as tar shards; returns a summary.

    Labels and class names are those :func:`stratavit.data.datasets.build_dataset` gives the same
    folder. Samples are shuffled (``seed``) before being cut into shards of ``shard_size``; each
    shard is written atomically and ``index.json`` last, so a folder with an ``index.json`` is
    complete. Unreadable images are skipped and listed (``summary["skipped"]``, ``index.json``).

    Args:
        workers: processes that read and check the images (default: up to 8 CPU cores; 0: none).
        overwrite: replace the shards of an existing shard folder (otherwise a :class:`DataError`).

    Returns:
        ``{"out", "shards", "total", "classes", "skipped", "seconds"}``.
    """
    if shard_size < 1:
        raise DataError(f"shard_size={shard_size}: give at least 1 sample per shard")
    out = Path(out_dir).expanduser()
    ds = _checked_source(src, out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)  # until the new index is written, the folder reads as unfinished

    started = time.time()
    order = np.random.default_rng(seed).permutation(len(ds.samples))
    items = [ds.samples[i] for i in order]
    n_workers = min(8, os.cpu_count() or 1) if workers is None else workers
    pool = None
    if n_workers > 1 and len(items) > 64:
        pool = multiprocessing.get_context().Pool(n_workers)
        checked: Iterator[tuple[str, int, bytes | None, str]] = pool.imap(_check_image, items, chunksize=32)
    else:
        checked = map(_check_image, items)
    try:
        names, counts, skipped = _write_all(checked, len(items), out, shard_size, progress)
    finally:
        if pool is not None:
            pool.terminate()
    if not names:
        raise DataError(f"none of the {len(items)} images in {ds.root} could be read; nothing written")
    keep = set(names)
    for stale in out.glob("shard-*.tar"):  # left by an earlier, larger shard set (--overwrite)
        if stale.name not in keep:
            stale.unlink()
    written = sum(counts)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "source": str(ds.root),
        "seed": seed,
        "shard_size": shard_size,
        "total": written,
        "classes": list(ds.classes),
        "shards": [{"name": n, "count": c} for n, c in zip(names, counts)],
        "skipped": skipped,
    }
    tmp = out / f"{INDEX}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, out / INDEX)
    return {
        "out": str(out),
        "shards": len(names),
        "total": written,
        "classes": list(ds.classes),
        "skipped": skipped,
        "seconds": round(time.time() - started, 2),
    }
