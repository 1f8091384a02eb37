"""Frozen-feature extraction for evaluation (kNN / linear probes).

Two extractors are provided:

* :func:`extract_block_features` -- the CLS token and the mean patch token of
  *every* transformer block of a timm ``VisionTransformer`` (each passed through
  the model's final norm), so that per-layer probes run from a single forward
  pass; stored in a disk-backed, memory-mapped cache for large data sets. A timm
  CNN gives the global average pool of every feature stage instead (its stages
  are its blocks, see :mod:`stratavit.evaluation.tokens`).
* :func:`raw_pixel_features` -- the flattened input images, the trivial
  "raw pixels" baseline.

Both optionally cache their result on disk (written atomically) so that
repeated evaluations are cheap.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from stratavit.evaluation.progress import progress
from stratavit.evaluation.store import StoreWriter, open_arrays, read_meta, to_tensors
from stratavit.evaluation.tokens import block_dims, block_tokens

__all__ = ["BlockFeatures", "extract_block_features", "raw_pixel_features"]


# --------------------------------------------------------------------------- #
# cache helpers
# --------------------------------------------------------------------------- #
def _load_cache(cache_path: Path | None, expected_n: int) -> tuple[Tensor, Tensor] | None:
    """Return ``(feats, labels)`` from ``cache_path`` if it exists and matches ``expected_n``."""
    if cache_path is None or not Path(cache_path).is_file():
        return None
    blob = torch.load(Path(cache_path), map_location="cpu", weights_only=True)
    feats, labels = blob["feats"], blob["labels"]
    if labels.shape[0] != expected_n:
        warnings.warn(
            f"feature cache {cache_path} holds {labels.shape[0]} samples but the dataset has "
            f"{expected_n}; recomputing",
            stacklevel=3,
        )
        return None
    return feats, labels


def _save_cache(cache_path: Path | None, feats: Tensor, labels: Tensor) -> None:
    """Atomically write ``{"feats": feats, "labels": labels}`` to ``cache_path``."""
    if cache_path is None:
        return
    cache_path = Path(cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=cache_path.name + ".", suffix=".tmp", dir=cache_path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"feats": feats.contiguous(), "labels": labels.contiguous()}, fh)
        os.replace(tmp, cache_path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- #
# loading helpers
# --------------------------------------------------------------------------- #
def _loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def _as_labels(y: Tensor | Iterable[int]) -> Tensor:
    return torch.as_tensor(y).reshape(-1).to(torch.int64)


# --------------------------------------------------------------------------- #
# public API
# --------------------------------------------------------------------------- #
@dataclass
class BlockFeatures:
    """Pooled features of every transformer block for a whole data set.

    Attributes:
        cls: ``(L, N, C)`` float32 -- CLS token after block ``l + 1``, through the final norm
            (models without a class token: the mean patch token; a CNN: the global average
            pool of stage ``l + 1``).
        patch: ``(L, N, C)`` float32 -- mean of the normed patch tokens after block ``l + 1``.
        labels: ``(N,)`` int64.

    When the blocks differ in width (a CNN's stages: 64, 128, 256, 512 channels for a ResNet-18)
    ``cls`` and ``patch`` are lists of ``L`` tensors ``(N, C_l)`` instead; both forms index the
    same way (``cls[l]`` is ``(N, C_l)``, ``len(cls) == L``).

    With a cache folder the two feature tensors are views of disk-backed ``np.memmap`` arrays, so
    only the rows a probe touches (one block at a time) are paged into memory.
    """

    cls: Tensor | list[Tensor]
    patch: Tensor | list[Tensor]
    labels: Tensor

    def pooled(self, pooling: str) -> Tensor | list[Tensor]:
        """``(L, N, C)`` features (or ``L`` tensors ``(N, C_l)``) for ``pooling`` in ``{"cls", "mean_patch"}``."""
        if pooling == "cls":
            return self.cls
        if pooling == "mean_patch":
            return self.patch
        raise ValueError(f"pooling must be 'cls' or 'mean_patch', not {pooling!r}")


_FILES = ("cls.f32", "patch.f32")


def _open_store(cache_dir: Path, expected_n: int) -> BlockFeatures | None:
    """Memory-map a complete feature store written by :func:`extract_block_features`, if it matches."""
    meta = read_meta(cache_dir)
    if meta is None:
        return None
    if int(meta["n"]) != expected_n:
        warnings.warn(
            f"feature cache {cache_dir} holds {meta['n']} samples but the dataset has {expected_n}; recomputing",
            stacklevel=3,
        )
        return None
    layers, n = int(meta["layers"]), int(meta["n"])
    dims = [int(d) for d in meta.get("dims") or [meta["dim"]] * layers]
    labels = torch.from_numpy(np.fromfile(cache_dir / "labels.i64", dtype=np.int64).copy())
    if len(set(dims)) == 1:  # one (L, N, C) array per file
        cls, patch = (to_tensors(open_arrays(cache_dir, f, np.float32, [(layers, n, dims[0])]))[0] for f in _FILES)
        return BlockFeatures(cls, patch, labels)
    cls_l, patch_l = (to_tensors(open_arrays(cache_dir, f, np.float32, [(n, d) for d in dims])) for f in _FILES)
    return BlockFeatures(cls_l, patch_l, labels)


def extract_block_features(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    desc: str = "features",
    cache_dir: Path | None = None,
) -> BlockFeatures:
    """CLS and mean-patch features of every transformer block, one forward pass per batch.

    Args:
        model: a timm ``VisionTransformer`` or CNN (anything with timm's ``forward_intermediates``,
            see :func:`~stratavit.evaluation.tokens.block_tokens`). It is moved to ``device`` in
            place; its train/eval mode is restored afterwards.
        dataset: yields ``(image (3, H, W) float, label int)``; iterated in order (no shuffling),
            so row ``i`` belongs to ``dataset[i]``.
        batch_size, num_workers: DataLoader settings.
        device: where the forward passes run.
        desc: label of the progress bar (stderr).
        cache_dir: folder of a disk-backed feature store (:mod:`stratavit.evaluation.store`). If it
            holds a complete store for ``len(dataset)`` samples it is memory-mapped instead of
            recomputed; otherwise the features are streamed batch by batch into a new store
            (memory stays bounded by one batch), which replaces the folder atomically when
            complete. ``None``: in memory.

    Returns:
        :class:`BlockFeatures` with ``cls`` / ``patch`` ``(L, N, C)`` float32 and ``labels`` ``(N,)``;
        ``cls[-1]`` equals ``model.forward_features(x)[:, 0]``. A timm CNN: one entry per feature
        stage, ``cls[l]`` = ``patch[l]`` = its global average pool ``(N, C_l)`` (a list when the
        stages differ in width); ``cls[-1]`` equals ``model(x)`` of a ``num_classes=0`` model.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("extract_block_features: the dataset is empty")
    if cache_dir is not None:
        cached = _open_store(Path(cache_dir), n)
        if cached is not None:
            return cached
    dev = torch.device(device)
    was_training = model.training
    model.to(dev)
    model.eval()
    dims = block_dims(model)
    uniform = len(set(dims)) == 1
    try:
        with StoreWriter(cache_dir) as store:
            if uniform:  # one (L, N, C) array per file
                cls_out, patch_out = (store.array(f, np.float32, (len(dims), n, dims[0])) for f in _FILES)
            else:  # ragged: L consecutive (N, C_l) arrays per file
                cls_out, patch_out = (store.arrays(f, np.float32, [(n, d) for d in dims]) for f in _FILES)
            labels = _fill(model, dataset, cls_out, patch_out, batch_size, num_workers, dev, desc)
            if cache_dir is None:
                as_tensor = torch.from_numpy if uniform else lambda a: [torch.from_numpy(x) for x in a]
                return BlockFeatures(as_tensor(cls_out), as_tensor(patch_out), torch.from_numpy(labels))
            labels.tofile(store.tmp / "labels.i64")  # type: ignore[operator]
            del cls_out, patch_out
            store.commit({"layers": len(dims), "n": n, "dim": dims[0]} if uniform
                         else {"layers": len(dims), "n": n, "dims": dims})
    finally:
        model.train(was_training)
    opened = _open_store(Path(cache_dir), n)
    assert opened is not None
    return opened


def _fill(
    model: nn.Module, dataset: Dataset, cls_out: Any, patch_out: Any, batch_size: int, num_workers: int,
    dev: torch.device, desc: str,
) -> np.ndarray:
    """One forward pass over ``dataset``: pooled tokens of every block into ``cls_out`` / ``patch_out``."""
    n = len(dataset)  # type: ignore[arg-type]
    labels = np.empty(n, dtype=np.int64)
    loader = _loader(dataset, batch_size, num_workers, dev)
    start = 0
    with torch.inference_mode():
        for images, targets in progress(loader, desc, total=len(loader)):
            blocks = block_tokens(model, images.to(dev, non_blocking=True).float())
            bsz = images.shape[0]
            for i, b in enumerate(blocks):
                patch = b.mean_patch
                cls_out[i][start : start + bsz] = (b.cls if b.cls is not None else patch).cpu().numpy()
                patch_out[i][start : start + bsz] = patch.cpu().numpy()
            labels[start : start + bsz] = _as_labels(targets).numpy()
            start += bsz
    if start != n:
        raise RuntimeError(f"dataset yielded {start} samples but len(dataset) == {n}")
    return labels


def raw_pixel_features(
    dataset: Dataset,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    desc: str = "raw pixels",
    cache_path: Path | None = None,
) -> tuple[Tensor, Tensor]:
    """Flattened input images, for the raw-pixel kNN / linear baselines.

    Args:
        dataset: yields ``(image (3, H, W) float, label int)``; images are used
            exactly as the dataset's transform produces them (already resized
            and normalised).
        batch_size, num_workers: DataLoader settings.
        desc: tqdm progress-bar label.
        cache_path: optional on-disk cache, same semantics as in
            :func:`extract_block_features`.

    Returns:
        ``feats``: float32 ``(N, 3*H*W)`` on CPU; ``labels``: int64 ``(N,)``.
    """
    n = len(dataset)  # type: ignore[arg-type]
    cached = _load_cache(cache_path, n)
    if cached is not None:
        return cached

    loader = _loader(dataset, batch_size, num_workers, torch.device("cpu"))
    feats: Tensor | None = None
    labels = torch.empty(n, dtype=torch.int64)
    start = 0
    for images, targets in progress(loader, desc, total=len(loader)):
        flat = images.reshape(images.shape[0], -1).float()
        if feats is None:
            feats = torch.empty(n, flat.shape[1], dtype=torch.float32)
        feats[start : start + flat.shape[0]] = flat
        labels[start : start + flat.shape[0]] = _as_labels(targets)
        start += flat.shape[0]

    if feats is None:
        raise ValueError("raw_pixel_features: the dataset is empty")
    if start != n:
        raise RuntimeError(f"dataset yielded {start} samples but len(dataset) == {n}")
    _save_cache(cache_path, feats, labels)
    return feats, labels
