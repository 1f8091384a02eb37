"""PCL's E-step: spherical k-means, the concentration φ, and the data-set gather / broadcast across
two real gloo processes."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from stratavit.objectives.protonce.clustering import (
    Prototypes,
    _fill_empty,
    cluster_embeddings,
    concentration,
    distributed_cluster,
    gather_dataset_embeddings,
    kmeans,
)

WORLD = 2


def _planted(n_clusters: int, per: int, d: int, noise: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``per`` noisy points around each of ``n_clusters`` random unit directions, shuffled."""
    g = torch.Generator().manual_seed(seed)
    dirs = F.normalize(torch.randn(n_clusters, d, generator=g), dim=1)
    labels = torch.arange(n_clusters).repeat_interleave(per)
    x = dirs[labels] + noise * torch.randn(n_clusters * per, d, generator=g)
    perm = torch.randperm(n_clusters * per, generator=g)
    return x[perm], labels[perm]


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if the labelings ``a`` and ``b`` are equal up to a permutation of the labels."""
    table = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.long)
    table.index_put_((a, b), torch.ones_like(a), accumulate=True)
    nonzero = table > 0
    return bool((nonzero.sum(0) == 1).all() and (nonzero.sum(1) == 1).all() and table.shape[0] == table.shape[1])


# ---------------------------------------------------------------- concentration φ


def test_concentration_matches_hand_computation():
    # 2-D unit vectors; cluster 0 has 3 members, cluster 1 has 2, cluster 2 has 1, cluster 3 none.
    pts = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assign = torch.tensor([0, 0, 0, 1, 1, 2])
    # rows are l2-normalised inside, so any positive scale of a row changes nothing
    x = pts * torch.tensor([[2.0], [0.5], [3.0], [1.0], [7.0], [0.25]])
    tau = 0.2

    # cluster 0: mean (0, 1/3); distances √(1 + 1/9) = √10/3 (twice) and 2/3
    phi0 = ((2 * math.sqrt(10) / 3 + 2 / 3) / 3) / math.log(3 + 10)
    # cluster 1: mean (1/2, 1/2); distances √(1/2) (twice)
    phi1 = math.sqrt(0.5) / math.log(2 + 10)
    assert phi0 > phi1  # so the max over clusters with >= 2 members is phi0
    raw = [phi0, phi1, phi0, phi0]  # clusters 2 (one member) and 3 (empty) get the max
    # torch.quantile / numpy.percentile "linear": sorted s = [phi1, phi0, phi0, phi0], h = p·(K−1)
    q10 = phi1 + 0.3 * (phi0 - phi1)  # h = 0.3
    q90 = phi0  # h = 2.7, between two copies of phi0
    clipped = [min(max(v, q10), q90) for v in raw]  # [phi0, q10, phi0, phi0]
    mean = sum(clipped) / 4
    expected = torch.tensor([tau * v / mean for v in clipped])

    got = concentration(x, assign, 4, tau)
    assert got.dtype == torch.float32 and got.shape == (4,)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-7)
    assert float(got.mean()) == pytest.approx(tau, rel=1e-6)


def test_concentration_degenerate_cases_are_uniform():
    x = torch.randn(3, 4)
    # every cluster has a single member: no concentration can be measured
    torch.testing.assert_close(concentration(x, torch.tensor([0, 1, 2]), 3, 0.1), torch.full((3,), 0.1))
    # every member sits on its centroid: all φ are 0
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    torch.testing.assert_close(concentration(x, torch.tensor([0, 0, 1, 1]), 2, 0.3), torch.full((2,), 0.3))


# ---------------------------------------------------------------- k-means


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_kmeans_recovers_planted_clusters(init: str):
    x, labels = _planted(10, 100, 32, noise=0.05)
    c, a = kmeans(x, 10, seed=0, init=init)
    if init == "k-means++":  # (uniform random seeding may put two seeds in one planted group)
        assert _same_partition(a, labels)
        # the centroids are the normalised means of the planted groups
        g = torch.Generator().manual_seed(0)
        dirs = F.normalize(torch.randn(10, 32, generator=g), dim=1)
        assert float((c @ dirs.t()).max(dim=1).values.min()) > 0.99
    assert c.shape == (10, 32) and c.dtype == torch.float32 and a.shape == (1000,) and a.dtype == torch.long
    torch.testing.assert_close(c.norm(dim=1), torch.ones(10))
    # the centroids are the normalised means of the returned assignments
    means = torch.zeros(10, 32).index_add_(0, a, F.normalize(x, dim=1))
    torch.testing.assert_close(c, F.normalize(means, dim=1))
    # deterministic for a fixed seed
    c2, a2 = kmeans(x, 10, seed=0, init=init)
    assert torch.equal(a, a2) and torch.equal(c, c2)


def test_kmeans_chunking_does_not_change_the_result():
    x, _ = _planted(6, 50, 16, noise=0.3, seed=1)
    c1, a1 = kmeans(x, 8, seed=3)
    c2, a2 = kmeans(x, 8, seed=3, chunk=7)
    assert torch.equal(a1, a2)
    torch.testing.assert_close(c1, c2)


def test_fill_empty_takes_least_similar_points_without_emptying_their_cluster():
    assign = torch.tensor([0, 0, 0, 1, 1])
    best = torch.tensor([0.9, 0.1, 0.5, 0.2, 0.3])
    counts = torch.bincount(assign, minlength=4)
    new, new_counts = _fill_empty(assign, best, counts)
    # least similar first: 1 (cluster 0), 3 (cluster 1), 4 (cluster 1: would empty it), 2, 0;
    # empty clusters 2 and 3 receive points 1 and 3
    assert new.tolist() == [0, 2, 0, 3, 1]
    assert new_counts.tolist() == [2, 1, 1, 1]


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_kmeans_never_returns_empty_clusters(init: str):
    # only 3 distinct points for 5 clusters: duplicated centroids tie, leaving clusters empty that
    # must be re-seeded by splitting the duplicates
    base = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    x = base.repeat(4, 1)  # 12 rows
    c, a = kmeans(x, 5, seed=0, init=init)
    sizes = torch.bincount(a, minlength=5)
    assert sizes.shape == (5,) and bool((sizes >= 1).all()) and int(sizes.sum()) == 12
    assert int(a.max()) < 5
    # k = N: every point alone
    c, a = kmeans(x, 12, seed=0, init=init)
    assert sorted(a.tolist()) == list(range(12))


def test_too_many_clusters_raises():
    x = torch.randn(5, 4)
    with pytest.raises(ValueError, match="lower the number of clusters"):
        kmeans(x, 6)
    with pytest.raises(ValueError, match="lower the number of clusters"):
        cluster_embeddings(x, [2, 6], temperature=0.2)
    with pytest.raises(ValueError, match="lower the number of clusters"):
        distributed_cluster(x, torch.arange(5), 5, [6], temperature=0.2)
    with pytest.raises(ValueError):
        kmeans(x, 0)


def test_cluster_embeddings_one_prototypes_per_granularity():
    x, labels = _planted(4, 30, 16, noise=0.1)
    protos = cluster_embeddings(x * 5, [4, 8, 16], temperature=0.2, iters=10, seed=7)
    assert [p.num_clusters for p in protos] == [4, 8, 16]
    for p, k in zip(protos, [4, 8, 16]):
        assert isinstance(p, Prototypes)
        assert p.centroids.shape == (k, 16) and p.centroids.dtype == torch.float32
        assert p.assignments.shape == (120,) and p.assignments.dtype == torch.long
        assert p.phi.shape == (k,) and p.phi.dtype == torch.float32 and bool((p.phi > 0).all())
        assert p.sizes.dtype == torch.long and torch.equal(p.sizes, torch.bincount(p.assignments, minlength=k))
        assert float(p.phi.mean()) == pytest.approx(0.2, rel=1e-5)
        torch.testing.assert_close(p.centroids.norm(dim=1), torch.ones(k))
    assert _same_partition(protos[0].assignments, labels)
    # granularity i uses seed + i
    c, a = kmeans(x, 8, iters=10, seed=8)
    assert torch.equal(protos[1].assignments, a)


# ---------------------------------------------------------------- gather, one process


def test_gather_dataset_embeddings_one_process():
    full = torch.randn(10, 3)
    idx = torch.tensor([3, 1, 0, 9, 2, 4, 8, 5, 7, 6, 3])  # index 3 twice (padding)
    got = gather_dataset_embeddings(full[idx], idx, 10)
    assert torch.equal(got, full)
    with pytest.raises(ValueError, match=r"2 of 10 data-set indices .*\[5, 7\]"):
        keep = torch.tensor([0, 1, 2, 3, 4, 6, 8, 9])
        gather_dataset_embeddings(full[keep], keep, 10)
    with pytest.raises(ValueError, match="must lie in"):
        gather_dataset_embeddings(full, torch.arange(10) + 1, 10)


def test_distributed_cluster_on_one_process_is_cluster_embeddings():
    x, _ = _planted(5, 20, 8, noise=0.2)
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(1))
    got = distributed_cluster(x[perm], perm, 100, [3, 5], temperature=0.1, iters=5, seed=2)
    want = cluster_embeddings(x, [3, 5], temperature=0.1, iters=5, seed=2)
    for g, w in zip(got, want):
        for name in ("centroids", "assignments", "phi", "sizes"):
            assert torch.equal(getattr(g, name), getattr(w, name))


# ---------------------------------------------------------------- two gloo processes

N_DIST, D_DIST, KS = 200, 16, [5, 12]


def _dist_data() -> torch.Tensor:
    return _planted(8, 25, D_DIST, noise=0.3, seed=4)[0]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        full = _dist_data()
        # different shards of different sizes: rank 0 the even indices (100), rank 1 the odd ones
        # backwards plus index 3 again as sampler padding (101)
        if rank == 0:
            idx = torch.arange(0, N_DIST, 2)
        else:
            idx = torch.cat([torch.arange(1, N_DIST, 2).flip(0), torch.tensor([3])])
        emb = full[idx]
        gathered = gather_dataset_embeddings(emb, idx, N_DIST)
        protos = distributed_cluster(emb, idx, N_DIST, KS, temperature=0.2, iters=20, seed=0)
        try:  # an uncovered index raises on every process (no hang)
            gather_dataset_embeddings(emb[:-2], idx[:-2], N_DIST)
            missing_error = ""
        except ValueError as e:
            missing_error = str(e)
        torch.save(
            {"gathered": gathered, "protos": [vars(p) for p in protos], "missing_error": missing_error},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_gloo_processes_hold_identical_prototypes(tmp_path: Path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    full = _dist_data()
    single = cluster_embeddings(full, KS, temperature=0.2, iters=20, seed=0)
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for r in range(WORLD):
        assert torch.equal(res[r]["gathered"], full)
        assert "data-set indices have no embedding" in res[r]["missing_error"]
        for got, want, k in zip(res[r]["protos"], single, KS):
            assert got["centroids"].shape == (k, D_DIST) and got["assignments"].shape == (N_DIST,)
            assert torch.equal(got["assignments"], want.assignments)
            assert torch.equal(got["sizes"], want.sizes)
            torch.testing.assert_close(got["centroids"], want.centroids)
            torch.testing.assert_close(got["phi"], want.phi)
    # both ranks hold bit-identical prototypes (broadcast from rank 0)
    for p0, p1 in zip(res[0]["protos"], res[1]["protos"]):
        for name in ("centroids", "assignments", "phi", "sizes"):
            assert torch.equal(p0[name], p1[name])
