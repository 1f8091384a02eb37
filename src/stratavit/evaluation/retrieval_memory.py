"""Dense retrieval without training ("Hummingbird", Balažević et al. 2023): the patch memory and kNN labelling.

No head is trained. The training split's patch tokens of one block, l2-normalised, go into a
**memory** with each patch's **label distribution** (the fraction of its labelled pixels of each
class; pixels marked ``ignore_index`` do not count, and a patch without a labelled pixel stays out
of the memory). Each validation patch takes its ``k`` most similar memory entries (cosine),
weights them by ``softmax(sim / T)`` and averages their label distributions; the per-patch class
scores are upsampled bilinearly to the mask's own resolution and arg-maxed, and the pixels go
into one confusion matrix, scored as the dense probe scores it
(:func:`~stratavit.evaluation.dense_head.segmentation_scores`).

* :func:`patch_label_distributions` -- ``(N, S, S)`` masks -> ``(N, gh, gw, K)`` distributions;
* :func:`memory_order` -- the seeded order in which valid patches enter the memory: a memory of
  size ``m`` is the first ``m`` of them, so the memories of several sizes are nested;
* :func:`build_memory` -- the normalised features ``(M, C)`` and labels ``(M, K)`` of that prefix;
* :func:`knn_soft_labels` -- ``(Q, C)`` queries -> one ``(Q, K)`` soft labelling per memory size
  (one similarity matmul per query chunk against the largest memory, top-k on each prefix);
* :func:`retrieval_confusions` -- labels every validation image, one confusion matrix per size.

Memory stays bounded: similarities are computed for ``chunk`` queries at a time
(``chunk * M`` floats), features are read from the (disk-backed) token stores image by image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from stratavit.evaluation.dense_head import confusion_matrix
from stratavit.evaluation.errors import EvaluationError
from stratavit.evaluation.progress import progress
from stratavit.evaluation.segmentation_data import IGNORE_INDEX

__all__ = [
    "DEFAULT_K",
    "DEFAULT_TEMPERATURE",
    "Memory",
    "build_memory",
    "knn_soft_labels",
    "memory_order",
    "patch_label_distributions",
    "retrieval_confusions",
]

DEFAULT_K = 30
"""Neighbours per query patch (the paper's and open-hummingbird-eval's value)."""
DEFAULT_TEMPERATURE = 0.02
"""Softmax temperature over the neighbours' cosine similarities (open-hummingbird-eval's ``beta``)."""
_SIM_BUDGET = 1 << 23  # floats of one similarity chunk (32 MB)

FeatureArray = Tensor | np.ndarray


def _rows(array: FeatureArray, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of a tensor or (memory-mapped) numpy array as a float32 CPU tensor."""
    if isinstance(array, Tensor):
        return array[start:stop].float().cpu()
    return torch.from_numpy(np.ascontiguousarray(array[start:stop])).float()


def patch_label_distributions(
    masks: FeatureArray, grid: tuple[int, int], num_classes: int, *, ignore_index: int = IGNORE_INDEX,
    batch: int = 64,
) -> Tensor:
    """Per-patch class distributions of masks ``(N, S, S)`` on a ``grid = (gh, gw)`` token grid.

    Each patch covers the pixels adaptive average pooling assigns it (``S / gh`` square when the
    grid divides ``S``); its distribution is the fraction of its *labelled* pixels of each class.

    Returns:
        ``(N, gh, gw, K)`` float32; rows sum to 1, or are all 0 where a patch has no labelled pixel.
    """
    n = masks.shape[0]
    k = int(num_classes)
    out = torch.zeros(n, *grid, k)
    for start in range(0, n, batch):
        y = _rows(masks, start, min(n, start + batch)).to(torch.int64)
        valid = y != ignore_index
        if bool((y[valid] >= k).any()) or bool((y[valid] < 0).any()):
            raise EvaluationError(f"masks hold class ids outside 0..{k - 1} (and {ignore_index} = ignore)")
        one_hot = F.one_hot(torch.where(valid, y, k), k + 1)[..., :k].permute(0, 3, 1, 2).float()
        counts = F.adaptive_avg_pool2d(one_hot, grid)  # (b, K, gh, gw): fraction of all pixels
        total = counts.sum(1, keepdim=True)
        out[start : start + y.shape[0]] = torch.where(total > 0, counts / total.clamp_min(1e-12), 0).permute(0, 2, 3, 1)
    return out


def memory_order(labels: Tensor, seed: int) -> Tensor:
    """Indices of the patches with a label (rows of ``labels (P, K)`` that sum above 0), in a random
    order fixed by ``seed``: the memory of size ``m`` holds the first ``m`` (so memories are nested)."""
    valid = torch.nonzero(labels.sum(1) > 0).flatten()
    g = torch.Generator().manual_seed(int(seed))
    return valid[torch.randperm(valid.numel(), generator=g)]


@dataclass
class Memory:
    """The retrieval memory: ``feats (M, C)`` l2-normalised float32, ``labels (M, K)`` distributions,
    ``available``: how many labelled patches the split had (``M = min(requested, available)``)."""

    feats: Tensor
    labels: Tensor
    available: int

    def __len__(self) -> int:
        return self.feats.shape[0]


def build_memory(feats: FeatureArray, labels: Tensor, size: int, seed: int) -> Memory:
    """The first ``size`` patches of :func:`memory_order`: features of ``feats (N, gh, gw, C)``
    (l2-normalised) and their rows of ``labels (N, gh, gw, K)``.

    The store is read sequentially in chunks of images (bounded memory); the memory keeps the
    patches in sampling order.
    """
    if size < 1:
        raise EvaluationError(f"a retrieval memory needs at least one patch, not {size}")
    n, gh, gw, c = feats.shape
    if tuple(labels.shape[:3]) != (n, gh, gw):
        raise EvaluationError(f"labels {tuple(labels.shape)} do not match the features' grid {(n, gh, gw)}")
    flat_labels = labels.reshape(n * gh * gw, -1)
    order = memory_order(flat_labels, seed)
    chosen = order[:size]
    per_image = gh * gw
    out = torch.empty(chosen.numel(), c)
    step = max(1, _SIM_BUDGET // (per_image * c))  # images per read
    for start in range(0, n, step):
        lo, hi = start * per_image, min(n, start + step) * per_image
        sel = torch.nonzero((chosen >= lo) & (chosen < hi)).flatten()
        if sel.numel():
            tokens = _rows(feats, start, min(n, start + step)).reshape(-1, c)
            out[sel] = tokens[chosen[sel] - lo]
    return Memory(F.normalize(out, dim=1), flat_labels[chosen].clone(), int(order.numel()))


def knn_soft_labels(
    queries: Tensor, memory: Memory, k: int, temperature: float, sizes: Sequence[int] | None = None,
    *, chunk: int | None = None,
) -> list[Tensor]:
    """Soft labels of ``queries (Q, C)`` from their ``k`` nearest memory entries, per memory size.

    For each query ``q`` (l2-normalised here) and a memory prefix of size ``m``: the ``min(k, m)``
    entries of highest cosine similarity ``s_j``, weights ``w = softmax(s / temperature)``, and
    ``sum_j w_j * labels_j``. ``sizes`` (default ``[len(memory)]``): prefixes of the memory, each at
    most its length; the similarities are computed once against the largest.

    Returns:
        one ``(Q, K)`` float32 tensor per size, in the order of ``sizes``.
    """
    sizes = [len(memory)] if sizes is None else [int(m) for m in sizes]
    top = max(sizes)
    if top > len(memory) or min(sizes) < 1:
        raise EvaluationError(f"memory sizes {sizes} must lie in 1..{len(memory)} (the memory's size)")
    if k < 1 or not temperature > 0:
        raise EvaluationError(f"k must be >= 1 and the temperature > 0 (got k={k}, temperature={temperature})")
    q_all = F.normalize(queries.float(), dim=1)
    keys, values = memory.feats[:top], memory.labels[:top]
    step = chunk or max(1, _SIM_BUDGET // top)
    outs = [torch.empty(q_all.shape[0], values.shape[1]) for _ in sizes]
    for start in range(0, q_all.shape[0], step):
        sim = q_all[start : start + step] @ keys.T  # (q, top)
        for out, m in zip(outs, sizes):
            s, idx = sim[:, :m].topk(min(k, m), dim=1)
            w = torch.softmax(s / temperature, dim=1)  # (q, k)
            out[start : start + step] = torch.einsum("qk,qkc->qc", w, values[idx])
    return outs


def retrieval_confusions(
    val_feats: FeatureArray,
    masks_original: Sequence[Tensor],
    memory: Memory,
    sizes: Sequence[int],
    num_classes: int,
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    images_per_chunk: int = 16,
    keep: int = 0,
    ignore_index: int = IGNORE_INDEX,
    desc: str | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Label every validation image by retrieval and score it, for each memory size.

    Args:
        val_feats: ``(M_val, gh, gw, C)`` patch tokens (tensor or disk-backed array).
        masks_original: ``M_val`` masks ``(H_i, W_i)`` at their own resolution (a lazy sequence).
        memory, sizes: the memory and the prefixes of it to use (see :func:`knn_soft_labels`).
        keep: also return the arg-max maps ``(H_i, W_i)`` of the first ``keep`` images at the
            largest size (for pictures).
        desc: a progress bar's label (None: no bar).

    Returns:
        ``(confusions, kept)``: one ``(K, K)`` int64 confusion matrix per size (rows = target), and
        the kept prediction maps.
    """
    n, gh, gw, _ = val_feats.shape
    if len(masks_original) != n:
        raise EvaluationError(f"{n} feature rows but {len(masks_original)} masks")
    confs = [torch.zeros(num_classes, num_classes, dtype=torch.int64) for _ in sizes]
    largest = max(range(len(sizes)), key=lambda i: sizes[i])
    kept: list[Tensor] = []
    starts = range(0, n, images_per_chunk)
    for start in progress(starts, desc, total=len(starts)) if desc else starts:
        x = _rows(val_feats, start, min(n, start + images_per_chunk))
        b = x.shape[0]
        soft = knn_soft_labels(x.reshape(b * gh * gw, -1), memory, k, temperature, sizes)
        scores = torch.stack(soft).reshape(len(sizes), b, gh, gw, num_classes).permute(1, 0, 4, 2, 3)
        for j in range(b):
            target = torch.as_tensor(masks_original[start + j])
            up = F.interpolate(scores[j], size=tuple(target.shape), mode="bilinear", align_corners=False)
            preds = up.argmax(1)  # (sizes, H, W)
            for si in range(len(sizes)):
                confs[si] += confusion_matrix(preds[si], target, num_classes, ignore_index)
            if start + j < keep:
                kept.append(preds[largest])
    return confs, kept
