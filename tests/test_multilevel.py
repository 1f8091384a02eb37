"""MCVT and CL-EDI parts: ProtoNCE loss, level rescaling, aggregators, combined loss weighting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stratavit.backbones.features import LevelFeatures
from stratavit.backbones.vit import Backbone
from stratavit.config import BackboneConfig, ConfigError
from stratavit.data.views import MultiViewBatch
from stratavit.objectives import (
    OBJECTIVES,
    PatchAggregate,
    PatchAggregateConfig,
    ProtoNCE,
    ProtoNCEConfig,
    StepState,
    ViewFeatures,
)
from stratavit.objectives.base import resolve_levels
from stratavit.objectives.infonce import InfoNCEConfig
from stratavit.objectives.patch_aggregate import cls_attention_weights
from stratavit.objectives.protonce.clustering import Prototypes
from stratavit.objectives.protonce.objective import protonce_loss
from stratavit.recipe import resolve_config

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
    # [1, 2] of 12 map proportionally to [1, 1] of 2: spread to distinct blocks
    assert resolve_levels(InfoNCEConfig(levels=[1, 2], levels_for_depth=12), _backbone(depth=2)) == [1, 2]


@pytest.mark.parametrize(
    "levels, depth, want",
    [
        ([4, 8], 2, [1, 2]),          # proportional [1, 1] -> spread
        ([4, 8], 3, [1, 2]),          # proportional, already distinct
        ([4, 8], 4, [1, 3]),          # 1.33 -> 1, 2.67 -> 3
        ([4, 8], 1, None),            # two taps, one block
        ([11, 12], 4, [3, 4]),        # proportional [4, 4]: the deepest stays at most the last block
        ([8, 4], 2, [2, 1]),          # config order kept, spread in reference order
        ([11, -1], 2, [1, 2]),        # -1 stays the last block
        ([4, 8, -1], 3, [1, 2, 3]),
        ([4, 8, -1], 2, None),
    ],
)
def test_levels_spread_on_shallow_backbones(levels, depth, want):
    cfg = InfoNCEConfig(levels=levels, levels_for_depth=12)
    if want is None:
        with pytest.raises(ConfigError, match=r"objectives\.infonce\.levels=\[1(, 2)?\] .*backbone\.depth=\d"):
            resolve_levels(cfg, _backbone(depth=depth), "infonce")
    else:
        got = resolve_levels(cfg, _backbone(depth=depth), "infonce")
        assert got == want and len(set(got)) == len(got)


def test_level_mapping_is_logged(caplog):
    with caplog.at_level("INFO", logger="stratavit.objectives.base"):
        resolve_levels(InfoNCEConfig(levels=[4, 8], levels_for_depth=12), _backbone(depth=2), "infonce")
    assert "objectives.infonce: levels [4, 8] of a 12-block backbone -> blocks [1, 2] of 2" in caplog.text
    assert "spread" in caplog.text


def test_repeated_levels_are_a_config_error():
    with pytest.raises(ConfigError, match=r"objectives\.infonce\.levels=\[2, -1\] repeat"):
        resolve_levels(InfoNCEConfig(levels=[2, -1]), _backbone(depth=2), "infonce")
    with pytest.raises(ConfigError, match="reference backbone"):  # repeated already at depth 12
        resolve_levels(InfoNCEConfig(levels=[12, -1], levels_for_depth=12), _backbone(depth=6), "infonce")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_levels(InfoNCEConfig(levels=[13], levels_for_depth=12), _backbone(depth=6), "infonce")


def _mcvt_small(*extra: str) -> list[str]:
    return [
        "backbone.arch=vit_tiny_patch16_224", "backbone.img_size=16", "backbone.patch_size=4", "backbone.embed_dim=16",
        "backbone.num_heads=2", "objectives.infonce.proj_hidden_dim=16", "objectives.infonce.pred_hidden_dim=16",
        "objectives.protonce.proj_hidden_dim=16", "objectives.protonce.pred_hidden_dim=16", *extra,
    ]


def test_mcvt_on_one_block_names_a_fix_that_works():
    from stratavit.config import to_dict
    from stratavit.engine.module import PretrainModule

    with pytest.raises(ConfigError) as err:
        PretrainModule(to_dict(resolve_config("mcvt", _mcvt_small("backbone.depth=1"))))
    msg = str(err.value)
    assert "objectives.infonce" in msg and "backbone.depth=1" in msg
    # the overrides it suggests, applied literally: "set A B C, or backbone.depth=N (or more)"
    fix, _, rest = msg.split("; set ", 1)[1].partition(", or ")
    assert "objectives.infonce.level_weights=[1.0]" in fix
    module = PretrainModule(to_dict(resolve_config("mcvt", _mcvt_small("backbone.depth=1", *fix.split()))))
    assert module.objectives["infonce"].levels == [1]
    deeper = rest.split()[0]
    assert deeper == "backbone.depth=2"
    module = PretrainModule(to_dict(resolve_config("mcvt", _mcvt_small(deeper))))
    assert module.objectives["infonce"].levels == [1, 2] and module.objectives["protonce"].levels == [2]


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
    from stratavit.config import to_dict
    from stratavit.engine.module import PretrainModule
    from stratavit.objectives.base import ObjectiveOutput

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


# ---------------------------------------------------------------------------------------------
# k-means granularities vs the data-set size


def test_auto_num_clusters_scale_with_the_data_set():
    from stratavit.objectives.protonce.objective import auto_num_clusters

    assert auto_num_clusters(50_000) == [500, 1000, 2000]  # METHODS.md's values for ~50k images
    assert auto_num_clusters(1_281_167) == [12811, 25623, 51246]
    for n in (200, 64, 10, 3):
        ks = auto_num_clusters(n)
        assert ks == sorted(set(ks)) and min(ks) >= 2 and max(ks) < n, (n, ks)
    assert auto_num_clusters(200) == [2, 4, 8]
    with pytest.raises(ConfigError, match="at least 3 images"):
        auto_num_clusters(2)


def test_check_data_resolves_null_and_rejects_too_many_clusters(caplog):
    bb = _backbone()
    small = dict(proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16)
    auto = ProtoNCE(ProtoNCEConfig(num_clusters=None, **small), bb)
    assert auto.num_clusters is None
    with caplog.at_level("INFO", logger="stratavit.objectives.protonce.objective"):
        auto.check_data(50_000)
    assert auto.num_clusters == [500, 1000, 2000] and auto.cfg.num_clusters is None  # the config keeps null
    assert "protonce: 50000 images -> num_clusters [500, 1000, 2000]" in caplog.text

    fixed = ProtoNCE(ProtoNCEConfig(num_clusters=[500, 1000, 2000], **small), bb)
    with pytest.raises(ConfigError) as err:
        fixed.check_data(64)
    msg = str(err.value)
    assert "objectives.protonce.num_clusters" in msg and "64 images" in msg and "data.limit" in msg
    assert "objectives.protonce.num_clusters=null" in msg and "[2, 3, 4]" in msg
    fixed.check_data(5000)  # enough images: fine
    assert fixed.num_clusters == [500, 1000, 2000]
    with pytest.raises(ConfigError, match="distinct"):
        ProtoNCE(ProtoNCEConfig(num_clusters=[4, 4], **small), bb)


def test_estep_resolves_null_granularities_without_check_data():
    """Built outside stratavit.pretrain (no check_data call): the E-step picks them from its N."""
    torch.manual_seed(0)
    bb = _backbone()
    obj = ProtoNCE(ProtoNCEConfig(num_clusters=None, proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16), bb)
    emb = F.normalize(torch.randn(200, 8), dim=1)
    metrics = obj.on_dataset_embeddings(emb, torch.arange(200), 200, epoch=1)
    assert obj.num_clusters == [2, 4, 8]
    assert [p.num_clusters for p in obj.prototypes] == [2, 4, 8]
    assert "protonce/k8/size_max" in metrics
    # the resolved prototypes travel in the checkpoint's extra state
    other = ProtoNCE(ProtoNCEConfig(num_clusters=None, proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16), bb)
    other.set_extra_state(obj.get_extra_state())
    assert [p.num_clusters for p in other.prototypes] == [2, 4, 8]


def test_mcvt_with_too_many_clusters_fails_before_training(tmp_path, cifar_train):
    from conftest import TINY

    from stratavit.engine.train import pretrain

    out = tmp_path / "run"
    over = [*TINY, "data.limit=64", "objectives.protonce.num_clusters=[500,1000,2000]",
            "objectives.infonce.proj_hidden_dim=32", "objectives.infonce.pred_hidden_dim=32",
            "objectives.protonce.proj_hidden_dim=32", "objectives.protonce.pred_hidden_dim=32"]
    with pytest.raises(ConfigError, match=r"objectives\.protonce\.num_clusters=\[500, 1000, 2000\].* 64 images"):
        pretrain("mcvt", str(cifar_train), out, over)
    assert not (out / "checkpoints").exists() and not (out / "metrics.csv").exists()
    assert not (out / "config.yaml").exists()


@pytest.mark.slow
def test_mcvt_trains_end_to_end_on_a_small_shallow_setup(tmp_path, cifar_train, caplog):
    """mcvt's recipe defaults on 200 images and a 2-block ViT: taps [4, 8] of 12 -> [1, 2], automatic
    granularities [2, 4, 8], an E-step at epoch 1, and config.yaml keeps num_clusters: null."""
    import csv

    import yaml
    from conftest import TINY

    from stratavit.engine.train import pretrain

    over = [*TINY, "data.limit=200", "train.epochs=2", "objectives.protonce.warmup_epochs=1", "backbone.depth=2",
            "objectives.infonce.proj_hidden_dim=32", "objectives.infonce.pred_hidden_dim=32",
            "objectives.protonce.proj_hidden_dim=32", "objectives.protonce.pred_hidden_dim=32"]
    with caplog.at_level("INFO", logger="stratavit"):
        run = pretrain("mcvt", str(cifar_train), tmp_path / "mcvt", over)
    assert "protonce: 200 images -> num_clusters [2, 4, 8]" in caplog.text
    assert "blocks [1, 2] of 2" in caplog.text
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["objectives"]["protonce"]["num_clusters"] is None
    assert saved["objectives"]["protonce"]["proto_scale"] == "instance"
    with (run / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    estep = [r for r in rows if r.get("estep/seconds")]
    assert [int(r["epoch"]) for r in estep] == [1]
    assert float(estep[0]["protonce/k8/empty"]) == 0
    assert any(r.get("protonce/proto") for r in rows if r.get("epoch") and int(r["epoch"]) == 1)
    assert {"infonce/block1", "infonce/block2"} <= set(rows[0])
    assert (run / "backbone.safetensors").exists()
