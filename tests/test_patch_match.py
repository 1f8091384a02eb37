"""Local-Global: patch matching on hand-worked boxes, same source pixels, the loss against a reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stratavit.backbones.vit import Backbone
from stratavit.config import BackboneConfig, ViewsConfig
from stratavit.data.views import MultiCropTransform, collate_views
from stratavit.objectives import (
    OBJECTIVES,
    PatchMatch,
    PatchMatchConfig,
    StepState,
    ViewFeatures,
)
from stratavit.objectives.patch_match.matching import match_patches
from stratavit.objectives.patch_match.objective import patchwise_jitter
from stratavit.objectives.patch_match.pairs import matched_pair_loss

NO, YES = torch.tensor([False]), torch.tensor([True])
FULL = torch.tensor([[0.0, 0.0, 32.0, 32.0]])


def test_identical_crops_match_every_token_to_itself():
    m = match_patches(FULL, NO, (4, 4), FULL, NO, (4, 4))
    assert m.idx_a.tolist() == [list(range(17))] and m.idx_b.tolist() == [list(range(17))] and m.valid.all()


def test_flipped_crop_matches_mirrored_columns():
    m = match_patches(FULL, NO, (4, 4), FULL, YES, (4, 4))
    # token 1 + r*4 + c of A <-> token 1 + r*4 + (3 - c) of B
    want = [0] + [1 + r * 4 + (3 - c) for r in range(4) for c in range(4)]
    assert m.idx_a.tolist() == [list(range(17))] and m.idx_b.tolist() == [want]


def test_disjoint_crops_match_cls_only():
    m = match_patches(FULL, NO, (4, 4), torch.tensor([[40.0, 40.0, 56.0, 56.0]]), NO, (2, 2))
    assert m.valid.tolist() == [[True, False, False, False, False]] and m.patch_pairs.tolist() == [0]


def test_local_crop_inside_global_crop_gives_the_sub_grid():
    # global: source [0, 32)^2 on a 4x4 grid (8 px patches); local: [8, 24)^2 on a 2x2 grid.
    # Overlap = the local crop: global columns start round(4*8/32)=1, count round(4*16/32)=2 ->
    # columns 1, 2, rows 1, 2 -> tokens 1+1*4+1=6, 7, 10, 11; the local grid is whole: tokens 1..4.
    m = match_patches(FULL, NO, (4, 4), torch.tensor([[8.0, 8.0, 24.0, 24.0]]), NO, (2, 2))
    assert m.idx_a.tolist() == [[0, 6, 7, 10, 11]] and m.idx_b.tolist() == [[0, 1, 2, 3, 4]]
    # flipped local crop: its columns mirrored and walked in reverse
    m = match_patches(FULL, NO, (4, 4), torch.tensor([[8.0, 8.0, 24.0, 24.0]]), YES, (2, 2))
    assert m.idx_a.tolist() == [[0, 6, 7, 10, 11]] and m.idx_b.tolist() == [[0, 2, 1, 4, 3]]


def test_larger_sub_grid_is_subsampled_with_floor_linspace():
    # A: [0, 32) on 8 columns (4 px); B: [0, 32) on 3 columns. Rows: 1 row each (height one patch).
    a = torch.tensor([[0.0, 0.0, 32.0, 4.0]])
    m = match_patches(a, NO, (1, 8), a, NO, (1, 3))
    picks = np.floor(np.linspace(0, 7, 3)).astype(int).tolist()  # [0, 3, 7]
    assert m.idx_a.tolist() == [[0] + [1 + c for c in picks]] and m.idx_b.tolist() == [[0, 1, 2, 3]]


def test_every_sample_gets_its_own_matches():
    boxes_a = torch.cat([FULL, FULL, FULL])
    boxes_b = torch.tensor([[0.0, 0.0, 32.0, 32.0], [16.0, 0.0, 48.0, 32.0], [100.0, 100.0, 120.0, 120.0]])
    flips = torch.tensor([False, False, False])
    m = match_patches(boxes_a, flips, (4, 4), boxes_b, flips, (4, 4))
    assert m.patch_pairs.tolist() == [16, 8, 0]
    # sample 1: A columns 2, 3 <-> B columns 0, 1 on every row
    got = sorted(zip(m.idx_a[1][m.valid[1]].tolist(), m.idx_b[1][m.valid[1]].tolist()))
    want = sorted([(0, 0)] + [(1 + r * 4 + c, 1 + r * 4 + c - 2) for r in range(4) for c in (2, 3)])
    assert got == want
    assert (m.idx_a[~m.valid] == 0).all()  # padding points at CLS, masked out


def _coordinate_image(w: int = 64, h: int = 48):
    from PIL import Image

    xs = np.tile(np.linspace(0, 255, w, dtype=np.float32), (h, 1))
    ys = np.tile(np.linspace(0, 255, h, dtype=np.float32)[:, None], (1, w))
    return Image.fromarray(np.stack([xs, ys, np.full_like(xs, 128)], -1).round().astype(np.uint8)), w, h


def test_matched_patches_of_identity_augmented_views_show_the_same_source_pixels():
    """Real view maker, crops and flips only: matched patches of two views cover the same place."""
    img, w, h = _coordinate_image()
    cfg = ViewsConfig(global_size=32, local_size=16, local_crops=2, global_scale=[0.3, 1.0], local_scale=[0.1, 0.4],
                      mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], color_jitter_p=0.0, grayscale_p=0.0,
                      global_blur_p=[0.0, 0.0], global_solarize_p=[0.0, 0.0], local_blur_p=0.0)
    torch.manual_seed(0)
    transform = MultiCropTransform(cfg, patch_size=4)
    batch = collate_views([(transform(img), 0, i) for i in range(16)])
    views = batch.global_views + batch.local_views
    checked = 0
    for q in batch.global_views:
        for v in views:
            if v is q:
                continue
            size_q, size_v = q.images.shape[-1], v.images.shape[-1]
            gq, gv = (size_q // 4,) * 2, (size_v // 4,) * 2
            m = match_patches(q.boxes, q.flips, gq, v.boxes, v.flips, gv)
            # mean (x, y) code of each patch, from the pixels of each view
            code_q = F.avg_pool2d(q.images[:, :2], 4).flatten(2).transpose(1, 2)  # (B, N, 2)
            code_v = F.avg_pool2d(v.images[:, :2], 4).flatten(2).transpose(1, 2)
            for b in range(16):
                pairs = m.valid[b, 1:]
                if not pairs.any():
                    continue
                a = code_q[b, m.idx_a[b, 1:][pairs] - 1] * 255
                c = code_v[b, m.idx_b[b, 1:][pairs] - 1] * 255
                # the codes advance 255/63 per source pixel in x, 255/47 in y; allow about one
                # patch of the coarser view in source pixels (plus rounding of the sub-grid)
                patch_src = max(float(q.boxes[b, 2] - q.boxes[b, 0]) / gq[1], float(v.boxes[b, 2] - v.boxes[b, 0]) / gv[1])
                dx = (a[:, 0] - c[:, 0]).abs() * (w - 1) / 255
                dy = (a[:, 1] - c[:, 1]).abs() * (h - 1) / 255
                assert float(dx.mean()) < patch_src and float(dy.mean()) < patch_src * 1.5
                checked += int(pairs.sum())
    assert checked > 200


def _tiny_case(k: int = 8, n_local: int = 1):
    torch.manual_seed(0)
    bb = Backbone(BackboneConfig(arch="vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2))
    cfg = PatchMatchConfig(out_dim=k, hidden_dim=16, bottleneck_dim=8, center_momentum=0.9)
    obj = PatchMatch(cfg, bb)
    cfg_views = ViewsConfig(global_size=16, local_size=8, local_crops=n_local, mean=[0.5] * 3, std=[0.25] * 3)
    from PIL import Image

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)) for _ in range(3)]
    batch = collate_views([(MultiCropTransform(cfg_views, 8)(im), 0, i) for i, im in enumerate(imgs)])
    g = torch.cat([v.images for v in batch.global_views])
    l = torch.cat([v.images for v in batch.local_views])
    student = ViewFeatures(bb(g), bb(l), 2, n_local, batch, bb)
    with torch.no_grad():
        teacher = ViewFeatures(bb(g), None, 2, 0, batch, bb)
    return obj, student, teacher, batch


def _reference_loss(obj: PatchMatch, student, teacher, batch) -> float:
    """Loops over samples and pairs in NumPy-like style, independent of the vectorised code."""
    cfg = obj.cfg
    t = obj.head(teacher.global_[-1].tokens).detach().double()
    t_views = t.chunk(2)
    s_groups = [(batch.global_views, obj.head(student.global_[-1].tokens).double().chunk(2), (2, 2)),
                (batch.local_views, obj.head(student.local[-1].tokens).double().chunk(len(batch.local_views)), (1, 1))]
    center = obj.center.double()
    total, pairs = 0.0, 0
    for views, s_views, grid in s_groups:
        for iq, q in enumerate(batch.global_views):
            for iv, v in enumerate(views):
                if views is batch.global_views and iv == iq:
                    continue
                per_sample = []
                for b in range(batch.batch_size):
                    m = match_patches(q.boxes[b:b + 1], q.flips[b:b + 1], (2, 2), v.boxes[b:b + 1], v.flips[b:b + 1], grid)
                    ces = []
                    for i, j, ok in zip(m.idx_a[0].tolist(), m.idx_b[0].tolist(), m.valid[0].tolist()):
                        if not ok:
                            continue
                        pt = torch.softmax((t_views[iq][b, i] - center[i]) / cfg.teacher_temp, -1)
                        ls = torch.log_softmax(s_views[iv][b, j] / cfg.student_temp, -1)
                        ces.append(float(-(pt * ls).sum().detach()))
                    per_sample.append(sum(ces) / len(ces))
                total += sum(per_sample) / len(per_sample)
                pairs += 1
    return total / pairs


def test_loss_matches_a_per_sample_reference_and_updates_the_per_position_centre():
    obj, student, teacher, batch = _tiny_case()
    obj.center.normal_()  # a non-trivial centre, per position
    before = obj.center.clone()
    want = _reference_loss(obj, student, teacher, batch)
    out = obj(student, teacher, obj.head, StepState(0, 5, 10, 100))
    assert out.loss.item() == pytest.approx(want, rel=1e-4)
    t = obj.head(teacher.global_[-1].tokens).detach()  # (2B, 5, K)
    torch.testing.assert_close(obj.center, before * 0.9 + t.mean(0) * 0.1)
    assert obj.center.shape == (5, 8)


def test_matching_logits_give_a_lower_loss_than_shuffled_ones():
    teacher = torch.randn(20, 8)
    probs = F.softmax(teacher / 0.1, -1)
    idx = torch.arange(20)
    w = torch.full((20,), 1 / 20)
    good = matched_pair_loss(teacher / 0.1, idx, probs, idx, w)
    bad = matched_pair_loss(teacher[torch.randperm(20)] / 0.1, idx, probs, idx, w)
    assert good < bad
    # zero-weight pairs do not count; a pair's weight multiplies its cross-entropy
    ce = -(probs * F.log_softmax(teacher / 0.1, -1)).sum(-1)
    w_pad = w.clone()
    w_pad[3:] = 0
    assert float(matched_pair_loss(teacher / 0.1, idx, probs, idx, w_pad)) == pytest.approx(float(ce[:3].sum() / 20), rel=1e-5)
    # two teacher rows onto one student row: the weighted sum of both cross-entropies
    two = matched_pair_loss(teacher[:1] / 0.1, torch.tensor([0, 0]), probs[:2], torch.tensor([0, 1]), torch.tensor([0.25, 0.75]))
    lp = F.log_softmax(teacher[0] / 0.1, -1)
    assert float(two) == pytest.approx(float(-(0.25 * probs[0] + 0.75 * probs[1]) @ lp), rel=1e-5)


def test_gradients_reach_the_student_only():
    obj, student, teacher, _ = _tiny_case()
    out = obj(student, teacher, obj.head, StepState(0, 5, 10, 100))
    out.loss.backward()
    assert student.global_[-1].tokens_pre.requires_grad
    assert not teacher.global_[-1].tokens_pre.requires_grad
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.head.parameters())
    assert out.metrics["patch_match/matched_per_pair"] > 0


def test_patchwise_jitter_changes_patches_independently():
    x = torch.randn(2, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(patchwise_jitter(x, 4, 0.0, 0.4, g), x)
    y = patchwise_jitter(x, 4, 1.0, 0.4, torch.Generator().manual_seed(0))
    cells = (y - x).abs().reshape(2, 3, 4, 4, 4, 4).mean(dim=(1, 3, 5))  # (2, 4, 4) change per patch
    assert (cells > 0).all() and cells.std() > 0
    half = patchwise_jitter(x, 4, 0.5, 0.4, torch.Generator().manual_seed(1))
    unchanged = ((half - x).abs().reshape(2, 3, 4, 4, 4, 4).amax(dim=(1, 3, 5)) < 1e-6).float().mean()
    assert 0.2 < float(unchanged) < 0.8


def test_registered_and_configurable():
    assert OBJECTIVES["patch_match"] is PatchMatch
    from stratavit.recipe import resolve_config

    cfg = resolve_config("local-global", ["objectives.patch_match.patch_jitter_p=0.5"])
    assert cfg.objectives["patch_match"].patch_jitter_p == 0.5
    assert math.isclose(cfg.objectives["patch_match"].patch_weight, 1.0)


TINY = [
    "backbone.arch=vit_tiny_patch16_224", "backbone.img_size=32", "backbone.patch_size=4", "backbone.embed_dim=32",
    "backbone.depth=2", "backbone.num_heads=2", "views.global_size=32", "views.local_size=16", "views.local_crops=2",
    "data.batch_size=4", "objectives.patch_match.out_dim=64", "objectives.patch_match.hidden_dim=32",
    "objectives.patch_match.bottleneck_dim=16", "objectives.patch_match.patch_jitter_p=0.5",
]


def test_engine_step_of_the_local_global_recipe():
    """PretrainModule end to end: jitter hook, EMA teacher head, loss, gradients, frozen last layer, centre."""
    from PIL import Image

    from stratavit.config import to_dict
    from stratavit.engine.module import PretrainModule
    from stratavit.recipe import resolve_config

    torch.manual_seed(0)
    cfg = resolve_config("local-global", TINY)
    module = PretrainModule(to_dict(cfg))
    obj = module.objectives["patch_match"]
    assert module.uses_local and obj in module._augmenters
    assert module.teacher.heads["patch_match"] is not obj.head  # the engine's EMA copy
    tf = MultiCropTransform(cfg.views, patch_size=4)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(4)]
    batch = collate_views([(tf(im), 0, i) for i, im in enumerate(images)])
    g = torch.cat([v.images for v in batch.global_views])
    assert not torch.equal(obj.augment_student(g, "global", module.state()), g)  # the per-patch jitter is on
    center = obj.center.clone()
    total, logs = module.compute_losses(batch)
    assert torch.isfinite(total) and float(logs["loss/patch_match"]) == pytest.approx(float(total.detach()))
    # 2 global (8x8) + 2 local (4x4) views: 2 global-global + 4 global-local pairs, all with CLS
    assert 0 < logs["patch_match/matched_per_pair"] <= 64
    assert obj.center.shape == (65, 64) and not torch.equal(obj.center, center)
    total.backward()
    assert module.backbone.vit.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.teacher.parameters())
    module.on_after_backward()  # epoch 0 < freeze_last_layer_epochs: last layer gets no update
    assert all(p.grad is None for p in obj.head.last_layer.parameters())


def _spread_rows(valid: torch.Tensor, n: int) -> torch.Tensor:
    """Per row, in plain Python: the valid columns' list L (c entries) -> keep L[j * c // n], j < n, if c > n."""
    keep = torch.zeros_like(valid)
    for r, row in enumerate(valid.tolist()):
        cols = [i for i, ok in enumerate(row) if ok]
        chosen = cols if len(cols) <= n else [cols[j * len(cols) // n] for j in range(n)]
        keep[r, chosen] = True
    return keep


def _loop_reference(obj: PatchMatch, student: ViewFeatures, teacher: ViewFeatures, temp: float) -> torch.Tensor:
    """The loss as the authors' code computes it (and as stratavit did before): the head on every token,
    then a loop over (teacher view, student view) pairs with per-pair gathers of the matched tokens.
    With ``max_patch_pairs = n`` each (view pair, sample) keeps the patch pairs :func:`_spread_rows` picks,
    each weighted (matched / kept) times the patch weight."""
    batch, cfg = student.batch, obj.cfg

    def head(tokens: torch.Tensor) -> torch.Tensor:  # (V·B, T, C) -> (V·B, T, K), every token
        return obj.head(tokens.reshape(-1, tokens.shape[-1])).reshape(*tokens.shape[:2], -1).float()

    t = head(teacher.global_[-1].tokens).detach()
    t_probs = F.softmax((t - obj.center) / temp, dim=-1).chunk(teacher.n_global)
    groups = [(batch.global_views, head(student.global_[-1].tokens), student.global_[-1].grid)]
    if student.local is not None:
        groups.append((batch.local_views, head(student.local[-1].tokens), student.local[-1].grid))
    total, pairs = 0.0, 0
    for views, s_out, s_grid in groups:
        s_logp = F.log_softmax(s_out / cfg.student_temp, dim=-1).chunk(len(views))
        for iq, q in enumerate(batch.global_views):
            for iv, v in enumerate(views):
                if views is batch.global_views and iv == iq:
                    continue
                m = match_patches(q.boxes, q.flips, teacher.global_[-1].grid, v.boxes, v.flips, s_grid)
                w = m.valid.float()
                w[:, 1:] *= cfg.patch_weight
                if cfg.max_patch_pairs:
                    kept = _spread_rows(m.valid[:, 1:], cfg.max_patch_pairs)
                    ratio = m.valid[:, 1:].sum(1, keepdim=True) / kept.sum(1, keepdim=True).clamp_min(1)
                    w[:, 1:] *= kept.float() * ratio
                k = t_probs[iq].shape[-1]
                pt = t_probs[iq].gather(1, m.idx_a[..., None].expand(-1, -1, k))
                ls = s_logp[iv].gather(1, m.idx_b[..., None].expand(-1, -1, k))
                ce = -(pt * ls).sum(-1)
                total = total + ((ce * w).sum(1) / w.sum(1)).mean()
                pairs += 1
    return total / pairs  # type: ignore[return-value]


@pytest.mark.parametrize("patch_weight,use_bn,max_pairs", [(1.0, False, 0), (0.5, False, 0), (0.0, False, 0),
                                                           (1.0, True, 0), (1.0, False, 5), (0.5, True, 3)])
def test_head_on_matched_tokens_equals_head_on_every_token(cifar_train, patch_weight, use_bn, max_pairs):
    """Select-then-head (the objective) == head-on-all-then-select (the loop reference): loss and gradients,
    on random features and the real geometry of multi-crop views of CIFAR-10 JPEGs."""
    from PIL import Image

    from stratavit.backbones.features import LevelFeatures

    torch.manual_seed(0)
    bb = Backbone(BackboneConfig(arch="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=16, depth=1, num_heads=2))
    obj = PatchMatch(PatchMatchConfig(out_dim=32, hidden_dim=16, bottleneck_dim=8, patch_weight=patch_weight,
                                      use_bn=use_bn, max_patch_pairs=max_pairs), bb)
    obj.center.normal_()
    views = ViewsConfig(global_size=32, local_size=16, local_crops=3, global_scale=[0.2, 1.0], local_scale=[0.1, 0.4])
    files = sorted(cifar_train.rglob("*.jpg"))[:8]
    tf = MultiCropTransform(views, 4)
    batch = collate_views([(tf(Image.open(f).convert("RGB")), 0, i) for i, f in enumerate(files)])

    def feats(n_views: int, tokens: int) -> dict:
        f = LevelFeatures(torch.randn(n_views * 8, tokens, 16, requires_grad=True), (int((tokens - 1) ** 0.5),) * 2,
                          bb.vit.norm)
        return {-1: f, 1: f}  # the last block of this 1-block backbone

    s_g, s_l, t_g = feats(2, 65), feats(3, 17), feats(2, 65)
    student = ViewFeatures(s_g, s_l, 2, 3, batch, bb)
    t_f = LevelFeatures(t_g[-1].tokens_pre.detach(), (8, 8), bb.vit.norm)
    teacher = ViewFeatures({-1: t_f, 1: t_f}, None, 2, 0, batch, bb)
    want = _loop_reference(obj, student, teacher, 0.04)
    want.backward()
    grads_want = [s_g[-1].tokens_pre.grad.clone(), s_l[-1].tokens_pre.grad.clone()]
    head_want = [p.grad.clone() for p in obj.head.parameters() if p.grad is not None]
    for x in (s_g[-1].tokens_pre, s_l[-1].tokens_pre, *obj.head.parameters()):
        x.grad = None
    for f in (s_g[-1], s_l[-1]):
        f._post = None  # the reference cached the post-norm tokens
    center = obj.center.clone()
    out = obj(student, teacher, obj.head, StepState(0, 5, 10, 100))
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the centre: every teacher token's output, averaged per position (head on all tokens)
        t_all = obj.head(t_f.tokens.reshape(-1, 16)).reshape(16, 65, -1)
    torch.testing.assert_close(obj.center, center * 0.9 + t_all.mean(0) * 0.1)
    out.loss.backward()
    torch.testing.assert_close(s_g[-1].tokens_pre.grad, grads_want[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(s_l[-1].tokens_pre.grad, grads_want[1], rtol=1e-4, atol=1e-7)
    got = torch.cat([p.grad.flatten() for p in obj.head.parameters() if p.grad is not None])
    exp = torch.cat([g.flatten() for g in head_want])
    # relative to the whole gradient: a bias before batch-norm has a gradient of ~0 (rounding) either way
    assert got.shape == exp.shape and float((got - exp).norm()) <= 1e-4 * float(exp.norm())
    if not use_bn and patch_weight > 0:
        # the head really ran on fewer tokens than all of them (the global views' non-overlapping parts)
        from stratavit.objectives.patch_match.pairs import matched_pairs

        pairs = matched_pairs(batch.global_views, batch.local_views, (8, 8), (4, 4), patch_weight)
        assert 0 < torch.unique(pairs.student_rows).numel() < 2 * 8 * 65 + 3 * 8 * 17


def test_spread_subset_on_hand_worked_rows():
    from stratavit.objectives.patch_match.pairs import spread_subset

    valid = torch.tensor([[True, False, True, True, True, True],  # c = 5 > n = 2: ranks 0 and 2 (floor(j * 5 / 2))
                          [False, True, False, False, True, False],  # c = 2 <= n: all kept
                          [False] * 6])  # no match: nothing kept
    keep, scale = spread_subset(valid, 2)
    assert keep.tolist() == [[True, False, False, True, False, False],
                             [False, True, False, False, True, False],
                             [False] * 6]
    assert scale.flatten().tolist() == [2.5, 1.0, 0.0]
    # c = 7, n = 3: ranks floor(0), floor(7/3) = 2, floor(14/3) = 4
    keep, scale = spread_subset(torch.ones(1, 7, dtype=torch.bool), 3)
    assert keep[0].nonzero().flatten().tolist() == [0, 2, 4] and float(scale) == pytest.approx(7 / 3)
    big = torch.rand(50, 40) < 0.6
    for n in (1, 4, 17, 40):
        keep, _ = spread_subset(big, n)
        assert torch.equal(keep, _spread_rows(big, n))


def test_max_patch_pairs_keeps_the_weights_and_fewer_student_rows(cifar_train):
    from PIL import Image

    from stratavit.objectives.patch_match.pairs import matched_pairs

    views = ViewsConfig(global_size=32, local_size=16, local_crops=3, global_scale=[0.2, 1.0], local_scale=[0.1, 0.4])
    files = sorted(cifar_train.rglob("*.jpg"))[:8]
    tf = MultiCropTransform(views, 4)
    batch = collate_views([(tf(Image.open(f).convert("RGB")), 0, i) for i, f in enumerate(files)])
    full = matched_pairs(batch.global_views, batch.local_views, (8, 8), (4, 4), 1.0)
    few = matched_pairs(batch.global_views, batch.local_views, (8, 8), (4, 4), 1.0, max_patch_pairs=4)
    assert float(full.weights.sum()) == pytest.approx(1.0) and float(few.weights.sum()) == pytest.approx(1.0)
    assert few.weights.numel() < full.weights.numel()
    assert torch.unique(few.student_rows).numel() < torch.unique(full.student_rows).numel()
    assert float(few.patch_pairs) == float(full.patch_pairs)  # the metric still counts every matched pair
    same = matched_pairs(batch.global_views, batch.local_views, (8, 8), (4, 4), 1.0, max_patch_pairs=64)
    assert torch.equal(same.student_rows, full.student_rows) and torch.equal(same.weights, full.weights)
    with pytest.raises(Exception, match="max_patch_pairs"):
        PatchMatch(PatchMatchConfig(max_patch_pairs=-1), Backbone(BackboneConfig(
            arch="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=16, depth=1, num_heads=2)))
