"""MCVT and CL-EDI parts: ProtoNCE loss, level rescaling, aggregators, combined loss weighting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stratavit.backbone import Backbone, LevelFeatures
from stratavit.clustering import Prototypes
from stratavit.config import BackboneConfig, ConfigError, resolve_config
from stratavit.objectives import OBJECTIVES, PatchAggregate, PatchAggregateConfig, ProtoNCE, ProtoNCEConfig, StepState, ViewFeatures
from stratavit.objectives.base import resolve_levels
from stratavit.objectives.infonce import InfoNCEConfig
from stratavit.objectives.patch_aggregate import cls_attention_weights
from stratavit.objectives.protonce import protonce_loss
from stratavit.views import MultiViewBatch

C = 16


def _backbone(depth: int = 3) -> Backbone:
    return Backbone(BackboneConfig(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=C, depth=depth, num_heads=2))


def _state() -> StepState:
    return StepState(step=0, epoch=0, steps_per_epoch=10, total_steps=100)


def _protos(k: int = 4, d: int = 8, n: int = 12, seed: int = 0) -> Prototypes:
    g = torch.Generator().manual_seed(seed)
    centroids = F.normalize(torch.randn(k, d, generator=g), dim=1)
    assignments = torch.arange(n) % k
    return Prototypes(centroids, assignments, torch.full((k,), 0.2), torch.bincount(assignments, minlength=k))


def test_protonce_hand_computed():
    # 2 samples, K = 3 orthogonal prototypes, φ = [0.5, 1.0, 0.25]; sample 0 -> proto 0, sample 1 -> proto 1.
    centroids = torch.eye(3)
    protos = Prototypes(centroids, torch.tensor([0, 1]), torch.tensor([0.5, 1.0, 0.25]), torch.tensor([1, 1, 0]))
    q = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    # columns: [c0, c1, c2(neg)] with φ [0.5, 1.0, 0.25]
    # row 0: logits [2, 0, 0] label 0; row 1: logits [0, 0, 4] label 1
    want = ((-2 + math.log(math.exp(2) + 2)) + (0 + math.log(2 + math.exp(4)))) / 2
    got = protonce_loss(q, torch.tensor([0, 1]), protos, num_negatives=10)
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_protonce_lower_when_samples_sit_on_their_prototypes():
    protos = _protos()
    indices = torch.arange(8)
    on_proto = protos.centroids[protos.assignments[indices]] * 5
    good = protonce_loss(on_proto, indices, protos, 100)
    shuffled = protonce_loss(on_proto, indices[torch.tensor([1, 2, 3, 0, 5, 6, 7, 4])], protos, 100)
    assert good < shuffled


def test_protonce_negative_sampling_caps_the_columns():
    protos = _protos(k=50, n=50)
    q = torch.randn(4, 8)
    loss = protonce_loss(q, torch.arange(4), protos, num_negatives=5)
    assert torch.isfinite(loss)


def test_levels_rescale_with_depth():
    bb6 = _backbone(depth=6)
    assert resolve_levels(InfoNCEConfig(levels=[4, 8], levels_for_depth=12), bb6) == [2, 4]
    assert resolve_levels(InfoNCEConfig(levels=[4, 8, -1], levels_for_depth=12), _backbone(depth=12)) == [4, 8, 12]
    with pytest.raises(ValueError, match="repeated"):
        resolve_levels(InfoNCEConfig(levels=[1, 2], levels_for_depth=12), _backbone(depth=2))


def _views(bb: Backbone, n_views: int, batch: int, levels: list[int], seed: int = 0, backbone=None) -> ViewFeatures:
    g = torch.Generator().manual_seed(seed)
    feats = {lv: LevelFeatures(torch.randn(n_views * batch, 17, C, generator=g), (4, 4), bb.vit.norm) for lv in levels}
    mv = MultiViewBatch([], [], torch.zeros(batch, dtype=torch.long), torch.arange(batch))
    return ViewFeatures(feats, None, n_views, 0, mv, backbone)


@pytest.mark.parametrize("aggregator", ["transformer", "mean_mlp", "cls_attention"])
def test_aggregator_shapes_and_loss(aggregator):
    torch.manual_seed(0)
    bb = _backbone()
    cfg = PatchAggregateConfig(aggregator=aggregator, proj_hidden_dim=32, proj_dim=8, pred_hidden_dim=32)
    obj = PatchAggregate(cfg, bb)
    levels = sorted(set(obj.student_levels()))
    s = _views(bb, 2, 5, levels, seed=1, backbone=bb)
    t = _views(bb, 2, 5, levels, seed=2, backbone=bb)
    detail = obj.detail(s.global_, obj.aggregator, bb.vit.blocks)
    assert detail.shape == (10, C)
    out = obj(s, t, obj.teacher_head(), _state())
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    if obj.aggregator is not None:
        assert all(p.grad is not None for p in obj.aggregator.parameters())


def test_cls_attention_weights_are_a_distribution_and_follow_the_block():
    torch.manual_seed(0)
    bb = _backbone()
    x = torch.randn(3, 17, C)
    w = cls_attention_weights(bb.vit.blocks[1], x)
    assert w.shape == (3, 16)
    torch.testing.assert_close(w.sum(1), torch.ones(3))
    # independent recomputation with timm's fused qkv and explicit softmax
    blk = bb.vit.blocks[1]
    h = blk.norm1(x)
    qkv = blk.attn.qkv(h).reshape(3, 17, 3, 2, C // 2).permute(2, 0, 3, 1, 4)
    att = (qkv[0] @ qkv[1].transpose(-2, -1) * (C // 2) ** -0.5).softmax(-1)
    ref = att[:, :, 0, 1:].mean(1)
    torch.testing.assert_close(w, ref / ref.sum(1, keepdim=True))
    with pytest.raises(ConfigError, match="level >= 2"):
        PatchAggregate(PatchAggregateConfig(aggregator="cls_attention", levels=[1]), bb)


def test_cross_term_adds_to_the_detail_loss():
    torch.manual_seed(0)
    bb = _backbone()
    base = PatchAggregateConfig(aggregator="mean_mlp", proj_hidden_dim=32, proj_dim=8, pred_hidden_dim=32)
    obj = PatchAggregate(base, bb)
    s, t = _views(bb, 2, 5, [3], seed=1), _views(bb, 2, 5, [3], seed=2)
    plain = obj(s, t, obj.teacher_head(), _state())
    obj.cfg.cross_weight = 0.5
    s, t = _views(bb, 2, 5, [3], seed=1), _views(bb, 2, 5, [3], seed=2)
    crossed = obj(s, t, obj.teacher_head(), _state())
    want = plain.loss + 0.5 * crossed.metrics["patch_aggregate/cross"]
    torch.testing.assert_close(crossed.loss, want)


def test_combined_loss_is_the_weighted_sum(monkeypatch):
    """The engine's total = Σ weight · objective loss (CL-EDI: L_A + λ L_B)."""
    from stratavit.module import PretrainModule
    from stratavit.objectives.base import ObjectiveOutput
    from stratavit.config import to_dict

    cfg = resolve_config("cl-edi", [
        "backbone.arch=vit_tiny_patch16_224", "backbone.img_size=16", "backbone.patch_size=4", "backbone.embed_dim=16",
        "backbone.depth=2", "backbone.num_heads=2", "objectives.patch_aggregate.weight=0.3",
        "objectives.infonce.weight=2.0",
    ])
    module = PretrainModule(to_dict(cfg))
    fixed = {"infonce": 1.5, "patch_aggregate": 4.0}
    for name, obj in module.objectives.items():
        monkeypatch.setattr(obj, "forward", lambda *a, _v=fixed[name], **k: ObjectiveOutput(torch.tensor(_v)))
    monkeypatch.setattr(module, "compute_features", lambda batch: (None, None))
    monkeypatch.setattr(module, "state", lambda: _state())
    total, logs = module.compute_losses(None)  # type: ignore[arg-type]
    assert total.item() == pytest.approx(2.0 * 1.5 + 0.3 * 4.0)
    assert logs["loss/infonce"] == 1.5 and logs["loss/patch_aggregate"] == 4.0


def test_recipes_resolve():
    for name in ("mcvt", "cl-edi"):
        cfg = resolve_config(name, ["backbone.depth=6"])
        assert cfg.objectives
    assert set(resolve_config("mcvt", []).objectives) == {"infonce", "protonce"}
    assert set(resolve_config("cl-edi", []).objectives) == {"infonce", "patch_aggregate"}
    assert "protonce" in OBJECTIVES and "patch_aggregate" in OBJECTIVES
    _ = ProtoNCE, ProtoNCEConfig
