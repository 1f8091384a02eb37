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
import tarfile
from bisect import bisect_right
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import BinaryIO, Iterator

from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS

from stratavit.data.errors import DataError

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
FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif",
               "TIFF": "tiff", "PPM": "ppm"}
DECODE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, KeyError, EOFError, Image.DecompressionBombError)
TAR_ERRORS = (OSError, tarfile.TarError, EOFError, ValueError)


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


# ------------------------------------------------------------------------------------------ tar members


def split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the member path up to the first dot of its file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


class NotPlainUstar(Exception):
    """A header :func:`ustar_members` leaves to :mod:`tarfile` (pax, GNU long names, base-256 sizes)."""


ZERO_BLOCK = bytes(512)


def ustartar_members(fh: BinaryIO) -> Iterator[tuple[str, int, int]]:
    """``(name, size, data offset)`` of the regular files of a plain ustar/v7 tar, parsed directly.

    About 20x faster than :mod:`tarfile` per member (which matters for small images). The caller
    may read from ``fh`` between items: each header is read at its absolute offset.
    """
    at = 0
    while True:
        fh.seek(at)
        h = fh.read(512)
        if not h or h == ZERO_BLOCK:
            return
        if len(h) < 512:
            raise tarfile.ReadError("unexpected end of data")
        try:
            checksum = int(h[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
            size = int(h[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            raise NotPlainUstar from None
        if checksum != sum(h) - sum(h[148:156]) + 256:
            raise tarfile.ReadError(f"bad tar header checksum at byte {at}")
        kind = h[156:157]
        if kind in (b"x", b"g", b"L", b"K"):
            raise NotPlainUstar
        name = h[:100].split(b"\0", 1)[0]
        if h[257:262] == b"ustar" and h[345] != 0:
            name = h[345:500].split(b"\0", 1)[0] + b"/" + name
        if kind in (b"0", b"\0", b"7"):
            yield name.decode("utf-8", "surrogateescape"), size, at + 512
        at += 512 + ((size + 511) & ~511)


def tar_members(fh: BinaryIO) -> Iterator[tuple[str, int, int]]:
    """``(name, size, data offset)`` of each regular file of the tar ``fh``, in order.

    Plain ustar headers (what :func:`write_shards` writes) are parsed directly; from the first
    other header on, :mod:`tarfile` takes over. Damaged data raises ``tarfile.ReadError``.
    """
    done = 0
    try:
        for item in ustartar_members(fh):
            yield item
            done += 1
        return
    except NotPlainUstar:
        pass
    fh.seek(0)
    with tarfile.open(fileobj=fh, mode="r:") as tar:
        files = (m for m in tar if m.isfile())
        for i, m in enumerate(files):
            if i >= done:
                yield m.name, m.size, m.offset_data


def read_shard(path: Path, start: int, stop: int) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """Samples ``start .. stop-1`` of one shard as ``(position, key, {extension: bytes})``.

    Samples before ``start`` cost only their tar headers (their data is seeked over).
    Tar errors propagate; the caller counts the samples it did not get.
    """
    pos, key, parts = -1, None, {}
    with open(path, "rb") as fh:
        for name, size, offset in tar_members(fh):
            k, ext = split_name(name)
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


def decode_sample(parts: dict[str, bytes]) -> tuple[Image.Image, int]:
    """``{extension: bytes}`` of one sample -> (RGB image, label); raises on anything unusable."""
    label = int(parts["cls"].decode("ascii").strip())
    data = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
    if data is None:
        raise KeyError(f"no image member (have {sorted(parts)})")
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB"), label
