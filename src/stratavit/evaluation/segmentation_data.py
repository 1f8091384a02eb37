"""Segmentation data for the dense probe: image / mask folders, mask checks, guarded loaders.

Layout (any data set, any image size, any number of classes)::

    ROOT/images/<stem>.<jpg|jpeg|png|bmp|webp>
    ROOT/masks/<stem>.png        single-channel class ids (PNG mode L, P, I, 1), 255 = ignore

Every bad input raises :class:`~stratavit.evaluation.errors.EvaluationError` with a message that
names the file or value at fault and what to do -- also from DataLoader worker processes
(:func:`guarded_batches`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from stratavit.data.views import describe_resize, eval_transform
from stratavit.evaluation.errors import EvaluationError
from stratavit.evaluation.progress import progress

__all__ = [
    "IGNORE_INDEX",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MaskSummary",
    "SegmentationFolder",
    "guarded_batches",
    "scan_masks",
]

IGNORE_INDEX = 255
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MASK_EXTENSION = ".png"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- #

# --------------------------------------------------------------------------- #
# data
# --------------------------------------------------------------------------- #
def _read_mask(path: Path) -> np.ndarray:
    """The class-id array ``(H, W)`` of a mask file (palette indices for mode P, never colours)."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.array(img)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
        raise EvaluationError(f"cannot read mask {path}: {e}; replace or remove the file") from None
    if arr.ndim != 2:
        raise EvaluationError(
            f"mask {path} has {arr.shape[-1] if arr.ndim == 3 else arr.ndim} channels (PNG mode {mode}); masks "
            "must be single-channel class ids (PNG mode L or P, 255 = ignore): convert colour masks to ids first"
        )
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise EvaluationError(
            f"mask {path} holds {arr.dtype} values (PNG mode {mode}); masks must be integer class ids"
        )
    if arr.size and int(arr.min()) < 0:
        raise EvaluationError(f"mask {path} holds the negative class id {int(arr.min())}; ids must be >= 0")
    return arr


def _read_image(path: Path) -> Image.Image:
    """The RGB image at ``path``, fully decoded."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except Exception as e:
        raise EvaluationError(f"cannot read image {path}: {e}; replace or remove the file") from None


def _image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image from its header (no decoding)."""
    try:
        with Image.open(path) as img:
            return img.size
    except Exception as e:
        raise EvaluationError(f"cannot read image {path}: {e}; replace or remove the file") from None


class _OriginalMasks(Sequence):
    """Lazy sequence of the original-resolution masks ``(H_i, W_i)`` int64 of a folder."""

    def __init__(self, folder: SegmentationFolder) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> Tensor:  # type: ignore[override]
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.folder.original_mask(i)


class SegmentationFolder(Dataset):
    """Image / mask pairs of ``root/images`` and ``root/masks``, matched by file stem.

    Images: ``<stem>.{jpg,jpeg,png,bmp,webp}`` (any case), converted to RGB. Masks: ``<stem>.png``,
    read with ``np.array(Image.open(...))`` -- palette (mode P) masks give their indices -- as
    integer class ids, ``255`` = ignore; a mask must have its image's size. Masks without an image
    are ignored; an image without a mask is an error.

    Resize policy: the image is stretched to ``size x size`` (bilinear, antialiased; aspect ratio
    not kept, nothing cropped), its mask is resized to ``size x size`` with nearest neighbour.
    Evaluation uses :meth:`original_mask` instead, at the mask's own resolution.

    Args:
        root: the folder holding ``images/`` and ``masks/``.
        size: side ``S`` of the network input.
        mean, std: per-channel normalisation of the RGB values in ``[0, 1]``.
        limit: keep only the first ``limit`` pairs (sorted by stem); ``None``: all.
        max_images: then keep a fixed random subset of this many pairs (seeded by ``seed``, in stem
            order); ``None``: all. :attr:`total` counts the pairs before either cut.

    Items: ``(image (3, S, S) float32 normalised, mask (S, S) int64, index int)``.

    Raises:
        EvaluationError: ``images/`` or ``masks/`` missing, no image/mask pair, images without a
            mask, two images with the same stem; unreadable files when an item is read.
    """

    def __init__(
        self,
        root: str | Path,
        size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        *,
        limit: int | None = None,
        max_images: int | None = None,
        seed: int = 0,
    ) -> None:
        self.root = Path(root)
        self.size = int(size)
        if self.size < 1:
            raise EvaluationError(f"dense probe image size must be positive, not {size}")
        image_dir, mask_dir = self.root / "images", self.root / "masks"
        for folder in (self.root, image_dir, mask_dir):
            if not folder.is_dir():
                raise EvaluationError(
                    f"{folder} is not a folder: a segmentation data set needs {self.root}/images/<stem>.jpg|png|... "
                    f"and {self.root}/masks/<stem>.png (class ids, 255 = ignore)"
                )
        images: dict[str, Path] = {}
        for p in sorted(image_dir.iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
                if p.stem in images:
                    raise EvaluationError(
                        f"two images share the stem {p.stem!r} in {image_dir}: {images[p.stem].name} and {p.name}; "
                        "keep one (masks are matched to images by stem)"
                    )
                images[p.stem] = p
        masks = {
            p.stem: p for p in sorted(mask_dir.iterdir()) if p.is_file() and p.suffix.lower() == MASK_EXTENSION
        }
        missing = sorted(stem for stem in images if stem not in masks)
        if missing:
            shown = ", ".join(images[s].name for s in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise EvaluationError(
                f"{len(missing)} image(s) in {image_dir} have no mask in {mask_dir}: {shown}; add <stem>.png masks "
                "or remove those images"
            )
        stems = sorted(images)
        if not stems:
            raise EvaluationError(
                f"no image/mask pairs in {self.root}: images/ holds no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} "
                f"files ({len(masks)} png masks found)"
            )
        self.total = len(stems)
        if limit is not None:
            if limit < 1:
                raise EvaluationError(f"limit must be positive, not {limit}")
            stems = stems[:limit]
        if max_images is not None and max_images < len(stems):
            if max_images < 1:
                raise EvaluationError(f"dense.max_images must be positive, not {max_images}")
            g = torch.Generator().manual_seed(int(seed))
            stems = [stems[i] for i in torch.randperm(len(stems), generator=g)[:max_images].sort().values.tolist()]
        self.stems = stems
        self.image_paths = [images[s] for s in stems]
        self.mask_paths = [masks[s] for s in stems]
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.transform = eval_transform(self.size, self.mean, self.std, "stretch")

    @property
    def resize_policy(self) -> str:
        """Human-readable resize policy, recorded with the results."""
        return (
            f"{describe_resize(self.size, 'stretch')}; masks nearest-neighbour for training, "
            "scored at their original resolution"
        )

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        """``(image (3, S, S) float32, mask (S, S) int64, i)``."""
        image = _read_image(self.image_paths[i])
        mask = self.checked_mask(i, image.size)
        resized = F.interpolate(
            torch.from_numpy(mask.astype(np.float32))[None, None], size=(self.size, self.size), mode="nearest-exact"
        )[0, 0]
        return self.transform(image), resized.to(torch.int64), i

    def checked_mask(self, i: int, image_wh: tuple[int, int]) -> np.ndarray:
        mask = _read_mask(self.mask_paths[i])
        if (mask.shape[1], mask.shape[0]) != tuple(image_wh):
            raise EvaluationError(
                f"mask {self.mask_paths[i]} is {mask.shape[1]}x{mask.shape[0]} but image {self.image_paths[i]} is "
                f"{image_wh[0]}x{image_wh[1]} (width x height); a mask must have its image's size"
            )
        return mask

    def original_mask(self, i: int) -> Tensor:
        """Mask ``i`` at its own resolution: ``(H, W)`` int64."""
        return torch.from_numpy(_read_mask(self.mask_paths[i]).astype(np.int64))

    def original_masks(self) -> Sequence[Tensor]:
        """All masks at their own resolution, as a lazy sequence (each read from disk on access)."""
        return _OriginalMasks(self)

    def identity(self) -> str:
        """Short fingerprint of the pairs used (names and file sizes, not times): the same data on
        another machine has the same identity (recorded in ``results.json`` for ``compare``)."""
        h = hashlib.sha1()
        for a, b in zip(self.image_paths, self.mask_paths):
            for p in (a, b):
                h.update(f"{p.name}:{p.stat().st_size};".encode())
        return h.hexdigest()[:16]

    def digest(self) -> str:
        """Fingerprint of the pairs (names, sizes, modification times), for feature caches."""
        h = hashlib.sha1()
        for a, b in zip(self.image_paths, self.mask_paths):
            for p in (a, b):
                st = p.stat()
                h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()


# --------------------------------------------------------------------------- #
# loaders that carry EvaluationErrors out of worker processes as one-line messages
# --------------------------------------------------------------------------- #
@dataclass
class _Failure:
    message: str


class _Guarded(Dataset):
    """Runs ``fn(i)``; an EvaluationError becomes a :class:`_Failure` item instead of a worker crash."""

    def __init__(self, n: int, fn: Any) -> None:
        self.n, self.fn = n, fn

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        try:
            return self.fn(i)
        except EvaluationError as e:
            return _Failure(str(e))


def _collate(items: list[Any]) -> Any:
    for item in items:
        if isinstance(item, _Failure):
            return item
    return default_collate(items)


def guarded_batches(n: int, fn: Any, *, batch_size: int, num_workers: int, desc: str, pin: bool = False) -> Iterator[Any]:
    """Ordered, collated batches of ``fn(0..n-1)`` with a progress bar; re-raises item errors."""
    loader = DataLoader(
        _Guarded(n, fn),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=pin,
    )
    for batch in progress(loader, desc, total=len(loader)):
        if isinstance(batch, _Failure):
            raise EvaluationError(batch.message)
        yield batch


@dataclass
class MaskSummary:
    """What a scan of a folder's original masks found."""

    max_id: int  # largest class id other than the ignore index (-1: none)
    max_file: Path | None
    labelled: int  # pixels that are not ignore


class _ScanItem:
    """``i -> (largest non-ignored id or -1, labelled pixels)`` of mask ``i``; checks its size (picklable)."""

    def __init__(self, ds: SegmentationFolder, ignore_index: int) -> None:
        self.ds, self.ignore_index = ds, ignore_index

    def __call__(self, i: int) -> tuple[int, int]:
        mask = self.ds.checked_mask(i, _image_size(self.ds.image_paths[i]))
        valid = mask[mask != self.ignore_index]
        return (int(valid.max()) if valid.size else -1), int(valid.size)


def scan_masks(ds: SegmentationFolder, *, num_workers: int, desc: str, ignore_index: int) -> MaskSummary:
    """Read every original mask once: largest class id, labelled pixels; checks image/mask sizes."""
    max_id, max_file, labelled = -1, None, 0
    start = 0
    scan = _ScanItem(ds, ignore_index)
    for ids, counts in guarded_batches(len(ds), scan, batch_size=32, num_workers=num_workers, desc=desc):
        for j, (m, c) in enumerate(zip(ids.tolist(), counts.tolist())):
            if m > max_id:
                max_id, max_file = m, ds.mask_paths[start + j]
            labelled += c
        start += len(ids)
    return MaskSummary(max_id, max_file, labelled)
