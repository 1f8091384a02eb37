"""Tests for the linear probe (stratavit.evaluation.linear)."""

from __future__ import annotations

import torch

from stratavit.evaluation.linear import StackedLinear, linear_probe_top1, linear_probes_top1


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


def test_stacked_probes_equal_separate_probes():
    """Several probes trained in one loop (stacked weights, summed mean CEs) move exactly as each alone."""
    g = torch.Generator().manual_seed(5)
    ytr, yte = torch.randint(0, 4, (150,), generator=g), torch.randint(0, 4, (60,), generator=g)
    widths = [12, 12, 7, 12]  # two widths: stacked in two groups, results back in input order
    xtr = [torch.randn(150, c, generator=g) + ytr[:, None].float() * (i + 1) * 0.3 for i, c in enumerate(widths)]
    xte = [torch.randn(60, c, generator=g) + yte[:, None].float() * (i + 1) * 0.3 for i, c in enumerate(widths)]
    together = linear_probes_top1(xtr, ytr, xte, yte, epochs=7, batch_size=32, seed=2, num_classes=5)
    assert len(together) == 4
    for a, b, t in zip(xtr, xte, together):
        alone = linear_probe_top1(a, ytr, b, yte, epochs=7, batch_size=32, seed=2, num_classes=5)
        assert t["top1"] == alone["top1"] and t["train_top1"] == alone["train_top1"]
        assert torch.equal(t["predictions"], alone["predictions"])
    accs = [t["train_top1"] for t in together]
    assert accs != [accs[0]] * 4  # the probes really differ (different separations)


def test_stacked_linear_is_independent_maps():
    layer = StackedLinear(3, 5, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(3, 2, 5, dtype=torch.float64))
        layer.bias.copy_(torch.randn(3, 2, dtype=torch.float64))
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    out = layer(x)
    assert out.shape == (3, 4, 2)
    for i in range(3):
        torch.testing.assert_close(out[i], x[i] @ layer.weight[i].T + layer.bias[i])
