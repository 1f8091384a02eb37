"""MCL at its shipped defaults: the ``mcl`` recipe (ViT-S/16, 224 px, roi_align, tile copies [1, 1, 1, 2])
and ``mcl-resnet`` pass their own checks, and one engine step runs at 224 px with only the depth and
the batch made small."""

from __future__ import annotations

import math

import pytest
import torch

from stratavit.config import ConfigError, to_dict
from stratavit.data.views import MultiCropTransform, MultiViewBatch, ViewBatch
from stratavit.recipe import resolve_config


def _module(recipe: str, overrides: list[str]):
    from stratavit.engine.module import PretrainModule

    torch.manual_seed(0)
    cfg = resolve_config(recipe, overrides)
    return cfg, PretrainModule(to_dict(cfg))


def test_mcl_recipe_defaults_are_the_authors_and_fit_together():
    cfg = resolve_config("mcl")
    m = cfg.objectives["montage"]
    assert m.readout == "roi_align" and m.tile_copies == [1, 1, 1, 2] and m.montage_levels == 4
    assert m.level_weights == [0.5, 0.25, 0.125, 0.125] and m.temperature == 1.0
    assert (m.pyramid_dim, m.neck_convs, m.proj_hidden_dim, m.proj_dim, m.proj_layers) == (256, 4, 2048, 256, 2)
    assert cfg.views.global_size == cfg.views.local_size == 224 and cfg.views.local_crops == 6
    assert cfg.data.batch_size % 32 == 0
    # the shipped batch passes the objective's checks (the module is built with depth 1 only)
    _, module = _module("mcl", ["backbone.depth=1"])
    obj = module.objectives["montage"]
    assert obj.readout.strides == [4, 8, 16, 32] and obj.readout.window(224) == 7  # exact 7x7 windows
    MultiCropTransform(cfg.views, module.backbone.patch_size)  # the loader's own size check


def test_the_pooled_readout_at_224_px_fails_with_a_message_whose_fixes_work():
    with pytest.raises(ConfigError) as e:
        _module("mcl", ["backbone.depth=1", "objectives.montage.readout=pool", "data.batch_size=48"])
    text = str(e.value)
    assert text.startswith("objectives.montage: 2 problems:")
    assert "use data.batch_size=32 or 64" in text
    assert "use views.global_size=128 or 256" in text and "objectives.montage.readout=roi_align" in text
    _module("mcl", ["backbone.depth=1", "objectives.montage.readout=roi_align", "data.batch_size=64"])
    _module("mcl", ["backbone.depth=1", "objectives.montage.readout=pool", "data.batch_size=32",
                    "views.global_size=256", "views.local_size=256"])


def test_mcl_resnet_defaults_pass_their_checks():
    cfg = resolve_config("mcl-resnet")
    assert cfg.objectives["montage"].tile_copies == [1, 1, 1, 2] and cfg.objectives["montage"].readout == "roi_align"
    obj = _module("mcl-resnet", [])[1].objectives["montage"]  # ResNet-50 + FPN, batch 256 at 224 px
    assert obj.readout.strides == [4, 8, 16, 32] and obj.readout.window(224) == 7
    with pytest.raises(ConfigError, match="use data.batch_size=32 or 64"):
        _module("mcl-resnet", ["data.batch_size=48"])


def _synthetic_batch(b: int, size: int, n_global: int, n_local: int) -> MultiViewBatch:
    g = torch.Generator().manual_seed(0)

    def views() -> ViewBatch:
        return ViewBatch(
            images=torch.randn(b, 3, size, size, generator=g),
            boxes=torch.tensor([[0.0, 0.0, size, size]]).repeat(b, 1),
            flips=torch.zeros(b, dtype=torch.bool),
            source_sizes=torch.full((b, 2), float(size)),
        )

    return MultiViewBatch(
        [views() for _ in range(n_global)], [views() for _ in range(n_local)],
        labels=torch.zeros(b, dtype=torch.long), indices=torch.arange(b),
    )


@pytest.mark.slow
def test_one_step_of_the_mcl_recipe_at_its_defaults_on_224_px_views():
    b = 32
    cfg, module = _module("mcl", ["backbone.depth=1", f"data.batch_size={b}", "train.max_steps=1"])
    obj = module.objectives["montage"]
    batch = _synthetic_batch(b, 224, cfg.views.global_crops, cfg.views.local_crops)
    total, logs = module.compute_losses(batch)
    assert torch.isfinite(total)
    for i in range(4):  # 2T * CE over 32 targets, both sides: near 4 ln 32 at initialisation
        assert 4 * math.log(b) * 0.7 < float(logs[f"montage/level{i}"]) < 4 * math.log(b) * 1.3
    # B/4, B/16, B/32 canvases of 224 px per side; every image once, twice at level 3
    layout = obj.student_views(batch, module.state())["montage"].layout  # what the step ran (seeded by the step)
    assert [(lv, m.canvases.shape) for _, lv, m in layout] == [
        (lv, (n, 3, 224, 224)) for _ in range(2) for lv, n in ((1, 8), (2, 2), (3, 1))]
    for _, level, m in layout:
        assert torch.bincount(m.sources.flatten(), minlength=b).tolist() == [[1, 1, 1, 2][level]] * b
    total.backward()
    assert module.backbone.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in obj.readout.parameters() if p.requires_grad)
    assert all(p.grad is not None for p in obj.predictors.parameters() if p.requires_grad)
