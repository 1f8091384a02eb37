"""Tar shards in the WebDataset layout: write them from an ImageFolder, stream them for training.

A shard folder::

    SHARDS/shard-000000.tar   per sample, consecutive: KEY.jpg (or .png, .webp, ...) and KEY.cls
    SHARDS/shard-000001.tar
    ...
    SHARDS/index.json         written last: shard names, samples per shard, total, class names

* **Samples.** ``KEY`` is the sample's *global index* (zero-padded): its position in the shard set,
  shard after shard. ``KEY.cls`` holds the label as ASCII digits. The image keeps the source
  file's original bytes (no re-encoding, no quality loss); its extension is the decoded format's
  (``jpg`` for JPEG files whatever their name, ``png``, ``webp``, ``bmp``, ``gif``, ``tiff``,
  ``ppm``); an image in any other format is re-encoded as lossless PNG. Every image is decoded once
  while writing (JPEGs at reduced scale, which still reads all their data): unreadable ones are
  skipped, counted and listed in ``index.json``.
* **Order.** The writer shuffles the samples with a seed before cutting shards, so every shard is a
  random draw of the classes (a class folder never ends up in one shard), and the first ``N``
  global indices are a random subset of size ``N`` (how ``data.limit`` works on shards).
* **Reading.** :class:`ShardDataset` streams ``(transform(img), label[, index])`` for training,
  split across processes and loader workers (see its docstring for the exact rule);
  :class:`ShardMapDataset` reads any sample by its global index (the E-step of clustering recipes,
  evaluation).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import tarfile
import time
import warnings
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torchvision.datasets.folder import IMG_EXTENSIONS

from stratavit import distributed
from stratavit.datasets import NAMED_DATASETS, DataError, ImageFolderDataset, build_dataset
from stratavit.sampling import sample_seed, seeded_rng

if TYPE_CHECKING:
    from stratavit.config import Config

log = logging.getLogger(__name__)

INDEX = "index.json"
FORMAT = "stratavit-shards"
VERSION = 1
SHARD_NAME = "shard-{:06d}.tar"
DEFAULT_SHARD_SIZE = 1000
"""Samples per shard: ~100 MB of ImageNet-sized JPEGs, ~2 MB of CIFAR."""
DEFAULT_SHUFFLE_BUFFER = 1000
"""Undecoded samples each loader worker holds to shuffle (≈ 110 MB per worker for ImageNet JPEGs)."""

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "pnm")
_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif",
               "TIFF": "tiff", "PPM": "ppm"}
_DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, KeyError, EOFError, Image.DecompressionBombError)
_TAR_ERRORS = (OSError, tarfile.TarError, EOFError, ValueError)


# ------------------------------------------------------------------------------------------ index


@dataclass(frozen=True)
class ShardIndex:
    """The contents of ``index.json``: which shards, how many samples each, the class names."""

    root: Path
    shards: tuple[str, ...]
    counts: tuple[int, ...]
    classes: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    offsets: tuple[int, ...] = field(init=False)
    """Global index of each shard's first sample (len(shards) + 1 entries; the last is the total)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "offsets", tuple(accumulate(self.counts, initial=0)))

    @property
    def total(self) -> int:
        return self.offsets[-1]

    def path(self, shard: int) -> Path:
        return self.root / self.shards[shard]

    def locate(self, index: int) -> tuple[int, int]:
        """Global index -> (shard, position inside the shard)."""
        s = bisect_right(self.offsets, index) - 1
        return s, index - self.offsets[s]


def is_shard_dir(path: str | Path) -> bool:
    """True for a folder that looks like shards: ``index.json`` or ``.tar`` files, no sub-folders, no images.

    (An ImageFolder has class sub-folders or images; a shard folder, complete or not, has neither.)
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        return False
    found = False
    with os.scandir(p) as it:
        for e in it:
            if e.is_dir() or e.name.lower().endswith(IMG_EXTENSIONS):
                return False
            found = found or e.name == INDEX or e.name.endswith(".tar")
    return found


def read_index(root: str | Path) -> ShardIndex:
    """Read and check ``root/index.json``; :class:`DataError` says what is wrong and what to do."""
    root = Path(root).expanduser()
    redo = f"write the shards again with `stratavit shard SRC --out {root} --overwrite`"
    if not root.is_dir():
        raise DataError(f"shard folder {root} does not exist or is not a folder; write one with `stratavit shard SRC --out {root}`")
    index_path = root / INDEX
    if not index_path.is_file():
        tars = sorted(p.name for p in root.glob("*.tar"))
        if not tars:
            raise DataError(f"no shards in {root} (no {INDEX}, no .tar files); write them with `stratavit shard SRC --out {root}`")
        raise DataError(
            f"{root} holds {len(tars)} .tar files but no {INDEX} (written last by `stratavit shard`: without it the "
            f"writing did not finish, or the shards come from another tool); {redo}"
        )
    try:
        meta = json.loads(index_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
        shards = tuple(str(s["name"]) for s in meta["shards"])
        counts = tuple(int(s["count"]) for s in meta["shards"])
        classes = tuple(str(c) for c in meta["classes"])
        total = int(meta["total"])
        skipped = tuple(str(s) for s in meta.get("skipped", []))
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{index_path} is not a valid stratavit shard index ({e}); {redo}") from None
    if sum(counts) != total or any(c < 0 for c in counts):
        raise DataError(f"{index_path}: the shard counts add up to {sum(counts)}, not total={total}; {redo}")
    if total == 0:
        raise DataError(f"{index_path} lists no samples; {redo} from a folder with readable images")
    missing = [s for s in shards if not (root / s).is_file()]
    if missing:
        raise DataError(f"{root}: {len(missing)} shard(s) listed in {INDEX} are missing ({', '.join(missing[:3])}...); {redo}")
    return ShardIndex(root, shards, counts, classes, skipped)


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
            if fmt in _FORMAT_EXT:
                return path, label, data, _FORMAT_EXT[fmt]
            buf = io.BytesIO()
            with Image.open(io.BytesIO(data)) as full:
                full.convert("RGB").save(buf, format="PNG")
            return path, label, buf.getvalue(), "png"
    except _DECODE_ERRORS as e:
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

    Labels and class names are those :func:`stratavit.datasets.build_dataset` gives the same
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
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX).unlink(missing_ok=True)  # until the new index is written, the folder reads as unfinished

    started = time.time()
    order = np.random.default_rng(seed).permutation(len(ds.samples))
    items = [ds.samples[i] for i in order]
    width = max(8, len(str(len(items))))
    n_workers = min(8, os.cpu_count() or 1) if workers is None else workers
    from tqdm.auto import tqdm

    pool = None
    if n_workers > 1 and len(items) > 64:
        import multiprocessing

        pool = multiprocessing.get_context().Pool(n_workers)
        checked: Iterator[tuple[str, int, bytes | None, str]] = pool.imap(_check_image, items, chunksize=32)
    else:
        checked = map(_check_image, items)
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

    try:
        for path, label, data, ext in tqdm(checked, total=len(items), desc=f"shards -> {out}", unit="img", disable=not progress):
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
    finally:
        if pool is not None:
            pool.terminate()
    if not names:
        raise DataError(f"none of the {len(items)} images in {ds.root} could be read; nothing written")
    keep = set(names)
    for stale in out.glob("shard-*.tar"):  # left by an earlier, larger shard set (--overwrite)
        if stale.name not in keep:
            stale.unlink()
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


# ------------------------------------------------------------------------------------------ reading


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the member path up to the first dot of its file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class _NotPlainUstar(Exception):
    """A header :func:`_ustar_members` leaves to :mod:`tarfile` (pax, GNU long names, base-256 sizes)."""


_ZERO_BLOCK = bytes(512)


def _ustar_members(fh: BinaryIO) -> Iterator[tuple[str, int, int]]:
    """``(name, size, data offset)`` of the regular files of a plain ustar/v7 tar, parsed directly.

    About 20x faster than :mod:`tarfile` per member (which matters for small images). The caller
    may read from ``fh`` between items: each header is read at its absolute offset.
    """
    at = 0
    while True:
        fh.seek(at)
        h = fh.read(512)
        if not h or h == _ZERO_BLOCK:
            return
        if len(h) < 512:
            raise tarfile.ReadError("unexpected end of data")
        try:
            checksum = int(h[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
            size = int(h[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            raise _NotPlainUstar from None
        if checksum != sum(h) - sum(h[148:156]) + 256:
            raise tarfile.ReadError(f"bad tar header checksum at byte {at}")
        kind = h[156:157]
        if kind in (b"x", b"g", b"L", b"K"):
            raise _NotPlainUstar
        name = h[:100].split(b"\0", 1)[0]
        if h[257:262] == b"ustar" and h[345] != 0:
            name = h[345:500].split(b"\0", 1)[0] + b"/" + name
        if kind in (b"0", b"\0", b"7"):
            yield name.decode("utf-8", "surrogateescape"), size, at + 512
        at += 512 + ((size + 511) & ~511)


def _members(fh: BinaryIO) -> Iterator[tuple[str, int, int]]:
    """``(name, size, data offset)`` of each regular file of the tar ``fh``, in order.

    Plain ustar headers (what :func:`write_shards` writes) are parsed directly; from the first
    other header on, :mod:`tarfile` takes over. Damaged data raises ``tarfile.ReadError``.
    """
    done = 0
    try:
        for item in _ustar_members(fh):
            yield item
            done += 1
        return
    except _NotPlainUstar:
        pass
    fh.seek(0)
    with tarfile.open(fileobj=fh, mode="r:") as tar:
        files = (m for m in tar if m.isfile())
        for i, m in enumerate(files):
            if i >= done:
                yield m.name, m.size, m.offset_data


def _read_shard(path: Path, start: int, stop: int) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """Samples ``start .. stop-1`` of one shard as ``(position, key, {extension: bytes})``.

    Samples before ``start`` cost only their tar headers (their data is seeked over).
    Tar errors propagate; the caller counts the samples it did not get.
    """
    pos, key, parts = -1, None, {}
    with open(path, "rb") as fh:
        for name, size, offset in _members(fh):
            k, ext = _split_name(name)
            if k != key:
                if key is not None and pos >= start:
                    yield pos, key, parts
                pos, key, parts = pos + 1, k, {}
                if pos >= stop:
                    return
            if pos >= start:
                fh.seek(offset)
                data = fh.read(size)
                if len(data) != size:
                    raise tarfile.ReadError("unexpected end of data")
                parts[ext] = data
    if key is not None and start <= pos < stop:
        yield pos, key, parts


def _decode(parts: dict[str, bytes]) -> tuple[Image.Image, int]:
    """``{extension: bytes}`` of one sample -> (RGB image, label); raises on anything unusable."""
    label = int(parts["cls"].decode("ascii").strip())
    data = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    if data is None:
        raise KeyError(f"no image member (have {sorted(parts)})")
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB"), label


def _plan(counts: Sequence[int], order: Sequence[int], begin: int, end: int) -> list[tuple[int, int, int]]:
    """Positions ``begin .. end-1`` of the shards concatenated in ``order``, as ``(shard, start, stop)``."""
    pieces, at = [], 0
    for s in order:
        lo, hi = max(begin, at), min(end, at + counts[s])
        if lo < hi:
            pieces.append((s, lo - at, hi - at))
        at += counts[s]
        if at >= end:
            break
    return pieces


def _shares(n: int, parts: int, unit: int = 1) -> list[int]:
    """Split ``n`` items into ``parts`` shares of whole ``unit``s, as even as possible (the rest is dropped)."""
    units = n // unit
    return [(units // parts + (i < units % parts)) * unit for i in range(parts)]


class _SkipRecorder:
    """Counts, logs and (with ``skip_log``) records unreadable samples, like ImageFolderDataset."""

    bad_files: list[str]
    skip_log: Path | None

    def _record_bad(self, name: str, error: object) -> None:
        if name in self.bad_files:
            return
        self.bad_files.append(name)
        log.warning("skipping unreadable sample %s (%s)", name, error)
        if self.skip_log is not None:
            with open(self.skip_log, "a") as fh:  # one short line: an atomic append
                fh.write(name + "\n")


class ShardDataset(_SkipRecorder, IterableDataset):
    """Stream ``(transform(img), label)`` — or ``(x, label, index)`` with ``with_index`` — from shards.

    **Who reads what.** Each epoch the shard order is shuffled, seeded by ``(seed, epoch)`` (same on every
    process) and the shards are laid end to end: a sequence of ``n`` samples (``n = total``, or
    ``limit`` if smaller: the first ``limit`` global indices). Process ``rank`` of ``world`` takes
    the contiguous block ``[rank·n/world, (rank+1)·n/world)`` of that sequence, exactly
    ``n // world`` samples; the last ``n % world`` samples of the epoch's order are not read that
    epoch (a different tail every epoch, since the shard order changes). Inside a process the block
    is cut again into contiguous parts for the loader workers. With ``batch_size``, every worker's
    part is a whole number of batches, so with ``DataLoader(drop_last=True)`` each process yields
    exactly ``len(self) // batch_size`` full batches (DDP needs the same number everywhere) and at
    most ``batch_size - 1`` more samples per process go unread. No sample is read twice; blocks may
    start or end inside a shard (the reader skips over the headers before its part), so any number
    of shards works with any ``world × workers``; shards much larger than a worker's part only cost
    that header scan.

    **Shuffling.** Shard order per epoch, then a buffer of ``shuffle_buffer`` undecoded samples per
    worker (seeded by seed, epoch, rank and worker). Call :meth:`set_epoch` before each epoch
    (stratavit's training loader gets it called by Lightning); it reaches persistent loader workers
    through shared memory. Each sample's transform runs under
    :func:`~stratavit.sampling.seeded_rng` ``(sample_seed(seed, epoch, index))``, as in the
    ImageFolder loader, so its views do not depend on the worker or rank that makes them.

    **Resuming.** :meth:`resume` ``(epoch, batches_done)`` makes epoch ``epoch`` skip the batches a
    killed run already trained on (for the loader's round-robin over workers); the skipped samples
    are read (to replay the shuffle buffer) but not decoded.

    **Unreadable samples** (undecodable image, missing member, truncated shard) are skipped,
    counted in :attr:`bad_files` (``shard-000003.tar:KEY``), logged, appended to :attr:`skip_log`
    when set, and replaced by another sample of the same worker's stream (a fresh transform of the
    previous readable image), so the counts above hold.

    Args:
        root: shard folder (with ``index.json``).
        rank, world_size: this process and the number of processes; default: torch.distributed's
            at iteration time (read in the main process, where Lightning has set it up).
        batch_size: the loader's batch size, to cut worker parts into whole batches (see above).
        limit: use only the first ``limit`` global indices (a random subset: the writer shuffled).
        with_index: yield ``(x, label, global index)``, the index being the sample's position in
            the shard set (``KEY``), the same in every epoch.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
        rank: int | None = None,
        world_size: int | None = None,
        batch_size: int | None = None,
        limit: int | None = None,
        with_index: bool = False,
    ) -> None:
        self.index = read_index(root)
        self.root = self.index.root
        self.classes = list(self.index.classes)
        self.transform = transform
        self.seed = seed
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer if shuffle else 0
        self.batch_size = batch_size
        self.with_index = with_index
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither (then torch.distributed's are used)")
        if world_size is not None and not 0 <= int(rank) < int(world_size):  # type: ignore[arg-type]
            raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
        self._fixed = None if rank is None else (int(rank), int(world_size))  # type: ignore[arg-type]
        self._seen: tuple[int, int] | None = None
        n = self.index.total if limit is None else min(int(limit), self.index.total)
        self.num_samples = n
        """Samples in use (``limit`` applied), over all processes."""
        self._counts = [max(0, min(c, n - o)) for c, o in zip(self.index.counts, self.index.offsets)]
        # [epoch, resume epoch (-1: none), batches of it to skip]; shared with (persistent) workers
        self._state = torch.tensor([0, -1, 0], dtype=torch.int64).share_memory_()
        self.bad_files = []
        self.skip_log = None
        """If set, unreadable samples are also appended to this file (works from loader workers)."""

    # -- process layout
    def _rank_world(self) -> tuple[int, int]:
        if self._fixed is not None:
            return self._fixed
        if get_worker_info() is None or self._seen is None:
            # main process (or a forked worker that inherited the process group)
            self._seen = (distributed.rank(), distributed.world_size())
        return self._seen

    def set_epoch(self, epoch: int) -> None:
        """Shuffle for ``epoch`` from the next iteration on (also seen by persistent workers)."""
        self._state[0] = int(epoch)
        self._rank_world()

    @property
    def epoch(self) -> int:
        return int(self._state[0])

    def batches_per_epoch(self) -> int:
        """Loader batches per epoch on each process (``batch_size`` or 1 sample per batch)."""
        return len(self) // (self.batch_size or 1)

    def resume(self, epoch: int, batches_done: int) -> None:
        """Continue a run that stopped after ``batches_done`` batches of ``epoch``.

        Iterations of that epoch (``batches_done`` past its end carries into the next epochs) skip
        its first batches; other epochs are whole. Sets the epoch too (a later :meth:`set_epoch`
        with the same epoch, as Lightning makes, changes nothing).
        """
        if epoch < 0 or batches_done < 0:
            raise ValueError(f"cannot resume at epoch {epoch}, batch {batches_done}")
        extra, batches = divmod(int(batches_done), max(1, self.batches_per_epoch()))
        self._state[0] = int(epoch) + extra
        self._state[1] = int(epoch) + extra
        self._state[2] = batches

    def _batches_done(self, epoch: int) -> int:
        """Batches of ``epoch`` trained on before a restart (see :meth:`resume`), else 0."""
        return int(self._state[2]) if int(self._state[1]) == epoch else 0

    def _skip(self, done_batches: int, per_rank: int, worker: int, workers: int) -> int:
        """Samples of (logical) ``worker``'s stream among the first ``done_batches`` loader batches."""
        if done_batches == 0:
            return 0
        unit = self.batch_size or 1
        batches = [s // unit for s in _shares(per_rank, workers, unit)]
        done, left = [0] * workers, done_batches
        while left > 0 and any(d < b for d, b in zip(done, batches)):
            for w in range(workers):  # the DataLoader takes batches from its workers in turn
                if left > 0 and done[w] < batches[w]:
                    done[w] += 1
                    left -= 1
        return done[worker] * unit

    def __len__(self) -> int:
        """Samples this process yields per epoch: ``n // world`` (rounded down to whole batches)."""
        _, world = self._rank_world()
        return sum(_shares(self.num_samples // world, 1, self.batch_size or 1))

    def worker_plan(self, epoch: int, rank: int, world: int, worker: int, workers: int) -> list[tuple[int, int, int]]:
        """``(shard, start, stop)`` pieces one worker reads in ``epoch`` (pure; for tests and tools)."""
        shards = [s for s, c in enumerate(self._counts) if c > 0]
        if self.shuffle:
            shards = [shards[i] for i in np.random.default_rng([self.seed, epoch]).permutation(len(shards))]
        per_rank = self.num_samples // world
        shares = _shares(per_rank, workers, self.batch_size or 1)
        begin = rank * per_rank + sum(shares[:worker])
        return _plan(self._counts, shards, begin, begin + shares[worker])

    # -- streaming
    def _raw(self, pieces: list[tuple[int, int, int]]) -> Iterator[tuple[str, int, dict[str, bytes] | None, Any]]:
        """``(name, global index, parts or None, error)`` for every position of ``pieces``."""
        for s, start, stop in pieces:
            got, error = 0, None
            try:
                for pos, key, parts in _read_shard(self.index.path(s), start, stop):
                    got += 1
                    yield f"{self.index.shards[s]}:{key}", self.index.offsets[s] + pos, parts, None
            except _TAR_ERRORS as e:
                error = f"unreadable shard: {type(e).__name__}: {e}"
            for pos in range(start + got, stop):
                yield f"{self.index.shards[s]}:#{pos}", self.index.offsets[s] + pos, None, error or "missing from the shard"

    def _buffered(self, items: Iterator[Any], rng: random.Random) -> Iterator[Any]:
        size = self.shuffle_buffer
        if size <= 1:
            yield from items
            return
        buf: list[Any] = []
        for item in items:
            if len(buf) < size:
                buf.append(item)
                continue
            j = rng.randrange(size)
            buf[j], item = item, buf[j]
            yield item
        rng.shuffle(buf)
        yield from buf

    def _item(self, img: Image.Image, label: int, index: int, epoch: int, seed_index: int) -> tuple[Any, ...]:
        """``(transform(img), label[, index])``, the transform's RNG seeded by ``(seed, epoch, seed_index)``.

        ``seed_index`` is ``index``, or for a replacement the index of the unreadable sample it replaces.
        """
        if self.transform is None:
            x: Any = img
        else:
            with seeded_rng(sample_seed(self.seed, epoch, seed_index)):
                x = self.transform(img)
        return (x, label, index) if self.with_index else (x, label)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        rank, world = self._rank_world()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        done = self._batches_done(epoch)
        # The loader takes batches from its workers in turn, starting with worker 0. After ``done``
        # batches the uninterrupted run would take the next one from part ``done % workers``: so
        # worker w reads part (w + done) % workers.
        part = (worker + done) % workers
        pieces = self.worker_plan(epoch, rank, world, part, workers)
        rng = random.Random(f"{self.seed}/{epoch}/{rank}/{part}")
        stream = self._buffered(self._raw(pieces), rng)
        for _ in range(self._skip(done, self.num_samples // world, part, workers)):
            next(stream, None)  # trained on before the restart: read, not decoded
        last: tuple[Image.Image, int, int] | None = None
        owed: list[int] = []  # indices of unreadable samples met before any readable one
        for name, index, parts, error in stream:
            if parts is not None:
                try:
                    img, label = _decode(parts)
                    last = (img, label, index)
                except _DECODE_ERRORS as e:
                    error = f"{type(e).__name__}: {e}"
            if error is not None:
                self._record_bad(name, error)
                if last is None:
                    owed.append(index)  # replaced by the next readable sample
                    continue
            assert last is not None
            for seed_index in [index, *owed]:  # a replacement gets the views of the sample it replaces
                yield self._item(*last, epoch, seed_index)
            owed = []
        if owed:
            expected = sum(stop - start for _, start, stop in pieces)
            raise DataError(f"none of the {expected} samples of {self.root} this loader worker reads could be decoded; see the log")


class ShardMapDataset(_SkipRecorder, Dataset):
    """Random access to a shard folder: item ``i`` is ``(transform(img), label)`` of global index ``i``.

    Each shard's member table (tar headers only) is read on first use and kept per process.
    An unreadable sample is skipped: the next readable one is returned (as ImageFolderDataset does).
    ``limit`` keeps the first ``limit`` global indices (a random subset: the writer shuffled).
    """

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], Any] | None = None, limit: int | None = None) -> None:
        self.index = read_index(root)
        self.root = self.index.root
        self.classes = list(self.index.classes)
        self.transform = transform
        self._n = self.index.total if limit is None else min(int(limit), self.index.total)
        self._tables: dict[int, list[dict[str, tuple[int, int]]]] = {}
        self.bad_files = []
        self.skip_log = None

    def __len__(self) -> int:
        return self._n

    def _table(self, shard: int) -> list[dict[str, tuple[int, int]]]:
        """Per sample of ``shard``: ``{extension: (byte offset, size)}``."""
        if shard not in self._tables:
            table: list[dict[str, tuple[int, int]]] = []
            key = None
            try:
                with open(self.index.path(shard), "rb") as fh:
                    for name, size, offset in _members(fh):
                        k, ext = _split_name(name)
                        if k != key:
                            table.append({})
                            key = k
                        table[-1][ext] = (offset, size)
            except _TAR_ERRORS as e:
                log.warning("shard %s is damaged after %d samples (%s)", self.index.path(shard), len(table), e)
            self._tables[shard] = table
        return self._tables[shard]

    def load(self, index: int) -> tuple[Image.Image, int]:
        """The RGB image and label of global index ``index``, skipping forward past unreadable samples."""
        for offset in range(self._n):
            i = (index + offset) % self._n
            s, pos = self.index.locate(i)
            name = f"{self.index.shards[s]}:#{pos}"
            try:
                table = self._table(s)
                if pos >= len(table):
                    raise KeyError("missing from the shard")
                parts: dict[str, bytes] = {}
                with open(self.index.path(s), "rb") as fh:
                    for ext, (off, size) in table[pos].items():
                        fh.seek(off)
                        parts[ext] = fh.read(size)
                return _decode(parts)
            except _DECODE_ERRORS as e:
                self._record_bad(name, e)
        raise DataError(f"none of the {self._n} samples in {self.root} could be read")

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not 0 <= index < self._n:
            raise IndexError(index)
        img, label = self.load(index)
        return (self.transform(img) if self.transform is not None else img), label


# ------------------------------------------------------------------------------------------ training


def shard_loader(cfg: "Config", transform: Callable[[Image.Image], Any], skip_log: Path | None = None) -> DataLoader:
    """The training loader over the shard folder ``cfg.data.path``: items ``(views, label, index)``.

    Same batches as the ImageFolder loader (``collate_views``, ``drop_last``); the shard order
    follows Lightning's epoch (it calls ``set_epoch`` on the loader's sampler, which forwards it to
    the data set). ``data.limit`` keeps the first ``limit`` global indices.
    """
    from stratavit.views import collate_views

    assert cfg.data.path is not None
    ds = ShardDataset(
        cfg.data.path, transform, seed=cfg.train.seed, limit=cfg.data.limit, batch_size=cfg.data.batch_size, with_index=True
    )
    ds.skip_log = Path(skip_log) if skip_log is not None else None
    world = max(1, int(cfg.train.devices)) * max(1, int(cfg.train.num_nodes))
    if ds.num_samples // world < cfg.data.batch_size:
        raise DataError(
            f"{cfg.data.path} has {ds.num_samples} samples in use, {ds.num_samples // world} per process for {world} "
            f"process(es): fewer than data.batch_size={cfg.data.batch_size}; lower data.batch_size or add images"
        )
    # Our __len__ is exact (whole batches per worker), so Lightning's generic caveat does not apply.
    warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")
    loader = DataLoader(
        ds,
        batch_size=cfg.data.batch_size,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        collate_fn=collate_views,
        persistent_workers=cfg.data.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )
    # An IterableDataset's loader has no sampler of ours: hang the data set's epoch and resume hooks
    # on the one it has (Lightning calls ``sampler.set_epoch`` before every epoch).
    loader.sampler.set_epoch = ds.set_epoch  # type: ignore[union-attr]
    loader.sampler.resume = ds.resume  # type: ignore[union-attr]
    return loader
