"""Every matched token pair of a Local-Global step at once, and the loss over all of them (no loop over view pairs).

The loss of :mod:`stratavit.objectives.patch_match.objective` is, over the view pairs (teacher
global view q, student view v ≠ q) and samples b,

    L = mean_(q, v) mean_b [ Σ_m w_m CE(P_t(q, b)[i_m], P_s(v, b)[j_m]) / Σ_m w_m ],

a weighted sum of ``−P_t[i] · log P_s[j]`` over every matched pair (i, j) of the step. With the
tokens of all views flattened into rows (teacher: ``(q · B + b) · T_t + i``, student: global views
first, ``(v · B + b) · T_s + j``, then the local views after the last global row), every pair gets
one weight ``w_m / Σ_m w_m / (B · #view pairs)`` and

    L = −Σ_u A_u · log P_s(u),   A_u = Σ_{pairs (t, u)} weight · P_t(t)   (A = S @ P_t, S sparse),

over the student rows ``u`` that occur in some pair. So the student head only has to map those
rows (every token is mapped on its own, so this equals mapping every token and selecting), the
student log-softmax runs once per used row, and the teacher distributions enter through one
sparse matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from stratavit.data.views import ViewBatch
from stratavit.objectives.patch_match.matching import match_patches


@dataclass
class MatchedPairs:
    """The weighted matched token pairs of all view pairs of a step (padding and zero weights dropped).

    Attributes:
        teacher_rows: (P,) int64 rows of the teacher tokens flattened to (n_g · B · T_t, ·).
        student_rows: (P,) int64 rows of the student tokens flattened, global views first
            ((n_g · B · T_g) rows), then the local views.
        weights: (P,) float32; ``w_m / Σ_m w_m / (B · #view pairs)`` (they sum to 1).
        view_pairs: number of (teacher view, student view) pairs.
        patch_pairs: 0-d float, mean number of matched patch pairs (CLS excluded) per view pair and sample.
    """

    teacher_rows: Tensor
    student_rows: Tensor
    weights: Tensor
    view_pairs: int
    patch_pairs: Tensor


def _stacked(views: list[ViewBatch], order: list[int]) -> tuple[Tensor, Tensor]:
    """Boxes (len(order) · B, 4) and flips (len(order) · B,) of ``views[i]`` for i in ``order``."""
    return torch.cat([views[i].boxes for i in order]), torch.cat([views[i].flips for i in order])


def spread_subset(valid: Tensor, limit: int) -> tuple[Tensor, Tensor]:
    """At most ``limit`` of each row's valid entries, evenly spread in row order, and their weight factor.

    Args:
        valid: (R, M) bool; row ``i`` has ``c_i`` valid entries, ranked ``r = 0 .. c_i − 1`` in column order.
        limit: ``n`` > 0; a row with ``c_i <= n`` keeps all its entries.
    Returns:
        ``keep`` (R, M) bool: the entries of ranks ``floor(j · c_i / n)``, ``j = 0 .. n − 1`` (those whose rank
        ``r`` has ``ceil(r · n / c_i) · c_i < (r + 1) · n``); ``scale`` (R, 1) float ``c_i / min(c_i, n)``, the
        factor that keeps the kept entries' total weight that of all ``c_i`` (1 for rows kept whole).
    """
    count = valid.sum(dim=1, keepdim=True)  # (R, 1)
    rank = valid.long().cumsum(dim=1) - 1
    c = count.clamp_min(1)
    picked = ((rank * limit + c - 1) // c) * c < (rank + 1) * limit
    keep = valid & ((count <= limit) | picked)
    return keep, (count.float() / count.clamp(1, limit).float())


def matched_pairs(
    global_views: list[ViewBatch],
    local_views: list[ViewBatch],
    grid_global: tuple[int, int],
    grid_local: tuple[int, int] | None,
    patch_weight: float,
    max_patch_pairs: int = 0,
) -> MatchedPairs:
    """Match every (teacher global view q, student view v ≠ q) pair of every sample, in two calls of
    :func:`~stratavit.objectives.patch_match.matching.match_patches` (global–global, global–local).

    Args:
        global_views, local_views: the step's view groups (``local_views`` may be empty).
        grid_global, grid_local: their patch grids (``grid_local`` unused without local views).
        patch_weight: weight of a patch pair relative to the CLS pair.
        max_patch_pairs: 0 keeps every matched patch pair (the authors' loss); ``n > 0`` keeps at most ``n``
            per view pair and sample (:func:`spread_subset`), weighted ``c / n`` each so that the CLS pair
            and the patch pairs keep their shares of the loss.
    """
    n_g, n_l = len(global_views), len(local_views)
    b = global_views[0].boxes.shape[0]
    t_tokens = 1 + grid_global[0] * grid_global[1]
    groups = [(global_views, grid_global, [(q, v) for q in range(n_g) for v in range(n_g) if v != q], 0)]
    if n_l:
        assert grid_local is not None
        groups.append((local_views, grid_local, [(q, v) for q in range(n_g) for v in range(n_l)], n_g * b * t_tokens))
    n_pairs = sum(len(pairs) for _, _, pairs, _ in groups)
    t_rows, s_rows, weights, patches = [], [], [], []
    for views, grid, pairs, offset in groups:
        if not pairs:
            continue
        qs, vs = [q for q, _ in pairs], [v for _, v in pairs]
        boxes_a, flips_a = _stacked(global_views, qs)
        boxes_b, flips_b = _stacked(views, vs)
        m = match_patches(boxes_a, flips_a, grid_global, boxes_b, flips_b, grid)  # (len(pairs) · B, M)
        device = m.idx_a.device
        sample = torch.arange(b, device=device).repeat(len(pairs))[:, None]  # (len(pairs) · B, 1)
        q_of = torch.tensor(qs, device=device).repeat_interleave(b)[:, None]
        v_of = torch.tensor(vs, device=device).repeat_interleave(b)[:, None]
        s_tokens = 1 + grid[0] * grid[1]
        w = m.valid.float()
        w[:, 1:] *= patch_weight
        if max_patch_pairs > 0:
            keep, scale = spread_subset(m.valid[:, 1:], max_patch_pairs)
            w[:, 1:] *= keep.float() * scale
        w = w / w.sum(dim=1, keepdim=True) / (b * n_pairs)
        keep = w > 0
        t_rows.append(((q_of * b + sample) * t_tokens + m.idx_a)[keep])
        s_rows.append((offset + (v_of * b + sample) * s_tokens + m.idx_b)[keep])
        weights.append(w[keep])
        patches.append(m.patch_pairs.sum())
    return MatchedPairs(
        torch.cat(t_rows), torch.cat(s_rows), torch.cat(weights), n_pairs,
        torch.stack(patches).sum().float() / max(1, b * n_pairs),
    )


def matched_pair_loss(
    student_logits: Tensor, student_index: Tensor, teacher_probs: Tensor, teacher_index: Tensor, weights: Tensor
) -> Tensor:
    """``−Σ_u A_u · log_softmax(s_u)`` with ``A = S @ teacher_probs`` (no gradient).

    Args:
        student_logits: (U, K) student logits, already divided by τ_s, of the rows that occur in some pair.
        student_index: (P,) row of ``student_logits`` of each pair.
        teacher_probs: (R, K) teacher distributions of the rows that occur in some pair.
        teacher_index: (P,) row of ``teacher_probs`` of each pair.
        weights: (P,) pair weights (the loss is their weighted sum of cross-entropies).
    Returns:
        scalar: ``Σ_p weights[p] · CE(teacher_probs[teacher_index[p]], softmax(student_logits[student_index[p]]))``.
    """
    with torch.no_grad():
        s = torch.sparse_coo_tensor(
            torch.stack([student_index, teacher_index]), weights.to(teacher_probs.dtype),
            (student_logits.shape[0], teacher_probs.shape[0]), check_invariants=False,
        )
        targets = torch.sparse.mm(s, teacher_probs)  # (U, K)
    return -(targets * F.log_softmax(student_logits, dim=-1)).sum()
