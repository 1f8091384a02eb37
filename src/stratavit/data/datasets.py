"""Image data sets: ImageFolder directories, torchvision's named sets, the shipped CIFAR-10 sample.

Every data set here yields ``(transform(PIL image), label)``; :class:`Indexed` adds the index.
Unreadable images are skipped (the next readable one is returned), counted and reported.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset
from torchvision import datasets as tvd
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes

from stratavit.data.errors import DataError
from stratavit.data.sampling import sample_seed, seeded_rng
from stratavit.data.shard_format import is_shard_dir
from stratavit.data.shards import ShardMapDataset

log = logging.getLogger(__name__)

NAMED_DATASETS = ("cifar10", "cifar100", "stl10")
SAMPLE_NAME = "cifar10-sample"
"""``--data cifar10-sample`` (or ``cifar10-sample:test``) reads the sample shipped in the package."""
HORSES_SAMPLE = "horses-sample"
"""``--dense-train horses-sample:train --dense-val horses-sample:val``: the shipped Weizmann Horses sample."""


def cache_dir() -> Path:
    """Where stratavit unpacks and downloads data: ``$STRATAVIT_CACHE`` or ~/.cache/stratavit."""
    return Path(os.environ.get("STRATAVIT_CACHE", Path.home() / ".cache" / "stratavit"))


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` (labels = sorted class folders) or a flat folder of images (label 0).

    Unreadable or truncated images are skipped: the next readable image is returned instead, and
    the path is recorded in :attr:`bad_files` (per process) and logged once.
    """

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], Any] | None = None) -> None:
        root = Path(root).expanduser()
        if not root.exists():
            raise DataError(f"data folder {root} does not exist; pass an ImageFolder directory or one of {NAMED_DATASETS}")
        if not root.is_dir():
            raise DataError(f"{root} is not a directory; pass an ImageFolder directory (root/<class>/<image>.jpg)")
        self.root = root
        self.transform = transform
        subdirs = [d for d in os.scandir(root) if d.is_dir()]
        self.samples: list[tuple[str, int]] = []
        if subdirs:
            self.classes, class_to_idx = find_classes(str(root))
            for cls in self.classes:
                folder = root / cls
                for dirpath, _, files in sorted(os.walk(folder, followlinks=True)):
                    for f in sorted(files):
                        if _is_image(f):
                            self.samples.append((os.path.join(dirpath, f), class_to_idx[cls]))
        else:
            self.classes = [root.name]
            self.samples = [(str(root / f), 0) for f in sorted(os.listdir(root)) if _is_image(f)]
        if not self.samples:
            raise DataError(
                f"no images found in {root} (looked for {', '.join(IMG_EXTENSIONS)} files in "
                f"root/<class>/ folders or directly in root)"
            )
        self.targets = [t for _, t in self.samples]
        self.bad_files: list[str] = []
        self.skip_log: Path | None = None
        """If set, every unreadable path is also appended to this file (works from loader workers)."""

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, int]:
        """Return the PIL image and label at ``index``, skipping forward past unreadable files."""
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                with open(path, "rb") as fh:
                    img = Image.open(fh)
                    img.load()
                return img.convert("RGB"), label
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
                if path not in self.bad_files:
                    self.bad_files.append(path)
                    log.warning("skipping unreadable image %s (%s)", path, e)
                    if self.skip_log is not None:
                        with open(self.skip_log, "a") as fh:  # one short line: an atomic append
                            fh.write(path + "\n")
        raise DataError(f"none of the {len(self.samples)} images in {self.root} could be read")

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img, label = self.load(index)
        return (self.transform(img) if self.transform else img), label


class Indexed(Dataset):
    """Wraps a data set so that items become ``(x, label, index)``.

    With ``seed``, a key may also be ``(epoch, index)`` (what
    :class:`~stratavit.data.sampling.ResumableSampler` yields): the item is then made with torch's and
    Python's RNGs seeded from ``(seed, epoch, index)``, so a sample's random augmentation is the
    same in any loader worker, on any rank, and after a restart.
    """

    def __init__(self, base: Dataset, seed: int | None = None) -> None:
        self.base = base
        self.seed = seed

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int, int]:
        if isinstance(key, tuple):
            if self.seed is None:
                raise TypeError("Indexed got an (epoch, index) key but no seed; pass Indexed(base, seed=...)")
            epoch, index = key
            with seeded_rng(sample_seed(self.seed, epoch, index)):
                x, y = self.base[index]
            return x, y, index
        x, y = self.base[key]
        return x, y, key


def sample_archive(name: str = "cifar10_sample") -> Path:
    """Path of a sample archive shipped inside the package (``assets/<name>.tar.gz``)."""
    return Path(str(resources.files("stratavit") / "assets" / f"{name}.tar.gz"))


def sample_dir(name: str = "cifar10_sample") -> Path:
    """Unpack a shipped sample once (to the cache) and return its folder.

    ``cifar10_sample`` holds ``train/<class>/*.jpg`` and ``test/<class>/*.jpg``;
    ``horses_sample`` holds ``{train,val}/{images,masks}/`` (the dense-probe layout).
    """
    archive = sample_archive(name)
    target = cache_dir() / f"{name}-{archive.stat().st_size}"
    done = target / ".complete"
    if not done.exists():
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        done.touch()
    return target


def segmentation_root(spec: str | Path) -> Path:
    """An ``images/`` + ``masks/`` folder, or ``horses-sample:{train,val}`` (shipped, unpacked on first use)."""
    name, _, split = str(spec).partition(":")
    if name == HORSES_SAMPLE and not Path(spec).exists():
        if split not in ("train", "val"):
            raise DataError(f"{spec}: use {HORSES_SAMPLE}:train or {HORSES_SAMPLE}:val")
        return sample_dir("horses_sample") / split
    return Path(spec)


def _named(name: str, split: str, root: str | None, transform: Any) -> Dataset:
    root_path = Path(root).expanduser() if root else cache_dir() / "torchvision"
    train = split == "train"
    try:
        if name == "cifar10":
            return tvd.CIFAR10(str(root_path), train=train, transform=transform, download=True)
        if name == "cifar100":
            return tvd.CIFAR100(str(root_path), train=train, transform=transform, download=True)
        if name == "stl10":
            stl_split = ("train+unlabeled" if train else "test") if split != "labeled" else "train"
            return tvd.STL10(str(root_path), split=stl_split, transform=transform, download=True)
    except (OSError, RuntimeError) as e:
        raise DataError(
            f"could not download or read {name} into {root_path} ({e}); without internet, pass an "
            f"ImageFolder directory instead"
        ) from None
    raise DataError(f"unknown named data set {name!r}; choose one of {NAMED_DATASETS}")


def build_dataset(
    spec: str,
    *,
    split: str = "train",
    transform: Callable[[Image.Image], Any] | None = None,
    root: str | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Open a data set that yields ``(transform(img), label)``.

    Args:
        spec: an ImageFolder directory, a named set (``cifar10``, ``cifar100``, ``stl10``; append
            ``:test`` for the test split), ``cifar10-sample[:test]`` for the shipped sample, or a
            shard folder (:mod:`stratavit.data.shards`, read by random access).
        split: ``train`` or ``test`` for named sets (``spec``'s ``:split`` suffix wins).
        limit: keep a fixed random subset of this many images (seeded by ``seed``).
    """
    name, _, suffix = spec.partition(":")
    if suffix and name in NAMED_DATASETS + (SAMPLE_NAME,):
        split = suffix
    if name == SAMPLE_NAME:
        ds: Dataset = ImageFolderDataset(sample_dir() / ("test" if split == "test" else "train"), transform)
    elif name in NAMED_DATASETS and not Path(spec).exists():
        ds = _named(name, split, root, transform)
    else:

        if is_shard_dir(spec):  # tar shards (`stratavit shard`): their first `limit` samples are a random subset
            return ShardMapDataset(spec, transform, limit=limit)
        ds = ImageFolderDataset(spec, transform)
    if limit is not None and limit < len(ds):  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(ds), generator=g)[:limit].sort().values.tolist()  # type: ignore[arg-type]
        ds = Subset(ds, idx)
    return ds


def dataset_targets(ds: Dataset) -> list[int] | None:
    """Labels of a data set built by :func:`build_dataset`, without loading images (None if unknown)."""
    if isinstance(ds, Subset):
        inner = dataset_targets(ds.dataset)
        return None if inner is None else [inner[i] for i in ds.indices]
    targets = getattr(ds, "targets", None) or getattr(ds, "labels", None)
    return [int(t) for t in targets] if targets is not None else None


def _base(ds: Dataset) -> Dataset:
    while isinstance(ds, (Subset, Indexed)):
        ds = ds.dataset if isinstance(ds, Subset) else ds.base
    return ds


def image_sizes(ds: Dataset, n: int = 32, seed: int = 0) -> list[tuple[int, int]]:
    """``(width, height)`` of up to ``n`` random images of ``ds``, read from file headers only.

    Works for ImageFolder data sets and torchvision's in-memory sets (``.data`` arrays, e.g.
    CIFAR); returns ``[]`` where sizes are not known without decoding.
    """
    indices = list(ds.indices) if isinstance(ds, Subset) else None
    base = _base(ds)
    total = len(base.samples) if isinstance(base, ImageFolderDataset) else len(getattr(base, "data", []))
    pool = indices if indices is not None else range(total)
    if not len(pool):
        return []
    g = torch.Generator().manual_seed(seed)
    picks = [pool[int(i)] for i in torch.randperm(len(pool), generator=g)[:n]]
    if isinstance(base, ImageFolderDataset):
        sizes = []
        for i in picks:
            try:
                with Image.open(base.samples[i][0]) as im:
                    sizes.append(im.size)
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
                continue  # unreadable: skipped and counted when training reads it
        return sizes
    data = getattr(base, "data", None)
    if data is not None and getattr(data, "ndim", 0) == 4:  # (N, H, W, C) or (N, C, H, W)
        h, w = (data.shape[1], data.shape[2]) if data.shape[-1] in (1, 3) else (data.shape[2], data.shape[3])
        return [(int(w), int(h))] * len(picks)
    return []


def suggest_view_sizes(smallest_side: int, crop: int, multiple: int = 1,
                       local_size: int | None = None) -> tuple[int, int | None] | None:
    """View sizes that fit images whose smallest side is ``smallest_side`` px.

    Returns ``(global_size, local_size)``: the largest multiple of ``multiple`` (the patch size)
    ``<= smallest_side``, and, when ``local_size`` is given (local crops exist), the local size
    scaled by the same factor, rounded down to a multiple, at least one patch and ``<=`` the new
    global size (so ``local_size == global_size`` stays equal). ``local_size`` in the result is
    None when none was given; the result is None when not even one patch fits.
    """
    new_global = smallest_side // multiple * multiple
    if new_global < 1:
        return None
    if local_size is None:
        return new_global, None
    scaled = local_size * new_global // crop // multiple * multiple
    return new_global, min(new_global, max(multiple, scaled))


def check_image_sizes(
    ds: Dataset,
    crop: int,
    name: str,
    allow_upsampling: bool,
    multiple: int = 1,
    local_size: int | None = None,
    resize: int | None = None,
) -> None:
    """Raise :class:`DataError` when most images are smaller than the ``crop`` (views.global_size).

    A random crop of an image smaller than the view is enlarged, so the view holds less detail than
    its size suggests (CIFAR's 32 px at 224). That is refused unless ``allow_upsampling``.

    Args:
        multiple: the patch size; the suggested view sizes are multiples of it.
        local_size: views.local_size when there are local crops (None: no local crops); a local
            size is then suggested alongside the global one.
        resize: views.resize. The crops are then cut from the resized image, but resizing adds no
            detail, so the source images are still what is compared; the message says so.
    """
    sizes = image_sizes(ds)
    if allow_upsampling or not sizes:
        return
    small = [s for s in sizes if min(s) < crop]
    if len(small) * 2 <= len(sizes):
        return
    w, h = min(small, key=min)
    smallest = min(min(s) for s in sizes)
    head = (
        f"{len(small)} of {len(sizes)} sampled images in {name} are smaller than views.global_size={crop} "
        f"(e.g. {w}x{h}), so every crop would be enlarged"
    )
    if resize is not None:
        head += (
            f" (views.resize={resize} is set: crops are cut from the {resize}x{resize} resized image, but "
            "resizing adds no detail, so the source images' sizes are what counts)"
        )
    fit = suggest_view_sizes(smallest, crop, multiple, local_size)
    if fit is None:
        raise DataError(
            f"{head}; the smallest images ({smallest} px a side) are smaller than one patch "
            f"(backbone.patch_size={multiple}), so no view size fits them: pass data.allow_upsampling=true "
            "to train on enlarged crops, or lower backbone.patch_size"
        )
    new_global, new_local = fit
    example = f"views.global_size={new_global}" + (f" views.local_size={new_local}" if new_local is not None else "")
    patch = f" (multiples of backbone.patch_size={multiple})" if multiple > 1 else ""
    raise DataError(
        f"{head}: set views.global_size (and views.local_size) to the images' size or less{patch}, e.g. "
        f"{example}, or pass data.allow_upsampling=true to train on enlarged crops"
    )


def bad_files(ds: Dataset) -> list[str]:
    """Unreadable files met while reading ``ds``: those logged to its skip log by any process
    (loader workers included), else those this process met (see :class:`ImageFolderDataset`)."""
    base = _base(ds)
    log_path = getattr(base, "skip_log", None)
    found = list(getattr(base, "bad_files", []))
    if log_path is not None and Path(log_path).exists():
        found += Path(log_path).read_text().splitlines()
    return sorted(set(found))


def set_skip_log(ds: Dataset, path: Path) -> None:
    """Make the ImageFolder (or shard set) behind ``ds`` append unreadable paths to ``path``."""
    base = _base(ds)
    if isinstance(base, ImageFolderDataset) or hasattr(base, "skip_log"):
        base.skip_log = Path(path)
