"""The dense probe's head: a linear 1x1 classifier of frozen patch tokens, its training and its scores.

Per block, a linear classifier on per-channel standardised tokens (train mean / std) is trained
with pixel-wise cross-entropy on its logits upsampled bilinearly to ``S x S``
(:func:`train_dense_head`, by the shared trainer of :mod:`stratavit.evaluation.linear_head`); on the
validation split the logits are upsampled bilinearly to each mask's *original* resolution,
arg-maxed and accumulated into one confusion matrix (:func:`evaluate_dense_head`), from which mIoU
and pixel accuracy follow (:func:`segmentation_scores`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stratavit.evaluation.errors import EvaluationError
from stratavit.evaluation.linear_head import train_linear_head
from stratavit.evaluation.segmentation_data import IGNORE_INDEX

__all__ = [
    "DEFAULT_HEAD_BATCH",
    "DEFAULT_LR",
    "DEFAULT_STEPS",
    "DEFAULT_WEIGHT_DECAY",
    "DenseLinearHead",
    "LOSS_PIXELS_PER_TOKEN",
    "auto_epochs",
    "confusion_matrix",
    "loss_side",
    "evaluate_dense_head",
    "segmentation_scores",
    "train_dense_head",
]

# Defaults of the head (see dense_probe's docstring for the measurements behind them).
DEFAULT_STEPS = 400  # epochs=None: as many epochs as it takes to reach this many optimiser steps
DEFAULT_LR = 1e-2
DEFAULT_HEAD_BATCH = 16
DEFAULT_WEIGHT_DECAY = 1e-3
LOSS_PIXELS_PER_TOKEN = 4  # default loss resolution: at most 4 x 4 mask pixels per token (see loss_side)



# --------------------------------------------------------------------------- #
# metrics
# --------------------------------------------------------------------------- #
def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Pixel confusion matrix ``(K, K)`` int64: rows = target class, columns = predicted class.

    Args:
        pred: predicted class ids, any shape, integer.
        target: true class ids, same shape as ``pred``; pixels equal to ``ignore_index`` are skipped.
        num_classes: ``K``.

    Raises:
        EvaluationError: shapes differ, or a (non-ignored) id lies outside ``0..K-1``.
    """
    if pred.shape != target.shape:
        raise EvaluationError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    k = int(num_classes)
    valid = target != ignore_index
    t = target[valid].to(torch.int64)
    p = pred[valid].to(torch.int64)
    if t.numel():
        for name, v in (("mask", t), ("prediction", p)):
            lo, hi = int(v.min()), int(v.max())
            if lo < 0 or hi >= k:
                bad = hi if hi >= k else lo
                raise EvaluationError(
                    f"{name} holds class id {bad} but num_classes is {k} (ids 0..{k - 1}, {ignore_index} = ignore); "
                    f"raise num_classes above {bad} or fix the masks"
                )
    return torch.bincount(t * k + p, minlength=k * k).reshape(k, k).cpu()


def segmentation_scores(conf: Tensor) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU (percent) from a ``(K, K)`` confusion matrix.

    Convention: IoU_c = TP / (TP + FP + FN). The mean runs over the classes that occur in the
    target *or* the prediction (TP + FP + FN > 0); a class absent from both has no defined IoU,
    is excluded from the mean and reported as ``None``. Pixel accuracy = trace / total (ignored
    pixels are not in the matrix). With an empty matrix both scores are NaN.

    Returns:
        ``{"miou": float, "pixel_acc": float, "per_class_iou": [float | None] * K}``.
    """
    conf = conf.to(torch.float64)
    tp = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - tp
    present = union > 0
    iou = torch.where(present, 100.0 * tp / union.clamp_min(1), torch.zeros_like(tp))
    total = float(conf.sum())
    return {
        "miou": float(iou[present].mean()) if bool(present.any()) else float("nan"),
        "pixel_acc": 100.0 * float(tp.sum()) / total if total > 0 else float("nan"),
        "per_class_iou": [float(v) if ok else None for v, ok in zip(iou.tolist(), present.tolist())],
    }


# --------------------------------------------------------------------------- #
# the head
# --------------------------------------------------------------------------- #
class DenseLinearHead(nn.Module):
    """Per-channel standardisation followed by a linear (1x1) classifier of each patch token.

    ``forward(feats (B, gh, gw, C), size=None)`` -> logits ``(B, K, gh, gw)``, or, with
    ``size=(H, W)``, bilinearly upsampled logits ``(B, K, H, W)`` (``align_corners=False``).
    """

    def __init__(self, mean: Tensor, std: Tensor, num_classes: int) -> None:
        super().__init__()
        dim = mean.numel()
        self.register_buffer("mean", mean.reshape(dim).float().clone())
        self.register_buffer("std", std.reshape(dim).float().clone())
        self.linear = nn.Linear(dim, int(num_classes))

    @property
    def num_classes(self) -> int:
        return self.linear.out_features

    def forward(self, feats: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        x = (feats.float() - self.mean) / self.std
        logits = self.linear(x).permute(0, 3, 1, 2)
        if size is not None and tuple(size) != tuple(logits.shape[-2:]):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits


FeatureArray = Tensor | np.ndarray


def _rows(array: FeatureArray, idx: Tensor) -> Tensor:
    """Rows ``idx`` (sorted, CPU int64) of a tensor or (memory-mapped) numpy array, as a CPU tensor."""
    if isinstance(array, Tensor):
        return array[idx.to(array.device)]
    return torch.from_numpy(np.ascontiguousarray(array[idx.numpy()]))


def _chunks(n: int, row_elems: int, budget: int = 1 << 24) -> Iterator[Tensor]:
    step = max(1, budget // max(1, row_elems))
    for i in range(0, n, step):
        yield torch.arange(i, min(n, i + step))


def _channel_stats(feats: FeatureArray) -> tuple[Tensor, Tensor]:
    """Per-channel mean / std ``(C,)`` over all ``N * gh * gw`` tokens, read in chunks (float64 sums)."""
    n, c = feats.shape[0], feats.shape[-1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    count = 0
    for idx in _chunks(n, int(np.prod(feats.shape[1:]))):
        x = _rows(feats, idx).to(torch.float64).reshape(-1, c)
        s += x.sum(0)
        s2 += (x * x).sum(0)
        count += x.shape[0]
    mean = s / count
    std = (s2 / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


def _check_feats(feats: FeatureArray, name: str) -> None:
    if len(feats.shape) != 4:
        raise EvaluationError(f"{name} must be (N, gh, gw, C) patch features, not shape {tuple(feats.shape)}")
    if feats.shape[0] == 0:
        raise EvaluationError(f"{name} is empty (no images)")


def auto_epochs(num_images: int, batch_size: int = DEFAULT_HEAD_BATCH, steps: int = DEFAULT_STEPS) -> int:
    """Fewest epochs of ``ceil(num_images / batch_size)`` steps that reach ``steps`` steps (at least 1)."""
    per_epoch = max(1, math.ceil(num_images / max(1, batch_size)))
    return max(1, math.ceil(steps / per_epoch))


def loss_side(size: int, grid: int, loss_size: int | None = None) -> int:
    """Side of the masks the head's training loss is computed at: ``loss_size`` if given (at most
    ``size``), else ``size`` capped at :data:`LOSS_PIXELS_PER_TOKEN` pixels per token of a ``grid``-wide
    token map (ViT-S/16 at 224 px: 56).

    The head's logits live on the token grid and reach the loss by bilinear upsampling, so finer
    targets add cost (``S^2 K`` per image and step), not information: on Weizmann horses at 224 px
    (random-init ViT-S/16, blocks 4 and 12) the loss at 224, 112 and 56 px gave val mIoU 58.60 /
    60.43, 58.59 / 60.44 and 58.63 / 60.46. The head of block 12 trained in 24 s at 56 px instead of
    52 s at 224 px (horses, 2 classes), 80 s instead of 242 s on 367 images of 11 classes (2 shared
    CPU cores). Scores are always computed at each mask's own resolution.
    """
    side = int(loss_size) if loss_size is not None else LOSS_PIXELS_PER_TOKEN * int(grid)
    return max(1, min(int(size), side))


def _check_mask_ids(masks: FeatureArray, num_classes: int, ignore_index: int) -> None:
    """Every non-ignored id of ``masks`` ``(N, S, S)`` lies in ``0..num_classes-1``, and some pixel is labelled."""
    labelled = 0
    for idx in _chunks(masks.shape[0], int(np.prod(masks.shape[1:]))):  # every id once, before training
        y = _rows(masks, idx)
        valid = y[y != ignore_index]
        if valid.numel():
            hi, lo = int(valid.max()), int(valid.min())
            if hi >= num_classes or lo < 0:
                bad = hi if hi >= num_classes else lo
                raise EvaluationError(
                    f"training masks hold class id {bad} but num_classes is {num_classes}; raise num_classes or "
                    f"mark those pixels {ignore_index} (ignore)"
                )
        labelled += valid.numel()
    if labelled == 0:
        raise EvaluationError(f"every training mask pixel is {ignore_index} (ignore): nothing to train on")


def train_dense_head(
    train_feats: FeatureArray,
    train_masks: FeatureArray,
    num_classes: int,
    *,
    epochs: int | None = None,
    lr: float = DEFAULT_LR,
    batch_size: int = DEFAULT_HEAD_BATCH,
    weight_decay: float = DEFAULT_WEIGHT_DECAY,
    seed: int = 0,
    ignore_index: int = IGNORE_INDEX,
    device: str | torch.device = "cpu",
    loss_size: int | None = None,
) -> DenseLinearHead:
    """Train a linear segmentation head on frozen patch features.

    Args:
        train_feats: ``(N, gh, gw, C)`` patch tokens -- a tensor or a (disk-backed) numpy array
            of any float dtype; only mini-batches (and chunks for the statistics) are read.
        train_masks: ``(N, S, S)`` integer class ids at the training resolution, ``ignore_index``
            pixels ignored; tensor or numpy array.
        num_classes: ``K``; every non-ignored id must be below it.
        epochs: passes over the images; ``None`` (default): :func:`auto_epochs`, the fewest
            epochs that make at least 400 optimiser steps.
        lr: peak AdamW learning rate, cosine-decayed to 0 over all steps (no warm-up:
            zero-initialised linear head, convex problem).
        batch_size: images per step. weight_decay: AdamW decoupled decay of the weight matrix.
        seed: seeds a private shuffling generator; same inputs + seed => same head.
        device: where the head trains.
        loss_size: side the masks are brought to (nearest neighbour) for the loss; ``None``: the
            masks' own ``S`` (see :func:`loss_side` for the default of the dense probe).

    The features are standardised per channel with the training mean / std (kept as buffers
    of the head); logits ``(B, K, gh, gw)`` are upsampled bilinearly to ``S x S`` and trained
    with pixel-wise cross-entropy (mean over the non-ignored pixels of the batch).

    Returns:
        the trained :class:`DenseLinearHead`, in eval mode, on ``device``.

    Raises:
        EvaluationError: bad shapes, no labelled pixel, or a mask id ``>= num_classes``.
    """
    _check_feats(train_feats, "train_feats")
    n = train_feats.shape[0]
    if len(train_masks.shape) != 3 or train_masks.shape[0] != n:
        raise EvaluationError(
            f"train_masks must be (N, S, S) with N = {n} (the number of feature rows), not {tuple(train_masks.shape)}"
        )
    if num_classes < 1:
        raise EvaluationError(f"num_classes must be at least 1, not {num_classes}")
    if epochs is None:
        epochs = auto_epochs(n, batch_size)
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise EvaluationError(f"epochs, batch_size and lr must be positive (got {epochs}, {batch_size}, {lr})")
    s_hw = tuple(int(v) for v in train_masks.shape[1:])
    if loss_size is not None and tuple(s_hw) != (loss_size, loss_size):
        s_hw = (int(loss_size), int(loss_size))
    _check_mask_ids(train_masks, num_classes, ignore_index)

    dev = torch.device(device)
    mean, std = _channel_stats(train_feats)
    head = DenseLinearHead(mean, std, num_classes).to(dev)
    head.train()

    def batch_loss(idx: Tensor) -> Tensor | None:
        y = _rows(train_masks, idx).to(dev, torch.int64, non_blocking=True)
        if tuple(y.shape[1:]) != s_hw:
            y = F.interpolate(y[:, None].float(), size=s_hw, mode="nearest-exact")[:, 0].to(torch.int64)
        if not bool((y != ignore_index).any()):
            return None
        x = _rows(train_feats, idx).to(dev, non_blocking=True)
        return F.cross_entropy(head(x, size=s_hw), y, ignore_index=ignore_index)

    train_linear_head(head.linear, n, batch_loss, epochs=epochs, lr=lr, weight_decay=weight_decay,
                      batch_size=batch_size, seed=seed, sorted_batches=True)  # sorted: sequential memmap reads
    return head.eval()


@torch.no_grad()
def evaluate_dense_head(
    head: DenseLinearHead,
    feats: FeatureArray,
    masks_original: Sequence[Tensor],
    num_classes: int,
    *,
    batch_size: int = 32,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, Any]:
    """Score ``head`` on features ``(M, gh, gw, C)`` against masks at their original resolution.

    Each image's logits ``(K, gh, gw)`` are upsampled bilinearly to its mask's size ``(H_i, W_i)``
    (a lazy sequence such as :meth:`SegmentationFolder.original_masks` keeps memory bounded),
    arg-maxed, and accumulated into one confusion matrix over the whole set.

    Returns:
        :func:`segmentation_scores` of the accumulated matrix, plus ``"confusion"``: the
        ``(K, K)`` int64 matrix as nested lists (rows = target).
    """
    _check_feats(feats, "feats")
    m = feats.shape[0]
    if len(masks_original) != m:
        raise EvaluationError(f"{m} feature rows but {len(masks_original)} masks")
    if head.num_classes != num_classes:
        raise EvaluationError(f"the head predicts {head.num_classes} classes, not num_classes={num_classes}")
    dev = head.linear.weight.device
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for start in range(0, m, batch_size):
        idx = torch.arange(start, min(m, start + batch_size))
        logits = head(_rows(feats, idx).to(dev))
        for j, i in enumerate(idx.tolist()):
            target = torch.as_tensor(masks_original[i])
            if target.ndim != 2:
                raise EvaluationError(f"mask {i} must be (H, W) class ids, not shape {tuple(target.shape)}")
            up = F.interpolate(logits[j : j + 1], size=tuple(target.shape), mode="bilinear", align_corners=False)
            conf += confusion_matrix(up[0].argmax(0), target.to(dev), num_classes, ignore_index)
    scores = segmentation_scores(conf)
    scores["confusion"] = conf.tolist()
    return scores
