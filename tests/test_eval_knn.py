"""Tests for the weighted kNN classifier (stratavit.evaluation.knn)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stratavit.evaluation.knn import knn_per_block, knn_predict, knn_top1

# Hand-made 2-D case. Directions (before normalisation; magnitudes differ on purpose):
#   a = ( 1, 0)  label 0      b = (0.6,  0.8) label 1
#   d = (-1, 0)  label 0      c = (0.6, -0.8) label 1
# Query q1 = (1, 0): with k=3 the neighbours are a (sim 1) and b, c (sim 0.6).
#   unweighted majority -> class 1; weights exp(sim/T): class 0 wins iff
#   exp(1/T) > 2 exp(0.6/T)  <=>  T < 0.4 / ln 2 ~= 0.5771.
# Query q2 = (-1, 0): neighbours d (sim 1) and b, c (sim -0.6);
#   class 0 wins iff exp(1/T) > 2 exp(-0.6/T)  <=>  T < 1.6 / ln 2 ~= 2.308.
TRAIN = torch.tensor([[3.0, 0.0], [1.2, 1.6], [0.3, -0.4], [-5.0, 0.0]])
TRAIN_Y = torch.tensor([0, 1, 1, 0])
TEST = torch.tensor([[2.0, 0.0], [-0.5, 0.0]])
TEST_Y = torch.tensor([0, 0])
T1 = 0.4 / math.log(2)
T2 = 1.6 / math.log(2)


def test_hand_computed_weighted_vote():
    # well below both thresholds: the exp-weighted vote overrides the 2-vs-1 majority
    assert knn_predict(TRAIN, TRAIN_Y, TEST, k=3, temperature=0.07).tolist() == [0, 0]
    assert knn_top1(TRAIN, TRAIN_Y, TEST, TEST_Y, k=3, temperature=0.07) == 100.0
    # the decision flips exactly at T = 0.4 / ln 2 for q1 and 1.6 / ln 2 for q2,
    # which pins the vote weight to exp(sim / T)
    assert knn_predict(TRAIN, TRAIN_Y, TEST, k=3, temperature=T1 * 0.98).tolist() == [0, 0]
    assert knn_predict(TRAIN, TRAIN_Y, TEST, k=3, temperature=T1 * 1.02).tolist() == [1, 0]
    assert knn_top1(TRAIN, TRAIN_Y, TEST, TEST_Y, k=3, temperature=T1 * 1.02) == 50.0
    assert knn_predict(TRAIN, TRAIN_Y, TEST, k=3, temperature=T2 * 0.98).tolist() == [1, 0]
    assert knn_predict(TRAIN, TRAIN_Y, TEST, k=3, temperature=T2 * 1.02).tolist() == [1, 1]
    assert knn_top1(TRAIN, TRAIN_Y, TEST, TEST_Y, k=3, temperature=T2 * 1.02) == 0.0
    # k=1: nearest neighbour only
    assert knn_predict(TRAIN, TRAIN_Y, TEST, k=1, temperature=100.0).tolist() == [0, 0]


def test_k_larger_than_n_is_clamped():
    # k=100 > N=4 behaves as k=4: q1 sees a (1), b, c (0.6), d (-1)
    # class 0: exp(1/T) + exp(-1/T) vs class 1: 2 exp(0.6/T)
    for temperature in (0.3, 1.0, 5.0):
        s0 = math.exp(1 / temperature) + math.exp(-1 / temperature)
        s1 = 2 * math.exp(0.6 / temperature)
        expected = 0 if s0 > s1 else 1
        got = knn_predict(TRAIN, TRAIN_Y, TEST[:1], k=100, temperature=temperature)
        assert got.tolist() == [expected]
        same = knn_predict(TRAIN, TRAIN_Y, TEST[:1], k=4, temperature=temperature)
        assert got.tolist() == same.tolist()


def _reference_predict(train, train_y, test, k, temperature, num_classes):
    """Independent brute-force weighted kNN in float64 numpy with explicit loops."""
    train = np.asarray(train, dtype=np.float64)
    test = np.asarray(test, dtype=np.float64)
    train_n = [row / np.sqrt(sum(v * v for v in row)) for row in train]
    preds = []
    for q in test:
        q = q / np.sqrt(sum(v * v for v in q))
        sims = [(float(np.dot(q, t)), int(y)) for t, y in zip(train_n, train_y)]
        sims.sort(key=lambda s: -s[0])
        scores = [0.0] * num_classes
        for sim, y in sims[: min(k, len(sims))]:
            scores[y] += math.exp(sim / temperature)
        preds.append(int(np.argmax(scores)))
    return preds


@pytest.mark.parametrize("k,temperature", [(1, 0.07), (5, 0.07), (20, 0.07), (20, 0.5), (300, 0.1)])
def test_matches_bruteforce_reference(k, temperature):
    g = torch.Generator().manual_seed(0)
    n_cls = 5
    centres = torch.randn(n_cls, 16, generator=g)
    train_y = torch.randint(0, n_cls, (200,), generator=g)
    test_y = torch.randint(0, n_cls, (60,), generator=g)
    train = centres[train_y] + 1.5 * torch.randn(200, 16, generator=g)
    test = centres[test_y] + 1.5 * torch.randn(60, 16, generator=g)

    ref = _reference_predict(train.numpy(), train_y.numpy(), test.numpy(), k, temperature, n_cls)
    got = knn_predict(
        train, train_y, test, k=k, temperature=temperature, num_classes=n_cls, chunk=7
    )
    assert got.dtype == torch.int64
    assert got.tolist() == ref
    acc = knn_top1(train, train_y, test, test_y, k=k, temperature=temperature, chunk=16)
    assert acc == pytest.approx(100.0 * float(np.mean(np.array(ref) == test_y.numpy())))


def test_chunking_does_not_change_result():
    g = torch.Generator().manual_seed(1)
    train, test = torch.randn(100, 8, generator=g), torch.randn(33, 8, generator=g)
    train_y, test_y = torch.randint(0, 4, (100,), generator=g), torch.randint(0, 4, (33,), generator=g)
    a = knn_predict(train, train_y, test, k=10, chunk=1)
    b = knn_predict(train, train_y, test, k=10, chunk=1024)
    assert torch.equal(a, b)
    full = knn_top1(train, train_y, test, test_y, k=10)
    assert knn_top1(train, train_y, test, test_y, k=10, chunk=5) == full


def test_per_layer():
    g = torch.Generator().manual_seed(2)
    n_layers = 3
    train = torch.randn(n_layers, 50, 8, generator=g)
    test = torch.randn(n_layers, 20, 8, generator=g)
    train_y, test_y = torch.randint(0, 3, (50,), generator=g), torch.randint(0, 3, (20,), generator=g)
    train[2] += 4 * torch.nn.functional.one_hot(train_y, 8).float()  # make the last layer informative
    test[2] += 4 * torch.nn.functional.one_hot(test_y, 8).float()
    accs = knn_per_block(train, train_y, test, test_y, k=5)
    assert isinstance(accs, list) and len(accs) == n_layers
    assert all(isinstance(a, float) and 0.0 <= a <= 100.0 for a in accs)
    for layer in range(n_layers):
        assert accs[layer] == knn_top1(train[layer], train_y, test[layer], test_y, k=5)
    assert accs[2] == 100.0
    with pytest.raises(ValueError):
        knn_per_block(train, train_y, test[:2], test_y)
