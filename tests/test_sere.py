"""SERE (``self_relation``): relation math, overlap resampling, masking of disjoint crops, modules,
an independent per-pair re-implementation of the whole loss, the recipe and an engine step."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stratavit.backbones.features import LevelFeatures
from stratavit.backbones.vit import Backbone
from stratavit.config import BackboneConfig, ConfigError, to_dict
from stratavit.data.geometry import patch_centers_in_source
from stratavit.data.views import (
    MultiCropTransform,
    MultiViewBatch,
    ViewBatch,
    collate_views,
)
from stratavit.objectives import OBJECTIVES, StepState, ViewFeatures
from stratavit.objectives.self_relation import (
    SelfRelation,
    SelfRelationConfig,
    aligned_samples,
    channel_pair_cross_entropy,
    channel_relation,
    overlap_points,
    relation_cross_entropy,
    resample_relation,
    sample_maps,
    sampling_grid,
    spatial_pair_losses,
    spatial_relation,
    tokens_to_map,
)
from stratavit.recipe import resolve_config

C, HEADS = 16, 4


def _state() -> StepState:
    return StepState(step=0, epoch=0, steps_per_epoch=10, total_steps=100)


def _backbone() -> Backbone:
    return Backbone(
        BackboneConfig(arch="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=C, depth=1, num_heads=HEADS)
    )


# ------------------------------------------------------------------------------ relation math


def test_channel_relation_matches_numpy():
    u = torch.randn(3, 5, 7, dtype=torch.float64)
    got = channel_relation(u).numpy()
    un = u.numpy()
    want = np.stack([un[m] @ un[m].T / 7 for m in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_spatial_relation_is_per_head_and_scaled_like_attention():
    m, c, n, heads = 2, 12, 5, 3
    u = torch.randn(m, c, n, dtype=torch.float64)
    got = spatial_relation(u, heads).numpy()
    un = u.numpy()
    d = c // heads
    want = np.zeros((m, heads, n, n))
    for i in range(m):
        for h in range(heads):
            uh = un[i, h * d : (h + 1) * d]  # (d, N): head h owns channels [h d, (h+1) d)
            want[i, h] = uh.T @ uh / math.sqrt(d)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    # the scaling is sqrt(C/H), not sqrt(C): one head of all channels is sqrt(H) times smaller per entry sum
    one_head = spatial_relation(u, 1).numpy()[:, 0]
    np.testing.assert_allclose(one_head, want.sum(1) * math.sqrt(d) / math.sqrt(c), rtol=1e-12)
    with pytest.raises(ValueError, match="heads"):
        spatial_relation(u, 5)


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_cross_entropy_and_channel_pairs_match_numpy():
    t = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    s = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    got = channel_pair_cross_entropy(t / 0.1, [s[:2], s[2:]]).numpy()  # two student view groups
    pt = np.exp(_np_log_softmax(t.numpy() / 0.1))
    ls = _np_log_softmax(s.numpy())
    want = np.array([[-(pt[q] * ls[v]).sum(-1).mean() for v in range(3)] for q in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-10)
    ce = relation_cross_entropy(t[0], s[0], 0.5, 2.0).numpy()
    np.testing.assert_allclose(ce, -(np.exp(_np_log_softmax(t[0].numpy() / 0.5)) * _np_log_softmax(s[0].numpy() / 2.0)).sum(-1))


def test_tokens_to_map_is_row_major():
    tokens = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)
    m = tokens_to_map(tokens, (2, 3))
    assert m.shape == (2, 3, 2, 3)
    assert torch.equal(m[1, :, 1, 2], tokens[1, 5])
    with pytest.raises(ValueError):
        tokens_to_map(tokens, (2, 2))


# ------------------------------------------------------------------------------ geometry


def test_overlap_points_hand_case():
    a = torch.tensor([0.0, 0.0, 10.0, 10.0])
    b = torch.tensor([5.0, 4.0, 20.0, 20.0])
    pts, valid = overlap_points(a, b, 3)
    assert bool(valid)
    xs = torch.tensor([5.0, 7.5, 10.0])
    ys = torch.tensor([4.0, 7.0, 10.0])
    want = torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], dim=-1).reshape(9, 2)  # row-major, (x, y)
    assert torch.allclose(pts, want)
    centre, _ = overlap_points(a, b, 1)
    assert torch.allclose(centre, torch.tensor([[7.5, 7.0]]))
    _, valid = overlap_points(a, torch.tensor([10.0, 0.0, 20.0, 10.0]), 3)  # touching edges only
    assert not bool(valid)


def _np_reference_grid(box, flip, overlap, g):
    """The reference's per-sample convention, written out: overlap edges, fractions of the crop, flip, 2x-1."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    fx = [(overlap[0] - x0) / w + i * (overlap[2] - overlap[0]) / w / (g - 1) for i in range(g)]
    fy = [(overlap[1] - y0) / h + i * (overlap[3] - overlap[1]) / h / (g - 1) for i in range(g)]
    out = np.zeros((g, g, 2))
    for r in range(g):
        for c in range(g):
            x = 1 - fx[c] if flip else fx[c]
            out[r, c] = (2 * x - 1, 2 * fy[r] - 1)
    return out.reshape(g * g, 2)


def test_sampling_grid_matches_the_reference_convention():
    box_a, box_b = [3.0, 5.0, 40.0, 33.0], [10.0, 0.0, 52.0, 30.0]
    overlap = [10.0, 5.0, 40.0, 30.0]
    for flip in (False, True):
        pts, _ = overlap_points(torch.tensor(box_a, dtype=torch.float64), torch.tensor(box_b, dtype=torch.float64), 5)
        got = sampling_grid(pts, torch.tensor(box_a, dtype=torch.float64), torch.tensor(flip), (16, 16)).numpy()
        np.testing.assert_allclose(got, _np_reference_grid(box_a, flip, overlap, 5), atol=1e-12)


def _coordinate_maps(boxes: torch.Tensor, flips: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(V, B, 4), (V, B) -> (V, B, 2, h, w): each token's feature is the source (x, y) of its patch centre."""
    v, b = flips.shape
    centres = patch_centers_in_source(boxes.reshape(-1, 4), flips.reshape(-1), grid, size)  # (V·B, h·w, 2)
    return centres.transpose(1, 2).reshape(v, b, 2, *grid)


def test_resampled_grids_of_both_views_sample_the_same_source_points():
    # global A (unflipped), global B (flipped), local L inside A (one flipped sample, one not)
    g_boxes = torch.tensor([[[0.0, 0.0, 48.0, 40.0], [4.0, 6.0, 60.0, 50.0]], [[16.0, 8.0, 64.0, 64.0], [0.0, 0.0, 30.0, 64.0]]])
    g_flips = torch.tensor([[False, True], [True, False]])
    l_boxes = torch.tensor([[[20.0, 12.0, 36.0, 28.0], [10.0, 20.0, 22.0, 40.0]]])
    l_flips = torch.tensor([[True, False]])
    g_grid, l_grid, g_size, l_size = (8, 8), (4, 4), (32, 32), (16, 16)
    g_maps = _coordinate_maps(g_boxes, g_flips, g_grid, g_size)
    l_maps = _coordinate_maps(l_boxes, l_flips, l_grid, l_size)

    for s_maps, s_boxes, s_flips, s_size, s_grid, grid_size in (
        (g_maps, g_boxes, g_flips, g_size, g_grid, 7),
        (l_maps, l_boxes, l_flips, l_size, l_grid, 4),
    ):
        t, s, valid = aligned_samples(g_maps, g_boxes, g_flips, g_size, s_maps, s_boxes, s_flips, s_size, grid_size)
        points, _ = overlap_points(g_boxes[:, None], s_boxes[None], grid_size)  # (Vt, Vs, B, P, 2)
        assert valid.all()
        t_pts, s_pts = t.transpose(-2, -1), s.transpose(-2, -1)  # (Vt, Vs, B, P, 2)
        # within half a patch (in source px) of the true overlap point, in each view; exact inside
        t_patch = (g_boxes[..., 2:] - g_boxes[..., :2]) / torch.tensor(g_grid[::-1], dtype=torch.float32)
        s_patch = (s_boxes[..., 2:] - s_boxes[..., :2]) / torch.tensor(s_grid[::-1], dtype=torch.float32)
        t_err = (t_pts - points).abs() / t_patch[:, None, :, None, :]
        s_err = (s_pts - points).abs() / s_patch[None, :, :, None, :]
        assert t_err.max() <= 0.5 + 1e-5 and s_err.max() <= 0.5 + 1e-5
        both = 0.5 * (t_patch[:, None, :, None, :] + s_patch[None, :, :, None, :])
        assert ((t_pts - s_pts).abs() <= both + 1e-5).all()
        # points at least half a patch inside both crops are interpolated exactly
        def inside(boxes, patch):
            lo, hi = boxes[..., None, :2] + patch[..., None, :] / 2, boxes[..., None, 2:] - patch[..., None, :] / 2
            return lambda p: ((p >= lo - 1e-4) & (p <= hi + 1e-4)).all(-1)

        interior = inside(g_boxes[:, None], t_patch[:, None])(points) & inside(s_boxes[None], s_patch[None])(points)
        assert interior.sum() > 10
        assert torch.allclose(t_pts[interior], points[interior], atol=1e-4)
        assert torch.allclose(s_pts[interior], points[interior], atol=1e-4)


def test_local_crop_inside_global_crop_samples_its_own_token_centres():
    # A 16 px local view (4x4 tokens) whose box is exactly 4x4 global patches of an unflipped 8x8 global view:
    # with G = 4 the overlap grid spans the local crop edge to edge, so interior samples hit exact positions.
    g_box = torch.tensor([[[0.0, 0.0, 32.0, 32.0]]])
    l_box = torch.tensor([[[8.0, 8.0, 24.0, 24.0]]])
    for flip in (False, True):
        g_flip, l_flip = torch.tensor([[flip]]), torch.tensor([[not flip]])
        g_maps = _coordinate_maps(g_box, g_flip, (8, 8), (32, 32))
        l_maps = _coordinate_maps(l_box, l_flip, (4, 4), (16, 16))
        t, s, valid = aligned_samples(g_maps, g_box, g_flip, (32, 32), l_maps, l_box, l_flip, (16, 16), 4)
        assert valid.all()
        want_x = torch.linspace(8, 24, 4).repeat(4)
        want_y = torch.linspace(8, 24, 4).repeat_interleave(4)
        # the global view samples exactly (every point is >= half a global patch inside it)
        assert torch.allclose(t[0, 0, 0, 0], want_x, atol=1e-4) and torch.allclose(t[0, 0, 0, 1], want_y, atol=1e-4)
        # the local view: exact inside, clamped to the nearest token centre on its border band
        assert torch.allclose(s[0, 0, 0, 0], want_x.clamp(10, 22), atol=1e-4)
        assert torch.allclose(s[0, 0, 0, 1], want_y.clamp(10, 22), atol=1e-4)


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_relation_of_sampled_features_equals_resampled_relation(padding):
    maps = torch.randn(3, 8, 5, 4, dtype=torch.float64)
    grids = torch.rand(3, 9, 2, dtype=torch.float64) * 2.4 - 1.2
    full = spatial_relation(maps.flatten(2), 2)
    ref = resample_relation(full, (5, 4), grids, padding)  # the reference's two grid_samples on the N x N map
    ours = spatial_relation(sample_maps(maps, grids[:, None], padding)[:, 0], 2)
    assert torch.allclose(ref, ours, atol=1e-12)


# ------------------------------------------------------------------------------ losses


def test_identity_pair_gives_the_teacher_entropy_and_a_permuted_student_more():
    torch.manual_seed(0)
    b, g = 2, 4
    maps = torch.randn(1, b, C, 5, 5)
    boxes = torch.tensor([[[0.0, 0.0, 20.0, 20.0], [3.0, 1.0, 19.0, 17.0]]])
    flips = torch.tensor([[False, True]])
    t, s, valid = aligned_samples(maps, boxes, flips, (20, 20), maps, boxes, flips, (20, 20), g)
    loss = spatial_pair_losses(t[0], s[0], valid[0], HEADS, 1.0, 1.0)
    pt = F.softmax(spatial_relation(t[0, 0].reshape(b, C, g * g), HEADS), dim=-1)
    entropy = -(pt * pt.log()).sum(-1).mean()
    assert loss.item() == pytest.approx(entropy.item(), rel=1e-5)
    permuted = s[..., torch.randperm(g * g, generator=torch.Generator().manual_seed(1))]
    assert spatial_pair_losses(t[0], permuted[0], valid[0], HEADS, 1.0, 1.0).item() > loss.item() + 1e-3
    # the channel loss likewise
    rel = channel_relation(maps.flatten(3))
    ch = channel_pair_cross_entropy(rel, [rel])[0, 0]
    pc = F.softmax(rel, dim=-1)
    assert ch.item() == pytest.approx(-(pc * pc.log()).sum(-1).mean().item(), rel=1e-5)
    perm = torch.randperm(C, generator=torch.Generator().manual_seed(2))
    assert channel_pair_cross_entropy(rel, [rel[..., perm, :][..., perm]])[0, 0] > ch + 1e-3


def test_non_overlapping_samples_give_zero_loss_and_zero_gradient():
    torch.manual_seed(0)
    b = 3
    t_maps = torch.randn(1, b, C, 4, 4)
    s_maps = torch.randn(1, b, C, 4, 4, requires_grad=True)
    t_boxes = torch.tensor([[[0.0, 0.0, 20.0, 20.0]] * b])
    s_boxes = torch.tensor([[[5.0, 5.0, 30.0, 30.0], [25.0, 25.0, 40.0, 40.0], [0.0, 10.0, 12.0, 30.0]]])  # sample 1 is disjoint
    flips = torch.zeros(1, b, dtype=torch.bool)
    t, s, valid = aligned_samples(t_maps, t_boxes, flips, (16, 16), s_maps, s_boxes, flips, (16, 16), 3)
    assert valid[0, 0].tolist() == [True, False, True]
    loss = spatial_pair_losses(t[0], s[0], valid[0], HEADS, 0.5, 1.0)
    loss.sum().backward()
    grad = s_maps.grad[0]
    assert torch.count_nonzero(grad[1]) == 0
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0
    # the disjoint sample adds nothing; the denominator is still the whole batch (the reference's)
    alone = [spatial_pair_losses(t[0][:, [i]], s[0][:, [i]], valid[0][:, [i]], HEADS, 0.5, 1.0) for i in (0, 2)]
    assert loss.item() == pytest.approx((alone[0] + alone[1]).item() / 3, rel=1e-5)


# ------------------------------------------------------------------------------ the objective


def _view_batch(boxes: torch.Tensor, flips: torch.Tensor, size: int) -> ViewBatch:
    b = boxes.shape[0]
    return ViewBatch(torch.zeros(b, 3, size, size), boxes, flips, torch.full((b, 2), 64.0))


def _case(b: int = 3, n_g: int = 2, n_l: int = 2, seed: int = 0, disjoint: bool = False):
    """Random pre-norm tokens for an 8x8 global / 4x4 local grid and random crops of a 64 px image."""
    gen = torch.Generator().manual_seed(seed)

    def boxes(n: int, lo: float, hi: float, offset: float = 0.0) -> torch.Tensor:
        wh = lo + (hi - lo) * torch.rand(n, b, 2, generator=gen)
        xy = torch.rand(n, b, 2, generator=gen) * (64 - wh)
        if disjoint:
            wh, xy = torch.full((n, b, 2), 10.0), torch.full((n, b, 2), offset)
        return torch.cat([xy, xy + wh], dim=-1)

    g_boxes = boxes(n_g, 24, 44) if not disjoint else torch.cat([boxes(1, 0, 0, 0.0), boxes(n_g - 1, 0, 0, 40.0)])
    l_boxes = boxes(n_l, 6, 20, 20.0)
    g_flips = torch.rand(n_g, b, generator=gen) < 0.5
    l_flips = torch.rand(n_l, b, generator=gen) < 0.5
    mv = MultiViewBatch(
        [_view_batch(g_boxes[i], g_flips[i], 32) for i in range(n_g)],
        [_view_batch(l_boxes[i], l_flips[i], 16) for i in range(n_l)],
        torch.zeros(b, dtype=torch.long),
        torch.arange(b),
    )
    bb = _backbone()
    lv = bb.depth

    def tok(n: int, side: int) -> torch.Tensor:  # (n·B, 1 + side², C) pre-norm CLS + patch tokens
        return torch.randn(n * b, 1 + side * side, C, generator=gen)

    s_global = {lv: LevelFeatures(tok(n_g, 8), (8, 8), bb.vit.norm)}
    s_local = {lv: LevelFeatures(tok(n_l, 4), (4, 4), bb.vit.norm)} if n_l else None
    t_global = {lv: LevelFeatures(tok(n_g, 8), (8, 8), bb.vit.norm)}
    student = ViewFeatures(s_global, s_local, n_g, n_l, mv)
    teacher = ViewFeatures(t_global, None, n_g, 0, mv)
    return bb, student, teacher


def _objective(bb: Backbone, **kw) -> tuple[SelfRelation, torch.nn.Module]:
    """The objective and a detached copy of its teacher side (what the engine's EMA teacher holds)."""
    obj = SelfRelation(SelfRelationConfig(**kw), bb)
    return obj, copy.deepcopy(obj.teacher_head())


def _reference_style_loss(obj: SelfRelation, student: ViewFeatures, teacher: ViewFeatures, head, padding: str):
    """An independent re-implementation: full N x N relations, per-sample grids written out in Python
    (the reference's convention), the reference's two-axis resampling, a loop over pairs."""
    cfg = obj.cfg
    lv = obj.levels[0]
    n_g, n_l = student.n_global, student.n_local
    xs = tokens_to_map(student.global_[lv].patches_pre, (8, 8))
    xt = tokens_to_map(teacher.global_[lv].patches_pre, (8, 8))
    xl = tokens_to_map(student.local[lv].patches_pre, (4, 4)) if n_l else None
    b = xs.shape[0] // n_g
    s_ch = list(obj.channel(xs)[1].chunk(n_g)) + (list(obj.channel_local(xl)[1].chunk(n_l)) if n_l else [])
    s_sp = list(obj.spatial(xs)[1].chunk(n_g)) + (list(obj.spatial_local(xl)[1].chunk(n_l)) if n_l else [])
    t_ch = head["channel"](xt).chunk(n_g)
    t_sp = head["spatial"](xt).chunk(n_g)
    views = student.batch.global_views + student.batch.local_views
    total_ch, total_sp, terms, overlaps = 0.0, 0.0, 0, []
    for q in range(n_g):
        for v in range(n_g + n_l):
            if v == q:
                continue
            terms += 1
            # channel
            rt = channel_relation(t_ch[q].flatten(2))
            rs = channel_relation(s_ch[v].flatten(2))
            total_ch = total_ch + relation_cross_entropy(rt, rs, cfg.channel_teacher_temp, cfg.student_temp).mean()
            # spatial
            g = 7 if v < n_g else 4
            s_grid_hw = (8, 8) if v < n_g else (4, 4)
            full_t = spatial_relation(t_sp[q].flatten(2), HEADS)
            full_s = spatial_relation(s_sp[v].flatten(2), HEADS)
            per_sample = []
            for i in range(b):
                bq, bv = views[q].boxes[i].tolist(), views[v].boxes[i].tolist()
                ov = [max(bq[0], bv[0]), max(bq[1], bv[1]), min(bq[2], bv[2]), min(bq[3], bv[3])]
                overlaps.append(ov[0] < ov[2] and ov[1] < ov[3])
                if not overlaps[-1]:
                    per_sample.append(torch.zeros(()))
                    continue
                gq = torch.tensor(_np_reference_grid(bq, bool(views[q].flips[i]), ov, g), dtype=torch.float32)
                gv = torch.tensor(_np_reference_grid(bv, bool(views[v].flips[i]), ov, g), dtype=torch.float32)
                rt = resample_relation(full_t[[i]], (8, 8), gq[None], padding)
                rs = resample_relation(full_s[[i]], s_grid_hw, gv[None], padding)
                per_sample.append(relation_cross_entropy(rt, rs, cfg.spatial_teacher_temp, cfg.student_temp).mean())
            total_sp = total_sp + torch.stack(per_sample).sum() / b
    return total_sp / terms, total_ch / terms, sum(overlaps) / len(overlaps)


@pytest.mark.parametrize("padding", ["border", "zeros"])
def test_objective_matches_a_per_pair_reference_style_implementation(padding):
    bb, student, teacher = _case(b=3, n_g=2, n_l=2)
    obj, head = _objective(bb, padding=padding)
    out = obj(student, teacher, head, _state())
    sp, ch, frac = _reference_style_loss(obj, student, teacher, head, padding)
    assert float(out.metrics["sere/overlap_frac"]) == pytest.approx(frac) and 0.0 < frac < 1.0  # some pairs are disjoint
    assert float(out.metrics["sere/spatial"]) == pytest.approx(sp.item(), rel=1e-4)
    assert float(out.metrics["sere/channel"]) == pytest.approx(ch.item(), rel=1e-4)
    assert out.loss.item() == pytest.approx(0.2 * sp.item() + 0.5 * ch.item(), rel=1e-4)


def test_objective_gradients_match_the_per_pair_reference_style_implementation():
    """The batched objective (temperatures folded into the relations, per-group channel products) has the
    gradients of the per-pair reference: on the student tokens and on every module parameter."""
    bb, student, teacher = _case(b=3, n_g=2, n_l=2, seed=4)
    for f in (student.global_, student.local):
        for lf in f.values():
            lf.tokens_pre.requires_grad_(True)
    obj, head = _objective(bb, student_temp=0.7)
    params = [p for p in obj.parameters() if p.requires_grad]
    leaves = [student.global_[bb.depth].tokens_pre, student.local[bb.depth].tokens_pre]
    out = obj(student, teacher, head, _state())
    got = torch.autograd.grad(out.loss, leaves + params, allow_unused=True)
    sp, ch, _ = _reference_style_loss(obj, student, teacher, head, obj.cfg.padding)
    want = torch.autograd.grad(0.2 * sp + 0.5 * ch, leaves + params, allow_unused=True)
    assert out.loss.item() == pytest.approx((0.2 * sp + 0.5 * ch).item(), rel=1e-4)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            assert float((g - w).norm()) <= 1e-4 * float(w.norm()) + 1e-8


def test_objective_three_global_views_and_no_locals():
    bb, student, teacher = _case(b=2, n_g=3, n_l=0)
    obj, head = _objective(bb)
    out = obj(student, teacher, head, _state())
    sp, ch, _ = _reference_style_loss(obj, student, teacher, head, obj.cfg.padding)
    assert obj.cfg.padding == "zeros"  # the reference's default
    assert float(out.metrics["sere/spatial"]) == pytest.approx(sp.item(), rel=1e-4)
    assert float(out.metrics["sere/channel"]) == pytest.approx(ch.item(), rel=1e-4)


def test_objective_disjoint_crops_zero_spatial_loss_and_gradient():
    bb, student, teacher = _case(b=2, n_g=2, n_l=2, disjoint=True)
    obj, head = _objective(bb, beta=0.0)
    out = obj(student, teacher, head, _state())
    assert float(out.metrics["sere/overlap_frac"]) == 0.0
    assert out.loss.item() == 0.0 and float(out.metrics["sere/channel"]) > 0
    out.loss.backward()
    for p in obj.parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0


def test_local_views_have_their_own_modules():
    bb, student, teacher = _case(b=3, n_g=2, n_l=2)
    obj, head = _objective(bb)
    glob = {id(p) for m in (obj.channel, obj.spatial) for p in m.parameters()}
    loc = {id(p) for m in (obj.channel_local, obj.spatial_local) for p in m.parameters()}
    assert glob and loc and not glob & loc
    # the teacher side is the global projections only
    t_side = obj.teacher_head()
    assert set(t_side.keys()) == {"channel", "spatial"}
    assert t_side["channel"] is obj.channel.projection and t_side["spatial"] is obj.spatial.projection
    assert all(not isinstance(m, torch.nn.Conv2d) for m in t_side.modules())
    out = obj(student, teacher, head, _state())
    out.loss.backward()
    for m in (obj.channel_local, obj.spatial_local, obj.channel, obj.spatial):
        assert m.predictor[0].weight.grad is not None and m.predictor[0].weight.grad.abs().sum() > 0
    # without local views the local modules get no gradient
    obj.zero_grad(set_to_none=True)
    bb, student, teacher = _case(b=3, n_g=2, n_l=0)
    obj(student, teacher, head, _state()).loss.backward()
    assert obj.channel_local.predictor[0].weight.grad is None and obj.spatial_local.predictor[0].weight.grad is None
    shared, _ = _objective(bb, separate_local_modules=False)
    assert shared.channel_local is None and shared.spatial_local is None


def test_config_checks_and_defaults():
    bb = _backbone()
    cfg = SelfRelationConfig()
    assert (cfg.alpha, cfg.beta, cfg.spatial_teacher_temp, cfg.channel_teacher_temp, cfg.student_temp) == (0.2, 0.5, 0.5, 0.1, 1.0)
    assert SelfRelation(cfg, bb).num_heads == HEADS
    with pytest.raises(ConfigError, match="heads"):
        SelfRelation(SelfRelationConfig(num_heads=3), bb)
    with pytest.raises(ConfigError, match="grid_local"):
        SelfRelation(SelfRelationConfig(grid_local=0), bb)
    deeper = Backbone(BackboneConfig(arch="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=C, depth=2, num_heads=HEADS))
    with pytest.raises(ConfigError, match="one level"):
        SelfRelation(SelfRelationConfig(levels=[1, -1]), deeper)


# ------------------------------------------------------------------------------ recipe and engine

TINY = [
    "backbone.arch=vit_tiny_patch16_224", "backbone.img_size=32", "backbone.patch_size=4", "backbone.embed_dim=32",
    "backbone.depth=2", "backbone.num_heads=4", "views.global_size=32", "views.local_size=16", "views.local_crops=2",
    "data.batch_size=4", "objectives.ibot_mim.out_dim=64", "objectives.ibot_mim.hidden_dim=32",
    "objectives.ibot_mim.bottleneck_dim=16",
]


def test_recipe_resolves(monkeypatch):
    monkeypatch.setitem(OBJECTIVES, SelfRelation.name, SelfRelation)
    cfg = resolve_config("sere", ["objectives.self_relation.grid_global=5"])
    sr, ib = cfg.objectives["self_relation"], cfg.objectives["ibot_mim"]
    assert isinstance(sr, SelfRelationConfig) and sr.grid_global == 5 and sr.padding == "zeros"
    assert ib.weight == pytest.approx((4 - sr.alpha - sr.beta) / 2)
    assert cfg.views.local_crops == 10 and tuple(cfg.views.global_scale) == (0.4, 1.0)
    assert cfg.optim.clip_grad == 0.3 and cfg.optim.clip_mode == "per_tensor" and cfg.train.epochs == 100
    with pytest.raises(ConfigError):
        resolve_config("sere", ["objectives.self_relation.padding=reflect"])


def _batch(cfg, n: int = 4) -> MultiViewBatch:
    tf = MultiCropTransform(cfg.views, patch_size=cfg.backbone.patch_size)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]
    return collate_views([(tf(img), 0, i) for i, img in enumerate(images)])


def test_engine_step_with_ibot(monkeypatch):
    from stratavit.engine.module import PretrainModule

    monkeypatch.setitem(OBJECTIVES, SelfRelation.name, SelfRelation)
    torch.manual_seed(0)
    cfg = resolve_config("sere", TINY)
    module = PretrainModule(to_dict(cfg))
    obj = module.objectives["self_relation"]
    assert module.uses_local and module._masker == "ibot_mim"
    assert set(module.teacher.heads.keys()) == {"ibot_mim", "self_relation"}
    batch = _batch(cfg)
    total, logs = module.compute_losses(batch)
    assert torch.isfinite(total)
    for key in ("sere/spatial", "sere/channel", "sere/overlap_frac", "loss/self_relation", "loss/ibot_mim"):
        assert key in logs
    assert float(logs["sere/spatial"]) > 0 and float(logs["sere/channel"]) > 0
    assert 0.0 <= float(logs["sere/overlap_frac"]) <= 1.0
    total.backward()
    for m in (obj.channel, obj.spatial, obj.channel_local, obj.spatial_local):
        assert m.predictor[0].weight.grad is not None
    assert module.backbone.vit.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0
    before = module.teacher.heads["self_relation"]["channel"][0].weight.clone()
    with torch.no_grad():
        obj.channel.projection[0].weight.add_(1.0)
    module.teacher.update(module.backbone, module._student_heads, 0.5)
    after = module.teacher.heads["self_relation"]["channel"][0].weight
    assert torch.allclose(after, before * 0.5 + obj.channel.projection[0].weight * 0.5)
