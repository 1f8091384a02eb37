"""iBOT: blockwise masks, the ibot_mim loss against a NumPy transcription of iBOTLoss, the engine."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from stratavit.backbones.features import LevelFeatures
from stratavit.backbones.vit import Backbone
from stratavit.config import BackboneConfig, ConfigError, to_dict
from stratavit.data.views import MultiCropTransform, MultiViewBatch, collate_views
from stratavit.objectives import OBJECTIVES, StepState, ViewFeatures
from stratavit.objectives.ibot_mim.masking import (
    block_mask,
    block_masks,
    ibot_min_num_patches,
)
from stratavit.objectives.ibot_mim.objective import (
    IBOT,
    IBOTConfig,
    IBOTHead,
    mim_loss,
    teacher_patch_temperature,
)
from stratavit.recipe import resolve_config

C = 16


def _state(step: int = 0, epoch: int = 0) -> StepState:
    return StepState(step=step, epoch=epoch, steps_per_epoch=10, total_steps=100)


def _backbone() -> Backbone:
    return Backbone(BackboneConfig(arch="vit_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=C, depth=2, num_heads=2))


def _small_cfg(**kw) -> IBOTConfig:
    base = dict(out_dim=8, hidden_dim=32, bottleneck_dim=8, student_temp=0.1, teacher_temp=0.04, teacher_patch_temp=0.07)
    base.update(kw)
    return IBOTConfig(**base)


# ------------------------------------------------------------------------------------- masks


def test_block_masks_shape_dtype_and_determinism():
    a = block_masks(64, (14, 14), generator=torch.Generator().manual_seed(3))
    b = block_masks(64, (14, 14), generator=torch.Generator().manual_seed(3))
    c = block_masks(64, (14, 14), generator=torch.Generator().manual_seed(4))
    assert a.shape == (64, 196) and a.dtype == torch.bool
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(5)
    d = block_masks(8, (8, 8))
    torch.manual_seed(5)
    assert torch.equal(d, block_masks(8, (8, 8)))


def test_block_masks_prob_and_ratio():
    grid = (14, 14)
    n_patches = 196
    g = torch.Generator().manual_seed(0)
    assert not block_masks(50, grid, prob=1.0, generator=g).any()
    full = block_masks(400, grid, ratio_range=(0.1, 0.5), prob=0.0, min_num_patches=16, generator=g)
    counts = full.sum(1).float()
    assert (counts > 0).all()
    assert (counts <= 0.5 * n_patches).all()  # never more than the target
    assert 0.25 < counts.mean().item() / n_patches < 0.32  # E[U(0.1, 0.5)] = 0.3, a little shortfall allowed
    half = block_masks(1000, grid, prob=0.5, generator=g)
    empty = (~half.any(1)).float().mean().item()
    assert 0.44 < empty < 0.56
    assert 0.12 < half.float().mean().item() < 0.165  # 0.5 · 0.3
    # a fixed ratio: every mask stays at or just below its target
    fixed = block_masks(200, (8, 8), ratio_range=(0.4, 0.4), prob=0.0, generator=g).sum(1)
    assert (fixed <= 0.4 * 64).all() and fixed.float().mean() > 0.33 * 64


def _masked_neighbour_fraction(masks: torch.Tensor, grid: tuple[int, int]) -> float:
    """Among (masked patch, 4-neighbour inside the grid) pairs, the fraction whose neighbour is masked."""
    m = masks.reshape(-1, *grid).float()
    same, total = 0.0, 0.0
    for dy, dx in ((0, 1), (1, 0)):
        a = m[:, : grid[0] - dy, : grid[1] - dx]
        b = m[:, dy:, dx:]
        same += 2 * (a * b).sum().item()
        total += (a.sum() + b.sum()).item()
    return same / total


def test_block_masks_are_blocky():
    grid = (14, 14)
    g = torch.Generator().manual_seed(1)
    masks = block_masks(300, grid, prob=0.0, min_num_patches=16, generator=g)
    # random masks with the same count per image
    scores = torch.rand(masks.shape, generator=g)
    ranks = scores.argsort(1).argsort(1)
    random_masks = ranks < masks.sum(1, keepdim=True)
    assert torch.equal(random_masks.sum(1), masks.sum(1))
    blocky = _masked_neighbour_fraction(masks, grid)
    scattered = _masked_neighbour_fraction(random_masks, grid)
    assert scattered < 0.4 and blocky > 0.75 and blocky > 2 * scattered


def test_block_mask_single_and_ibot_min_patches():
    import random

    m = block_mask((8, 8), 20.0, random.Random(0), min_num_patches=4)
    assert m.shape == (8, 8) and 0 < m.sum() <= 20
    assert not block_mask((8, 8), 0.0, random.Random(0)).any()
    assert ibot_min_num_patches((14, 14)) == 16 and ibot_min_num_patches((8, 8)) == 4 and ibot_min_num_patches((2, 2)) == 1


def test_student_masks_are_seeded_by_step_call_and_start_epoch():
    bb = _backbone()
    a, b = IBOT(_small_cfg(mask_seed=7), bb), IBOT(_small_cfg(mask_seed=7), bb)
    ma, token = a.student_masks(2, 16, (8, 8), _state(step=3), torch.device("cpu"))
    mb, _ = b.student_masks(2, 16, (8, 8), _state(step=3), torch.device("cpu"))
    assert ma.shape == (32, 64) and token is a.mask_token and token.shape == (C,)
    assert torch.equal(ma, mb)  # same seed and step -> same masks
    again, _ = a.student_masks(2, 16, (8, 8), _state(step=3), torch.device("cpu"))
    assert not torch.equal(ma, again)  # a second micro-batch of the same step gets new masks
    other, _ = IBOT(_small_cfg(mask_seed=8), bb).student_masks(2, 16, (8, 8), _state(step=3), torch.device("cpu"))
    assert not torch.equal(ma, other)
    late = IBOT(_small_cfg(pred_start_epoch=2), bb)
    early, _ = late.student_masks(2, 16, (8, 8), _state(step=0, epoch=1), torch.device("cpu"))
    assert early.shape == (32, 64) and not early.any()
    started, _ = late.student_masks(2, 16, (8, 8), _state(step=30, epoch=2), torch.device("cpu"))
    assert started.any()


# ------------------------------------------------------------------------------------- loss


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(_np_log_softmax(x))


def _np_ibot_loss(s_cls, s_patch, t_cls, t_patch, masks, c, c2, ts, tt, tt2, l1, l2):
    """A NumPy transcription of iBOT's ``iBOTLoss.forward`` (float64).

    s_cls: per student view (global first) (B, K); s_patch: per global view (B, N, K); t_cls,
    t_patch: per global view; masks: per global view (B, N) bool. Returns (λ1 L_cls, λ2 L_mim).
    """
    total1 = total2 = 0.0
    n1 = n2 = 0
    for q in range(len(t_cls)):
        pt = _np_softmax((t_cls[q] - c) / tt)
        pt2 = _np_softmax((t_patch[q] - c2) / tt2)
        for v in range(len(s_cls)):
            if v == q:
                ce = np.sum(-pt2 * _np_log_softmax(s_patch[v] / ts), axis=-1)  # (B, N)
                m = masks[v].astype(np.float64)
                total2 += (np.sum(ce * m, axis=-1) / np.maximum(m.sum(-1), 1.0)).mean()
                n2 += 1
            else:
                total1 += np.sum(-pt * _np_log_softmax(s_cls[v] / ts), axis=-1).mean()
                n1 += 1
    return total1 / n1 * l1, total2 / n2 * l2


B, GRID, LGRID = 3, (2, 2), (1, 1)
# 2 global views × 3 images, 4 patches each; image 1 of view 0 has no masked patch.
MASKS = torch.tensor(
    [[1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 1], [1, 1, 1, 0], [0, 0, 1, 0]], dtype=torch.bool
)


def _features(bb: Backbone, n_views: int, grid: tuple[int, int], gen: torch.Generator) -> LevelFeatures:
    n = grid[0] * grid[1]
    return LevelFeatures(torch.randn(n_views * B, 1 + n, C, generator=gen), grid, bb.vit.norm)


def _tiny_case(seed: int = 0, masks: torch.Tensor | None = MASKS):
    bb = _backbone()
    g = torch.Generator().manual_seed(seed)
    s_global, s_local, t_global = _features(bb, 2, GRID, g), _features(bb, 1, LGRID, g), _features(bb, 2, GRID, g)
    lv = bb.depth
    mv = MultiViewBatch([], [], torch.zeros(B, dtype=torch.long), torch.arange(B))
    student = ViewFeatures({lv: s_global}, {lv: s_local}, 2, 1, mv, bb, masks)
    teacher = ViewFeatures({lv: t_global}, None, 2, 0, mv, bb)
    return bb, student, teacher


def _objective(bb: Backbone, **kw) -> tuple[IBOT, torch.nn.Module]:
    torch.manual_seed(0)
    obj = IBOT(_small_cfg(**kw), bb)
    teacher_head = copy.deepcopy(obj.head)
    with torch.no_grad():
        for p in teacher_head.parameters():
            p.add_(0.05 * torch.randn_like(p))
        obj.center.copy_(0.3 * torch.randn_like(obj.center))
        obj.patch_center.copy_(0.3 * torch.randn_like(obj.patch_center))
    return obj, teacher_head


@pytest.mark.parametrize("shared_head", [True, False])
def test_loss_matches_numpy_reference(shared_head: bool):
    bb, student, teacher = _tiny_case()
    kw = dict(lambda_cls=0.7, lambda_mim=1.3, shared_head=shared_head)
    if not shared_head:
        kw["patch_out_dim"] = 5
    obj, t_head = _objective(bb, **kw)
    c0, c2_0 = obj.center.clone(), obj.patch_center.clone()
    out = obj(student, teacher, t_head, _state())

    lv = bb.depth
    with torch.no_grad():
        s_cls_all, s_patch_all = obj.head(student.global_[lv].tokens)  # head on every token, as iBOT
        s_local = obj.head.cls(student.local[lv].cls)
        t_cls_all, t_patch_all = t_head(teacher.global_[lv].tokens)

    def np_views(x: torch.Tensor, n: int) -> list[np.ndarray]:
        return [v.double().numpy() for v in x.chunk(n)]

    s_cls = np_views(s_cls_all, 2) + np_views(s_local, 1)
    want_cls, want_mim = _np_ibot_loss(
        s_cls, np_views(s_patch_all, 2), np_views(t_cls_all, 2), np_views(t_patch_all, 2),
        [m.numpy() for m in MASKS.chunk(2)], c0.double().numpy(), c2_0.double().numpy(), 0.1, 0.04, 0.07, 0.7, 1.3,
    )
    assert out.loss.item() == pytest.approx(want_cls + want_mim, rel=1e-5)
    assert out.metrics["ibot/cls"].item() == pytest.approx(want_cls / 0.7, rel=1e-5)
    assert out.metrics["ibot/mim"].item() == pytest.approx(want_mim / 1.3, rel=1e-5)
    assert out.metrics["ibot/mask_ratio"].item() == pytest.approx(MASKS.float().mean().item())
    assert out.metrics["ibot/teacher_temp"] == 0.04 and out.metrics["ibot/teacher_patch_temp"] == 0.07
    for key in ("ibot/teacher_entropy", "ibot/teacher_patch_entropy"):
        assert 0 < float(out.metrics[key]) <= np.log(8) + 1e-6


@pytest.mark.parametrize("shared_head,use_bn", [(True, False), (False, False), (True, True)])
def test_teacher_outputs_equal_the_head_on_every_token_selected_and_summed(shared_head, use_bn):
    """The teacher side's prototype layer only on CLS, masked patches and the summed bottleneck ==
    the head on every token, then selected (masked positions) and summed (the patch centre's input)."""
    bb, _, teacher = _tiny_case()
    kw = dict(shared_head=shared_head, use_bn=use_bn, **({} if shared_head else {"patch_out_dim": 5}))
    _, t_head = _objective(bb, **kw)
    tokens = teacher.global_[bb.depth].tokens
    with torch.no_grad():
        cls, masked, patch_sum = t_head.teacher_outputs(tokens, MASKS)
        want_cls, want_patch = t_head(tokens)
    torch.testing.assert_close(cls, want_cls)
    torch.testing.assert_close(masked, want_patch[MASKS])
    torch.testing.assert_close(patch_sum, want_patch.sum(dim=(0, 1))[None], rtol=1e-5, atol=1e-5)
    assert masked.shape == (int(MASKS.sum()), 8 if shared_head else 5)


def test_centres_update_separately():
    bb, student, teacher = _tiny_case()
    obj, t_head = _objective(bb, center_momentum=0.9, patch_center_momentum=0.8)
    c0, c2_0 = obj.center.clone(), obj.patch_center.clone()
    obj(student, teacher, t_head, _state())
    lv = bb.depth
    with torch.no_grad():
        t_cls, t_patch = t_head(teacher.global_[lv].tokens)
    torch.testing.assert_close(obj.center, 0.9 * c0 + 0.1 * t_cls.mean(0, keepdim=True))
    torch.testing.assert_close(obj.patch_center, 0.8 * c2_0 + 0.2 * t_patch.reshape(-1, 8).mean(0, keepdim=True))
    assert not torch.allclose(obj.center, obj.patch_center)
    obj.eval()  # no centre update outside training
    before = obj.patch_center.clone()
    obj(student, teacher, t_head, _state())
    assert torch.equal(obj.patch_center, before)


def test_mim_term_reads_only_masked_positions():
    bb, student, teacher = _tiny_case()
    obj, t_head = _objective(bb)
    obj.eval()  # keep the centres fixed between calls
    base = obj(student, teacher, t_head, _state()).metrics
    lv = bb.depth
    tokens = student.global_[lv].tokens_pre
    unmasked = tokens.clone()
    unmasked[:, 1:][~MASKS] += 3.0 * torch.randn_like(unmasked[:, 1:][~MASKS])
    _, s2, _ = _tiny_case()
    s2.global_[lv] = LevelFeatures(unmasked, GRID, bb.vit.norm)
    moved = obj(s2, teacher, t_head, _state()).metrics
    assert moved["ibot/mim"].item() == pytest.approx(base["ibot/mim"].item(), rel=1e-6)
    assert moved["ibot/cls"].item() == pytest.approx(base["ibot/cls"].item(), rel=1e-6)
    masked = tokens.clone()
    masked[:, 1:][MASKS] += 3.0 * torch.randn_like(masked[:, 1:][MASKS])
    s2.global_[lv] = LevelFeatures(masked, GRID, bb.vit.norm)
    assert obj(s2, teacher, t_head, _state()).metrics["ibot/mim"].item() != pytest.approx(base["ibot/mim"].item(), rel=1e-3)


def test_mim_loss_normalisation_and_empty_masks():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    t = torch.randn(2, 3, 4, generator=g)
    masks = torch.tensor([[True, True, False], [False, False, False]])
    got = mim_loss(s[masks], t, masks, torch.zeros(1, 4), 0.1, 0.07)
    pt = torch.softmax(t[0, :2] / 0.07, -1)
    ce = -(pt * torch.log_softmax(s[0, :2] / 0.1, -1)).sum(-1)
    torch.testing.assert_close(got, ce.mean() / 2)  # image 1 has no masked patch: it adds 0 and counts
    none = torch.zeros(2, 3, dtype=torch.bool)
    zero = mim_loss(s[none], t, none, torch.zeros(1, 4), 0.1, 0.07)
    assert zero.item() == 0.0
    zero.backward()  # still a graph, with zero gradient
    assert s.grad is not None and not s.grad.any()


def test_no_masks_gives_zero_mim():
    bb, student, teacher = _tiny_case(masks=None)
    obj, t_head = _objective(bb)
    out = obj(student, teacher, t_head, _state())
    assert out.metrics["ibot/mim"].item() == 0.0 and out.metrics["ibot/mask_ratio"].item() == 0.0
    assert out.loss.item() == pytest.approx(out.metrics["ibot/cls"].item())


def test_head_shapes_and_config_checks():
    bb = _backbone()
    head = IBOTHead(C, _small_cfg(shared_head=False, patch_out_dim=5))
    cls, patches = head(torch.randn(4, 1 + 6, C))
    assert cls.shape == (4, 8) and patches.shape == (4, 6, 5)
    torch.testing.assert_close(head.patches(torch.randn(3, C)).shape, torch.Size([3, 5]))
    assert len(head.last_layers()) == 2 and len(IBOTHead(C, _small_cfg()).last_layers()) == 1
    with pytest.raises(ConfigError, match="shared head"):
        IBOT(_small_cfg(patch_out_dim=5), bb)
    with pytest.raises(ConfigError, match="exactly one level"):
        IBOT(_small_cfg(levels=[1, 2]), bb)
    with pytest.raises(ConfigError, match="mask_ratio"):
        IBOT(_small_cfg(mask_ratio=(0.5, 0.1)), bb)


def test_patch_temperature_schedule():
    cfg = _small_cfg(warmup_teacher_patch_temp=0.04, teacher_patch_temp=0.07, warmup_teacher_temp_epochs=10)
    assert teacher_patch_temperature(cfg, 0) == pytest.approx(0.04)
    assert teacher_patch_temperature(cfg, 5) == pytest.approx(0.04 + 0.03 * 5 / 9)  # linspace(0.04, 0.07, 10)[5]
    assert teacher_patch_temperature(cfg, 9) == pytest.approx(0.07)
    late = _small_cfg(warmup_teacher_temp_epochs=10, pred_start_epoch=4)
    assert teacher_patch_temperature(late, 3) == pytest.approx(0.04)
    assert teacher_patch_temperature(late, 9) == pytest.approx(0.04 + 0.03 * 5 / 9)


def test_last_layers_frozen_in_first_epoch():
    bb, student, teacher = _tiny_case()
    obj, t_head = _objective(bb, norm_last_layer=False, freeze_last_layer_epochs=1)
    obj(student, teacher, t_head, _state()).loss.backward()
    obj.on_after_backward(_state(epoch=0))
    assert all(p.grad is None for p in obj.head.head.last_layer.parameters())
    assert obj.head.head.mlp[0].weight.grad is not None


# ------------------------------------------------------------------------------------- engine

TINY = [
    "backbone.arch=vit_tiny_patch16_224", "backbone.img_size=32", "backbone.patch_size=4", "backbone.embed_dim=32",
    "backbone.depth=2", "backbone.num_heads=2", "views.global_size=32", "views.local_size=16", "views.local_crops=2",
    "data.batch_size=4", "objectives.ibot_mim.out_dim=64", "objectives.ibot_mim.hidden_dim=32",
    "objectives.ibot_mim.bottleneck_dim=16", "objectives.ibot_mim.mask_prob=0.0",
]


def _batch(cfg, n: int = 4) -> MultiViewBatch:
    tf = MultiCropTransform(cfg.views, patch_size=cfg.backbone.patch_size)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]
    return collate_views([(tf(img), 0, i) for i, img in enumerate(images)])


def test_recipe_resolves(monkeypatch):
    monkeypatch.setitem(OBJECTIVES, IBOT.name, IBOT)
    cfg = resolve_config("ibot", ["objectives.ibot_mim.mask_ratio=[0.2, 0.4]"])
    ocfg = cfg.objectives["ibot_mim"]
    assert isinstance(ocfg, IBOTConfig)
    assert ocfg.out_dim == 8192 and ocfg.shared_head and not ocfg.norm_last_layer
    assert ocfg.mask_ratio == (0.2, 0.4) and ocfg.mask_prob == 0.5
    assert cfg.views.local_crops == 10 and tuple(cfg.views.global_scale) == (0.25, 1.0)


def test_engine_step_masks_student_and_trains_the_token(monkeypatch):
    from stratavit.engine.module import PretrainModule
    from stratavit.engine.optim import param_groups as _param_groups

    monkeypatch.setitem(OBJECTIVES, IBOT.name, IBOT)
    cfg = resolve_config("ibot", TINY)
    module = PretrainModule(to_dict(cfg))
    obj = module.objectives["ibot_mim"]
    assert module._masker == "ibot_mim" and module.uses_local
    assert "ibot_mim" in module.teacher.heads
    assert not any(p is obj.mask_token for p in module.teacher.parameters())
    groups = _param_groups([module.backbone, module.objectives])
    assert any(p is obj.mask_token for p in groups[1]["params"])  # no weight decay on the token
    batch = _batch(cfg)

    student, teacher = module.compute_features(batch)
    assert student.masks is not None and student.masks.shape == (2 * 4, 64) and student.masks.any(1).all()
    assert teacher.masks is None

    with torch.no_grad():  # a non-zero token, so that masking visibly changes the student's input
        obj.mask_token.normal_()
    total, logs = module.compute_losses(batch)
    assert torch.isfinite(total)
    for key in ("cls", "mim", "mask_ratio", "teacher_entropy", "teacher_patch_entropy"):
        assert f"ibot/{key}" in logs
    assert "loss/ibot_mim" in logs
    assert 0.05 < float(logs["ibot/mask_ratio"]) <= 0.5
    assert float(logs["ibot/mim"]) > 0
    total.backward()
    assert obj.mask_token.grad is not None and obj.mask_token.grad.abs().sum() > 0
    assert obj.head.head.mlp[0].weight.grad is not None
