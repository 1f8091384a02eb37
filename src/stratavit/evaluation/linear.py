"""Linear probes on frozen features.

A single linear map trained with softmax cross-entropy on standardised
features (train mean / std), in float64, by the shared trainer of
:mod:`stratavit.evaluation.linear_head` (zero init, AdamW, cosine schedule,
seeded shuffling: the result depends only on the inputs and ``seed``).

:func:`linear_probes_top1` trains several such probes (one per block and
pooling) in one loop: their weights are stacked into one ``(G, K, C)``
tensor and the loss is the sum of the probes' own mean cross-entropies, so
each probe's gradient is its own and AdamW (element-wise) moves it exactly
as if it were trained alone, on the same shuffled batches. Only the
per-step Python and optimiser overhead is shared (G probes cost about what
one did).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stratavit.evaluation.linear_head import train_linear_head

__all__ = ["StackedLinear", "linear_probe_top1", "linear_probes_top1"]


def _standardise(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """Z-score both sets with the train statistics; ``(N, C)`` / ``(M, C)`` float64."""
    train64 = train.to(torch.float64)
    mean = train64.mean(0, keepdim=True)
    std = train64.std(0, keepdim=True, unbiased=False).clamp_min(1e-6)
    return (train64 - mean) / std, (test.to(torch.float64) - mean) / std


class StackedLinear(nn.Module):
    """``G`` independent linear maps: weight ``(G, K, C)``, bias ``(G, K)``; ``(G, B, C) -> (G, B, K)``."""

    def __init__(self, groups: int, in_features: int, out_features: int, dtype: torch.dtype = torch.float64,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(groups, out_features, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(groups, out_features, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias[:, None, :], x, self.weight.transpose(1, 2))


@torch.no_grad()
def _predict(layer: StackedLinear, feats: Tensor, batch_size: int) -> Tensor:
    """Argmax predictions ``(G, M)`` int64 for stacked features ``(G, M, C)``, in batches."""
    if feats.shape[1] == 0:
        return torch.empty(feats.shape[0], 0, dtype=torch.int64, device=feats.device)
    chunks = [layer(feats[:, i : i + batch_size]).argmax(2) for i in range(0, feats.shape[1], batch_size)]
    return torch.cat(chunks, dim=1)


def _check(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor) -> None:
    if train_feats.ndim != 2 or test_feats.ndim != 2:
        raise ValueError("linear_probe_top1 expects 2-D (N, C) / (M, C) features")
    if train_feats.shape[0] == 0:
        raise ValueError("linear_probe_top1: empty training set")
    if train_labels.shape[0] != train_feats.shape[0] or test_labels.shape[0] != test_feats.shape[0]:
        raise ValueError("features and labels disagree on the number of samples")


def linear_probes_top1(
    train_feats: Sequence[Tensor],
    train_labels: Tensor,
    test_feats: Sequence[Tensor],
    test_labels: Tensor,
    *,
    epochs: int = 100,
    lr: float = 1e-3,
    weight_decay: float = 5e-2,
    batch_size: int = 256,
    seed: int = 0,
    num_classes: int | None = None,
) -> list[dict[str, Any]]:
    """Train ``G`` independent linear probes, one per feature set, in one loop.

    Args:
        train_feats: ``G`` tensors ``(N, C_g)`` (e.g. one per block); probes whose ``C_g`` agree
            are stacked into one :class:`StackedLinear`. train_labels: ``(N,)`` int labels.
        test_feats: ``G`` tensors ``(M, C_g)``; test_labels: ``(M,)``.
        epochs: passes over the training set (default 100).
        lr: peak AdamW learning rate, cosine-decayed to 0 over all steps
            (default 1e-3, for standardised features).
        weight_decay: AdamW decoupled weight decay on the weight matrix, not
            the bias (default 5e-2).
        batch_size: mini-batch size (default 256; the last partial batch is kept).
        seed: seeds the shuffling generator -- same inputs + seed => same result.
        num_classes: defaults to ``max(train/test labels) + 1``.

    Training runs in float64 on ``train_feats``' device: float32 hit denormal
    numbers (10-100x CPU slow-downs) once the probe fits the data. The 8 probes
    of 10,000 x 128 features take ~9 s on a 2-core CPU (bench/linear_probes_speed.py).

    Returns:
        per feature set, in order: ``{"top1": float, "train_top1": float, "predictions": Tensor}`` --
        accuracies in percent; ``predictions`` is the ``(M,)`` int64 CPU tensor of predicted test
        labels. Each equals (to float64 rounding of the stacked matrix products) what that probe
        gives trained alone.
    """
    if len(train_feats) != len(test_feats):
        raise ValueError("linear_probes_top1: as many test as train feature sets are needed")
    for ftr, fte in zip(train_feats, test_feats):
        _check(ftr, train_labels, fte, test_labels)
    if not train_feats:
        return []
    device = train_feats[0].device
    y_train = train_labels.to(device=device, dtype=torch.int64)
    y_test = test_labels.to(device=device, dtype=torch.int64)
    if num_classes is None:
        num_classes = int(max(int(y_train.max()), int(y_test.max()) if y_test.numel() else 0)) + 1
    n = train_feats[0].shape[0]
    results: list[dict[str, Any] | None] = [None] * len(train_feats)
    by_width: dict[int, list[int]] = {}
    for g, ftr in enumerate(train_feats):
        by_width.setdefault(int(ftr.shape[1]), []).append(g)
    for width, members in by_width.items():
        x_train = torch.empty(len(members), n, width, dtype=torch.float64, device=device)  # (G, N, C)
        x_test = torch.empty(len(members), test_feats[members[0]].shape[0], width, dtype=torch.float64,
                             device=device)  # (G, M, C)
        for j, g in enumerate(members):
            x_train[j], x_test[j] = _standardise(train_feats[g].to(device), test_feats[g].to(device))
        layer = StackedLinear(len(members), width, num_classes, device=device)
        groups = len(members)

        def batch_loss(idx: Tensor, x_train: Tensor = x_train, layer: StackedLinear = layer,
                       groups: int = groups) -> Tensor:
            idx = idx.to(device)
            logits = layer(x_train[:, idx])  # (G, b, K)
            ce = F.cross_entropy(logits.flatten(0, 1), y_train[idx].repeat(groups), reduction="none")
            return ce.view(groups, -1).mean(1).sum()  # each probe's gradient is its own mean CE's

        train_linear_head(layer, n, batch_loss, epochs=epochs, lr=lr, weight_decay=weight_decay,
                          batch_size=batch_size, seed=seed)
        layer.eval()
        train_pred = _predict(layer, x_train, 4096)
        test_pred = _predict(layer, x_test, 4096)
        for j, g in enumerate(members):
            top1 = 100.0 * (test_pred[j] == y_test).float().mean().item() if y_test.numel() else 0.0
            results[g] = {
                "top1": top1,
                "train_top1": 100.0 * (train_pred[j] == y_train).float().mean().item(),
                "predictions": test_pred[j].cpu(),
            }
    return [r for r in results if r is not None]


def linear_probe_top1(
    train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor, **options: Any
) -> dict[str, Any]:
    """One linear probe: :func:`linear_probes_top1` with one feature set (the same ``options``).

    Args:
        train_feats: ``(N, C)`` float features; train_labels: ``(N,)`` int labels.
        test_feats: ``(M, C)``; test_labels: ``(M,)``.

    Returns:
        ``{"top1": float, "train_top1": float, "predictions": Tensor}`` (see :func:`linear_probes_top1`).
    """
    return linear_probes_top1([train_feats], train_labels, [test_feats], test_labels, **options)[0]
