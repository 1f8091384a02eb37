"""Weighted k-nearest-neighbour classifier on frozen features (DINO protocol).

For every test feature the ``k`` most cosine-similar training features vote for
their class with weight ``exp(sim / T)``; the class with the largest summed
weight wins (Wu et al. 2018; Caron et al. 2021, "DINO").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["knn_predict", "knn_top1", "knn_per_block"]


def _num_classes(train_labels: Tensor, test_labels: Tensor | None, num_classes: int | None) -> int:
    if num_classes is not None:
        return int(num_classes)
    top = int(train_labels.max())
    if test_labels is not None and test_labels.numel():
        top = max(top, int(test_labels.max()))
    return top + 1


def knn_predict(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> Tensor:
    """Weighted-kNN class predictions.

    Args:
        train_feats: ``(N, C)`` training features (any float dtype; need not be normalised).
        train_labels: ``(N,)`` integer labels in ``[0, num_classes)``.
        test_feats: ``(M, C)`` query features.
        k: number of neighbours; clamped to ``N``.
        temperature: ``T`` in the vote weight ``exp(cos_sim / T)``.
        num_classes: defaults to ``train_labels.max() + 1``.
        chunk: number of test rows processed at once (peak memory ``~chunk * N``).

    Returns:
        ``(M,)`` int64 predicted labels (on ``test_feats``' device). Ties in the
        class score resolve to the lowest class index.
    """
    if train_feats.ndim != 2 or test_feats.ndim != 2:
        raise ValueError("knn_predict expects 2-D (N, C) / (M, C) feature matrices")
    n = train_feats.shape[0]
    if n == 0:
        raise ValueError("knn_predict: empty training set")
    if train_labels.shape[0] != n:
        raise ValueError("train_feats and train_labels disagree on N")
    k = max(1, min(int(k), n))
    n_cls = _num_classes(train_labels, None, num_classes)

    device = test_feats.device
    train = F.normalize(train_feats.to(device=device, dtype=torch.float32), dim=1)
    test = F.normalize(test_feats.to(dtype=torch.float32), dim=1)
    labels = train_labels.to(device=device, dtype=torch.int64)

    preds = []
    for start in range(0, test.shape[0], max(1, int(chunk))):
        sim = test[start : start + chunk] @ train.T  # (b, N) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # (b, k)
        weights = (top_sim / temperature).exp()  # (b, k)
        scores = torch.zeros(sim.shape[0], n_cls, device=device, dtype=torch.float32)
        scores.scatter_add_(1, labels[top_idx], weights)  # (b, n_cls) summed vote weights
        preds.append(scores.argmax(dim=1))
    if not preds:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.cat(preds)


def knn_top1(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> float:
    """Top-1 accuracy (percent) of the weighted kNN classifier.

    Args:
        train_feats: ``(N, C)``; train_labels: ``(N,)``.
        test_feats: ``(M, C)``; test_labels: ``(M,)``.
        k, temperature, num_classes, chunk: see :func:`knn_predict`
            (``num_classes`` defaults to ``max(train/test labels) + 1``).

    Returns:
        Accuracy in ``[0, 100]`` as a Python float (``0.0`` if ``M == 0``).
    """
    if test_labels.shape[0] != test_feats.shape[0]:
        raise ValueError("test_feats and test_labels disagree on M")
    if test_labels.numel() == 0:
        return 0.0
    preds = knn_predict(
        train_feats,
        train_labels,
        test_feats,
        k=k,
        temperature=temperature,
        num_classes=_num_classes(train_labels, test_labels, num_classes),
        chunk=chunk,
    )
    correct = (preds.cpu() == test_labels.cpu().to(torch.int64)).sum().item()
    return 100.0 * correct / test_labels.numel()


def knn_per_block(
    train_feats: Tensor | Sequence[Tensor],
    train_labels: Tensor,
    test_feats: Tensor | Sequence[Tensor],
    test_labels: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> list[float]:
    """:func:`knn_top1` for every block.

    Args:
        train_feats: ``(L, N, C)`` (or a sequence of ``L`` ``(N, C)`` tensors).
        train_labels: ``(N,)``.
        test_feats: ``(L, M, C)`` (or a sequence of ``L`` ``(M, C)`` tensors).
        test_labels: ``(M,)``.

    Returns:
        ``L`` accuracies in percent; entry ``l`` is for block ``l + 1``.
    """
    if len(train_feats) != len(test_feats):
        raise ValueError(f"layer count mismatch: {len(train_feats)} train vs {len(test_feats)} test")
    return [
        knn_top1(
            tr,
            train_labels,
            te,
            test_labels,
            k=k,
            temperature=temperature,
            num_classes=num_classes,
            chunk=chunk,
        )
        for tr, te in zip(train_feats, test_feats)
    ]
