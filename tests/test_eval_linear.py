"""Tests for the linear probe (stratavit.evaluation.linear)."""

from __future__ import annotations

import torch

from stratavit.evaluation.linear import linear_probe_top1


def _blobs(n_per_class: int, n_classes: int, dim: int, seed: int, spread: float = 10.0):
    g = torch.Generator().manual_seed(123)  # same centres for train and test
    centres = spread * torch.randn(n_classes, dim, generator=g)
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(y.numel(), dim, generator=g)
    perm = torch.randperm(y.numel(), generator=g)
    return x[perm] * 3.0 + 7.0, y[perm]  # offset/scale: exercises the standardisation


def test_separable_blobs_reach_100_percent():
    xtr, ytr = _blobs(40, 10, 32, seed=0)
    xte, yte = _blobs(20, 10, 32, seed=1)
    out = linear_probe_top1(xtr, ytr, xte, yte, epochs=30, batch_size=64)
    assert set(out) >= {"top1", "train_top1", "predictions"}
    assert out["top1"] == 100.0
    assert out["train_top1"] == 100.0
    assert out["predictions"].dtype == torch.int64
    assert out["predictions"].shape == (200,)
    assert torch.equal(out["predictions"], yte)


def test_random_labels_give_chance_on_test():
    g = torch.Generator().manual_seed(0)
    xtr, ytr = torch.randn(500, 32, generator=g), torch.randint(0, 10, (500,), generator=g)
    xte, yte = torch.randn(1000, 32, generator=g), torch.randint(0, 10, (1000,), generator=g)
    out = linear_probe_top1(xtr, ytr, xte, yte, epochs=30, num_classes=10)
    assert 4.0 <= out["top1"] <= 16.0  # chance is 10 %
    assert out["train_top1"] > out["top1"]  # it does fit (memorise) the training set somewhat


def test_deterministic_given_seed():
    g = torch.Generator().manual_seed(0)
    xtr, ytr = torch.randn(300, 16, generator=g), torch.randint(0, 5, (300,), generator=g)
    xte, yte = torch.randn(100, 16, generator=g), torch.randint(0, 5, (100,), generator=g)
    torch.manual_seed(1)
    a = linear_probe_top1(xtr, ytr, xte, yte, epochs=10, batch_size=32, seed=3)
    torch.manual_seed(999)  # the global RNG must not matter
    b = linear_probe_top1(xtr, ytr, xte, yte, epochs=10, batch_size=32, seed=3)
    assert a["top1"] == b["top1"] and a["train_top1"] == b["train_top1"]
    assert torch.equal(a["predictions"], b["predictions"])


def test_num_classes_larger_than_labels_and_constant_feature():
    xtr, ytr = _blobs(10, 3, 8, seed=0)
    xte, yte = _blobs(5, 3, 8, seed=1)
    xtr[:, 0] = 1.0  # zero-variance feature must not produce NaNs
    xte[:, 0] = 1.0
    out = linear_probe_top1(xtr, ytr, xte, yte, epochs=20, num_classes=7)
    assert out["top1"] == 100.0
    assert int(out["predictions"].max()) < 3
