"""Frozen-feature extraction for evaluation (kNN / linear probes).

Two extractors are provided:

* :func:`extract_block_features` -- the CLS token of *every* transformer block
  of a timm ``VisionTransformer`` (each passed through the model's final norm),
  so that per-layer probes can be run from a single forward pass.
* :func:`raw_pixel_features` -- the flattened input images, the trivial
  "raw pixels" baseline.

Both optionally cache their result on disk (``torch.save`` of a dict of
tensors, written atomically) so that repeated evaluations are cheap.
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

__all__ = ["extract_block_features", "raw_pixel_features"]


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
def _progress(iterable: Iterable, desc: str, total: int) -> Iterator:
    """tqdm wrapper that is quiet-ish (rare refreshes) when stderr is not a terminal."""
    stream = sys.stderr
    try:
        is_tty = bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced / closed streams
        is_tty = False
    return iter(
        tqdm(
            iterable,
            desc=desc,
            total=total,
            file=stream,
            dynamic_ncols=is_tty,
            mininterval=0.5 if is_tty else 30.0,
            leave=True,
        )
    )


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
def extract_block_features(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    desc: str = "features",
    cache_path: Path | None = None,
) -> tuple[Tensor, Tensor]:
    """CLS token of every transformer block, post final norm, for a whole dataset.

    Args:
        model: a timm ``VisionTransformer`` (any model exposing timm's
            ``forward_intermediates`` with prefix tokens). It is moved to
            ``device`` in place; its train/eval mode is restored afterwards.
        dataset: yields ``(image (3, H, W) float, label int)``; it is iterated
            in order (no shuffling), so ``feats[:, i]`` belongs to ``dataset[i]``.
        batch_size, num_workers: DataLoader settings.
        device: where the forward passes run.
        desc: label of the tqdm progress bar (written to stderr).
        cache_path: if given and the file exists (and holds ``len(dataset)``
            samples) the features are loaded from it instead of being computed;
            otherwise they are computed and saved there atomically.

    Returns:
        ``feats``: float32 ``(L, N, C)`` on CPU -- ``L`` = number of blocks,
        ``N`` = ``len(dataset)``, ``C`` = embed dim; ``feats[l]`` is the CLS
        token after block ``l + 1`` passed through the model's final norm
        (so ``feats[-1]`` equals ``model.forward_features(x)[:, 0]``).
        ``labels``: int64 ``(N,)`` on CPU.

        Models without a class token (``model.cls_token is None``) fall back
        to the mean of the (normed) patch tokens.
    """
    n = len(dataset)  # type: ignore[arg-type]
    cached = _load_cache(cache_path, n)
    if cached is not None:
        return cached

    dev = torch.device(device)
    has_cls = getattr(model, "cls_token", None) is not None
    was_training = model.training
    model.to(dev)
    model.eval()

    feats: Tensor | None = None
    labels = torch.empty(n, dtype=torch.int64)
    loader = _loader(dataset, batch_size, num_workers, dev)
    start = 0
    try:
        with torch.inference_mode():
            for images, targets in _progress(loader, desc, total=len(loader)):
                images = images.to(dev, non_blocking=True).float()
                outs = model.forward_intermediates(
                    images,
                    indices=None,
                    norm=True,
                    return_prefix_tokens=True,
                    output_fmt="NLC",
                    intermediates_only=True,
                )
                per_block = []
                for out in outs:
                    # (spatial (B, P, C), prefix (B, T, C)) or just spatial if no prefix tokens
                    spatial, prefix = out if isinstance(out, (tuple, list)) else (out, None)
                    # timm puts the class token first among the prefix tokens
                    per_block.append(prefix[:, 0] if has_cls and prefix is not None else spatial.mean(1))
                batch = torch.stack(per_block, 0).float().cpu()  # (L, B, C)
                bsz = batch.shape[1]
                if feats is None:
                    feats = torch.empty(batch.shape[0], n, batch.shape[2], dtype=torch.float32)
                feats[:, start : start + bsz] = batch
                labels[start : start + bsz] = _as_labels(targets)
                start += bsz
    finally:
        model.train(was_training)

    if feats is None:
        raise ValueError("extract_block_features: the dataset is empty")
    if start != n:
        raise RuntimeError(f"dataset yielded {start} samples but len(dataset) == {n}")
    _save_cache(cache_path, feats, labels)
    return feats, labels


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
    for images, targets in _progress(loader, desc, total=len(loader)):
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
