"""Data-set clustering for PCL's ProtoNCE: spherical k-means at several granularities and the
per-cluster concentration φ, computed once per epoch from the teacher embeddings of every image.

The E-step of PCL (Li et al. 2021, "Prototypical Contrastive Learning of Unsupervised
Representations") needs, for every granularity K:

* the l2-normalised centroids (K, D) that ProtoNCE uses as prototypes,
* the cluster of every data-set index (N,),
* the concentration φ (K,) that replaces the temperature per prototype.

``cluster_embeddings`` does this on one process; ``distributed_cluster`` gathers the shards of the
data set held by every process, clusters on rank 0 and broadcasts, so that all processes hold
bit-identical prototypes even where floating-point reductions are not deterministic (GPU).

Everything runs on the device of the input tensors and is chunked so that the (N, K) similarity
matrix never exists in full.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from stratavit.distributed import is_distributed, rank, world_size

__all__ = [
    "Prototypes",
    "kmeans",
    "concentration",
    "cluster_embeddings",
    "gather_dataset_embeddings",
    "broadcast_prototypes",
    "distributed_cluster",
]


@dataclass
class Prototypes:
    """One granularity of the clustering of the whole data set (N images, K clusters, D dims).

    Attributes:
        centroids: (K, D) float32, l2-normalised cluster centres (the ProtoNCE prototypes).
        assignments: (N,) int64, ``assignments[i]`` is the cluster of data-set index ``i``.
        phi: (K,) float32, concentration of every cluster (its ProtoNCE temperature);
            ``phi.mean() == temperature``.
        sizes: (K,) int64, number of members of every cluster (``bincount(assignments)``).
    """

    centroids: Tensor
    assignments: Tensor
    phi: Tensor
    sizes: Tensor

    @property
    def num_clusters(self) -> int:
        return self.centroids.shape[0]

    def to(self, device: torch.device | str) -> Prototypes:
        return Prototypes(*(t.to(device) for t in (self.centroids, self.assignments, self.phi, self.sizes)))


def _check_k(k: int, n: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"number of clusters must be a positive integer, got {k!r}")
    if k > n:
        raise ValueError(
            f"cannot make {k} clusters from {n} samples: k-means needs at least as many samples as "
            f"clusters; lower the number of clusters (at most {n}) or cluster more data"
        )


def _assign(x: Tensor, c: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Nearest centroid by dot product, chunked over rows: (assignments (N,) int64, best sim (N,))."""
    n = x.shape[0]
    assign = torch.empty(n, dtype=torch.long, device=x.device)
    best = torch.empty(n, dtype=x.dtype, device=x.device)
    ct = c.t()
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        v, i = torch.mm(x[s:e], ct).max(dim=1)
        best[s:e] = v
        assign[s:e] = i
    return assign, best


def _fill_empty(assign: Tensor, best: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Give every empty cluster one point: the points least similar to their own centroid.

    Points are taken in order of increasing similarity (ties by index), skipping any point whose
    move would empty its own cluster, so every cluster ends non-empty (possible as K <= N). The
    i-th empty cluster (by id) gets the i-th point taken. Deterministic and loop-free.
    """
    empty = (counts == 0).nonzero().squeeze(1)
    n_empty = empty.numel()
    if n_empty == 0:
        return assign, counts
    n = assign.shape[0]
    order = torch.argsort(best, stable=True)  # least similar first
    a_sorted = assign[order]
    # rank of every point among the members of its cluster, in that order
    grouped = torch.argsort(a_sorted, stable=True)
    starts = counts.cumsum(0) - counts
    rank_in = torch.empty_like(order)
    rank_in[grouped] = torch.arange(n, device=assign.device) - starts[a_sorted[grouped]]
    movable = rank_in < counts[a_sorted] - 1  # leaves at least one member behind
    picked = order[movable][:n_empty]
    assign = assign.clone()
    assign[picked] = empty
    return assign, torch.bincount(assign, minlength=counts.shape[0])


def _kmeanspp_init(x: Tensor, k: int, g: torch.Generator, sample: int) -> Tensor:
    """Greedy k-means++ seeding (as scikit-learn: 2 + ⌊ln k⌋ candidates per step, keep the one that
    lowers the potential most) on a random subsample of ``sample`` rows of the normalised ``x``.

    Squared distances on the sphere are 2 − 2·cos. Sampling uses uniforms drawn from ``g`` (CPU) and
    an inverse-CDF search on the device, so no host synchronisation happens inside the loop.
    Returns the indices (k,) into ``x`` of the chosen points.
    """
    n = x.shape[0]
    dev = x.device
    sub = torch.randperm(n, generator=g)[: max(sample, k)].to(dev) if sample < n else None
    s = x[sub] if sub is not None else x
    m = s.shape[0]
    trials = 2 + int(math.log(k))
    first = int(torch.randint(m, (1,), generator=g))
    u = torch.rand(k, trials, generator=g, dtype=torch.float64).to(dev)
    chosen = torch.empty(k, dtype=torch.long, device=dev)
    chosen[0] = first
    d2 = (2 - 2 * (s @ s[first])).clamp_min_(0)
    d2[first] = 0
    for j in range(1, k):
        cum = d2.double().cumsum(0)
        cand = torch.searchsorted(cum, u[j] * cum[-1], right=True).clamp_max_(m - 1)
        d2c = torch.minimum(d2[:, None], (2 - 2 * (s @ s[cand].t())).clamp_min_(0))  # (m, trials)
        d2c[cand, torch.arange(trials, device=dev)] = 0
        b = d2c.sum(0).argmin()
        chosen[j] = cand[b]
        d2 = d2c[:, b]
    return sub[chosen] if sub is not None else chosen


@torch.no_grad()
def kmeans(
    x: Tensor,
    k: int,
    *,
    iters: int = 20,
    seed: int = 0,
    chunk: int = 8192,
    init: str = "k-means++",
    init_sample: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Spherical (cosine) k-means of the rows of ``x`` (N, D).

    The rows are l2-normalised; every iteration assigns each row to the centroid of largest dot
    product (matmul, ``chunk`` rows at a time) and sets each centroid to the l2-normalised mean of its
    members. A cluster left empty is given the point least similar to its own centroid (see
    ``_fill_empty``), so all ``k`` clusters are non-empty. Stops early once the assignments stop
    changing (with fewer distinct points than clusters, split duplicates may swap clusters every
    iteration and run all ``iters``). Deterministic for a given ``seed`` (and device).

    Args:
        x: (N, D) embeddings (any float dtype; computed in float32 on ``x``'s device).
        k: number of clusters, 1 <= k <= N.
        iters: maximum number of assignment / update iterations (>= 1).
        seed: seed of the ``torch.Generator`` used for the initialisation.
        chunk: rows per similarity matmul (bounds memory to chunk × k floats).
        init: ``"k-means++"`` (default; greedy k-means++ seeding on a subsample) or ``"random"``
            (k distinct random rows). Both start from k distinct data points.
        init_sample: rows the k-means++ seeding looks at (default ``min(N, max(4k, 4096))``).

    Returns:
        ``(centroids, assignments)``: (K, D) float32 l2-normalised, (N,) int64 in [0, K). The centroids
        are the normalised means of exactly these assignments; once converged (before ``iters`` runs
        out) every row is also assigned to its most similar centroid.
    """
    if x.ndim != 2:
        raise ValueError(f"kmeans expects a (N, D) tensor, got shape {tuple(x.shape)}")
    n = x.shape[0]
    _check_k(k, n)
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    x = F.normalize(x.detach().float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    if init == "random":
        idx = torch.randperm(n, generator=g)[:k].to(x.device)
    elif init == "k-means++":
        sample = min(n, init_sample if init_sample is not None else max(4 * k, 4096))
        idx = _kmeanspp_init(x, k, g, sample)
    else:
        raise ValueError(f"init must be 'k-means++' or 'random', got {init!r}")
    centroids = x[idx].clone()

    prev = None
    for _ in range(iters):
        assign, best = _assign(x, centroids, chunk)
        counts = torch.bincount(assign, minlength=k)
        assign, counts = _fill_empty(assign, best, counts)
        sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, assign, x)
        centroids = F.normalize(sums, dim=1)
        if prev is not None and torch.equal(assign, prev):
            break
        prev = assign
    return centroids, assign


@torch.no_grad()
def concentration(x: Tensor, assignments: Tensor, k: int, temperature: float, *, chunk: int = 8192) -> Tensor:
    """PCL's per-cluster concentration φ (K,) float32, on ``x``'s device.

    With v_z the l2-normalised rows of ``x`` (N, D) and c the *un-normalised* mean of the members of
    a cluster (as in PCL, whose faiss centroids are plain means):

        φ_c = mean_{z in c} ||v_z − c||₂ / ln(Z_c + 10)          (Z_c: member count)

    then

    * clusters with fewer than 2 members get the largest φ of the clusters with >= 2 members;
    * φ is clipped to [q10, q90], its 10th and 90th percentiles with linear interpolation
      (``torch.quantile``'s default, the same as ``numpy.percentile``'s default used by PCL):
      for sorted values s_0..s_{K-1}, q_p = s_⌊h⌋ + (h − ⌊h⌋)(s_⌊h⌋+1 − s_⌊h⌋), h = p·(K − 1);
    * φ is rescaled so that mean(φ) = ``temperature``.

    Degenerate cases: if no cluster has 2 members, or every φ is 0 (all members on their centroid),
    φ is ``temperature`` everywhere.
    """
    if x.ndim != 2 or assignments.shape != (x.shape[0],):
        raise ValueError(f"expected x (N, D) and assignments (N,), got {tuple(x.shape)} and {tuple(assignments.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = x.shape[0]
    assignments = assignments.to(device=x.device, dtype=torch.long)
    if n and (int(assignments.min()) < 0 or int(assignments.max()) >= k):
        raise ValueError(f"assignments must lie in [0, {k})")
    x = F.normalize(x.detach().float(), dim=1)
    counts = torch.bincount(assignments, minlength=k)
    denom = counts.clamp_min(1).to(x.dtype)
    means = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, assignments, x)
    means /= denom[:, None]
    dist_sum = torch.zeros(k, dtype=x.dtype, device=x.device)
    for s in range(0, n, chunk):
        a = assignments[s : s + chunk]
        dist_sum.index_add_(0, a, (x[s : s + chunk] - means[a]).norm(dim=1))
    phi = dist_sum / denom / torch.log(counts.to(x.dtype) + 10)

    multi = counts >= 2
    if not bool(multi.any()):
        return torch.full((k,), float(temperature), dtype=torch.float32, device=x.device)
    phi = torch.where(multi, phi, phi[multi].max())
    q = torch.quantile(phi, torch.tensor([0.1, 0.9], dtype=phi.dtype, device=phi.device))
    phi = phi.clamp(q[0], q[1])
    mean = phi.mean()
    if not bool(mean > 0):
        return torch.full((k,), float(temperature), dtype=torch.float32, device=x.device)
    return (temperature * phi / mean).float()


@torch.no_grad()
def cluster_embeddings(
    x: Tensor, num_clusters: Sequence[int], *, temperature: float, iters: int = 20, seed: int = 0
) -> list[Prototypes]:
    """PCL's E-step on one process: one ``Prototypes`` per entry of ``num_clusters``.

    ``x`` (N, D) holds the embeddings of the whole data set (row i = data-set index i); it is
    l2-normalised, then clustered with ``kmeans(x, K_i, iters=iters, seed=seed + i)`` and φ is
    ``concentration(x, assignments, K_i, temperature)``. Runs on ``x``'s device.
    """
    if x.ndim != 2:
        raise ValueError(f"cluster_embeddings expects a (N, D) tensor, got shape {tuple(x.shape)}")
    for k in num_clusters:
        _check_k(k, x.shape[0])
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    x = F.normalize(x.detach().float(), dim=1)
    out = []
    for i, k in enumerate(num_clusters):
        centroids, assign = kmeans(x, k, iters=iters, seed=seed + i)
        phi = concentration(x, assign, k, temperature)
        out.append(Prototypes(centroids, assign, phi, torch.bincount(assign, minlength=k)))
    return out


@torch.no_grad()
def gather_dataset_embeddings(local_emb: Tensor, local_idx: Tensor, n_total: int) -> Tensor:
    """Assemble the embeddings of the whole data set, (n_total, D), identical on every process.

    Each process passes the embeddings ``local_emb`` (n_local, D) of the data-set indices
    ``local_idx`` (n_local,) it computed; counts may differ between processes and indices may repeat
    (sampler padding). The counts are exchanged, the shards padded to the largest count and
    all-gathered, and every row is written at its index; for a repeated index the first occurrence
    (in rank order, then local order) wins, so the result does not depend on scatter order. Without
    ``torch.distributed`` the local rows are scattered alone.

    Raises ``ValueError`` (on every process alike) if an index is outside [0, n_total), if shapes
    disagree, or if some index in [0, n_total) is covered by no process.
    """
    local_emb = local_emb.detach()
    dev = local_emb.device
    d = local_emb.shape[1] if local_emb.ndim == 2 else -1
    meta = torch.tensor([local_emb.shape[0], local_idx.numel(), d], dtype=torch.long, device=dev)
    if is_distributed():
        metas = [torch.empty_like(meta) for _ in range(world_size())]
        dist.all_gather(metas, meta)
    else:
        metas = [meta]
    metas_l = [m.tolist() for m in metas]
    dims = {m[2] for m in metas_l}
    if any(m[0] != m[1] for m in metas_l) or -1 in dims or len(dims) != 1 or local_idx.ndim != 1:
        raise ValueError(
            "every process must pass local_emb (n_local, D) and local_idx (n_local,) with the same D; "
            f"got (rows, indices, D) per process = {metas_l}"
        )
    local_idx = local_idx.to(device=dev, dtype=torch.long)
    if is_distributed():
        counts = [m[0] for m in metas_l]
        max_n = max(counts)
        emb_pad = local_emb.new_zeros(max_n, d)
        emb_pad[: local_emb.shape[0]] = local_emb
        idx_pad = local_idx.new_full((max_n,), -1)
        idx_pad[: local_idx.shape[0]] = local_idx
        embs = [torch.empty_like(emb_pad) for _ in counts]
        idxs = [torch.empty_like(idx_pad) for _ in counts]
        dist.all_gather(embs, emb_pad.contiguous())
        dist.all_gather(idxs, idx_pad.contiguous())
        emb = torch.cat([e[:c] for e, c in zip(embs, counts)])
        idx = torch.cat([i[:c] for i, c in zip(idxs, counts)])
    else:
        emb, idx = local_emb, local_idx

    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_total):
        raise ValueError(f"data-set indices must lie in [0, {n_total}), got [{int(idx.min())}, {int(idx.max())}]")
    # keep the first occurrence of every index (stable sort), so duplicates resolve deterministically
    sorted_idx, perm = torch.sort(idx, stable=True)
    first = torch.ones_like(sorted_idx, dtype=torch.bool)
    first[1:] = sorted_idx[1:] != sorted_idx[:-1]
    keep = perm[first]
    out = emb.new_zeros(n_total, d)
    out[idx[keep]] = emb[keep]
    if keep.numel() != n_total:
        covered = torch.zeros(n_total, dtype=torch.bool, device=dev)
        covered[idx] = True
        missing = (~covered).nonzero().squeeze(1)
        raise ValueError(
            f"{missing.numel()} of {n_total} data-set indices have no embedding on any process "
            f"(first missing: {missing[:10].tolist()}); every index must be covered by some process's shard"
        )
    return out


_FIELDS = (("centroids", torch.float32), ("assignments", torch.long), ("phi", torch.float32), ("sizes", torch.long))


@torch.no_grad()
def broadcast_prototypes(protos: list[Prototypes], src: int = 0) -> list[Prototypes]:
    """Make every process hold rank ``src``'s prototypes (returns them; a no-op on one process).

    Every process must pass a list of the same length, with tensors on the device its backend
    communicates from (CPU for gloo, the current GPU for NCCL); the contents and shapes on the other
    ranks are ignored: the shapes are broadcast first and fresh tensors allocated.
    """
    if not is_distributed():
        return list(protos)
    if not protos:
        return []
    dev = protos[0].centroids.device
    is_src = rank() == src
    shapes = torch.tensor(
        [s for p in protos for s in (*p.centroids.shape, p.assignments.shape[0])], dtype=torch.long, device=dev
    )
    dist.broadcast(shapes, src=src)
    out = []
    for i, p in enumerate(protos):
        k, d, n = shapes[3 * i : 3 * i + 3].tolist()
        shape = {"centroids": (k, d), "assignments": (n,), "phi": (k,), "sizes": (k,)}
        fields = {}
        for name, dtype in _FIELDS:
            if is_src:
                t = getattr(p, name).to(device=dev, dtype=dtype).contiguous()
            else:
                t = torch.empty(shape[name], dtype=dtype, device=dev)
            dist.broadcast(t, src=src)
            fields[name] = t
        out.append(Prototypes(**fields))
    return out


@torch.no_grad()
def distributed_cluster(
    local_emb: Tensor,
    local_idx: Tensor,
    n_total: int,
    num_clusters: Sequence[int],
    *,
    temperature: float,
    iters: int = 20,
    seed: int = 0,
) -> list[Prototypes]:
    """PCL's E-step across processes: gather the whole data set's embeddings on every process
    (``gather_dataset_embeddings``), cluster on rank 0 (``cluster_embeddings``; the other ranks wait
    in the broadcast), then broadcast, so every process returns identical prototypes.

    On one process this is ``cluster_embeddings(gather_dataset_embeddings(...), ...)``. Argument
    errors (too many clusters, uncovered indices) are raised on every process before any clustering.
    """
    for k in num_clusters:
        _check_k(k, n_total)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    full = gather_dataset_embeddings(local_emb, local_idx, n_total)
    if rank() == 0:
        protos = cluster_embeddings(full, num_clusters, temperature=temperature, iters=iters, seed=seed)
    else:
        dev, d = full.device, full.shape[1]
        protos = [
            Prototypes(
                torch.empty(k, d, device=dev),
                torch.empty(n_total, dtype=torch.long, device=dev),
                torch.empty(k, device=dev),
                torch.empty(k, dtype=torch.long, device=dev),
            )
            for k in num_clusters
        ]
    return broadcast_prototypes(protos, src=0)
