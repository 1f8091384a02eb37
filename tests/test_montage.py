"""MCL montages: exact tiles of the nearest-downscaled sources, a permutation, patch-aligned tiles."""

from __future__ import annotations

import pytest
import torch

from stratavit.config import ConfigError
from stratavit.montage import check_montage_geometry, make_montage, tile_tokens


def _batch(b: int = 64, s: int = 32) -> torch.Tensor:
    return torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_every_tile_is_its_source_downscaled_exactly(level):
    images = _batch()
    m = make_montage(images, level, torch.Generator().manual_seed(level))
    r = 2**level
    assert m.canvases.shape == (64 // r**2, 3, 32, 32) and m.sources.shape == (64 // r**2, r * r)
    for k in range(m.canvases.shape[0]):
        for t in range(r * r):
            x0, y0, x1, y1 = (int(v) for v in m.boxes[t])
            src = images[m.sources[k, t]]
            # nearest neighbour by r: the top-left pixel of every r x r block
            assert torch.equal(m.canvases[k, :, y0:y1, x0:x1], src[:, ::r, ::r])


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_sources_are_a_permutation_and_boxes_tile_the_canvas(level):
    m = make_montage(_batch(), level, torch.Generator().manual_seed(7))
    assert sorted(m.sources.flatten().tolist()) == list(range(64))
    r = 2**level
    area = ((m.boxes[:, 2] - m.boxes[:, 0]) * (m.boxes[:, 3] - m.boxes[:, 1])).sum()
    assert float(area) == 32 * 32 and m.boxes[0].tolist() == [0, 0, 32 / r, 32 / r]
    # row-major: tile 1 is to the right of tile 0
    if r > 1:
        assert m.boxes[1].tolist() == [32 / r, 0, 64 / r, 32 / r]


def test_level_zero_is_the_plain_batch_in_permuted_order():
    images = _batch()
    m = make_montage(images, 0, torch.Generator().manual_seed(3))
    assert torch.equal(m.canvases, images[m.sources[:, 0]])
    other = make_montage(images, 0, torch.Generator().manual_seed(4))
    assert not torch.equal(m.sources, other.sources)  # a fresh permutation per call


def test_tiles_align_with_the_patch_grid_or_fail_clearly():
    check_montage_geometry(batch_size=64, size=32, patch=4, levels=4)  # tiles of 32, 16, 8, 4 px
    for t in make_montage(_batch(), 3).boxes:
        assert all(float(v) % 4 == 0 for v in t)
    with pytest.raises(ConfigError, match="multiple of 64"):
        check_montage_geometry(batch_size=64, size=32, patch=8, levels=4)  # 4-px tiles < one 8-px patch
    with pytest.raises(ConfigError, match="batch size that is a multiple of 64"):
        check_montage_geometry(batch_size=32, size=64, patch=4, levels=4)
    with pytest.raises(ValueError, match="cannot tile"):
        make_montage(_batch(b=8), 2)


def test_tile_tokens_pool_exactly_the_patches_inside_each_tile():
    # patch tokens that encode their own (row, col): the pooled token of tile (a, b) of a 2x2
    # montage on an 8x8 grid is the mean over rows 4a..4a+3, cols 4b..4b+3
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    patches = torch.stack((rows, cols), -1).reshape(1, 64, 2)
    pooled = tile_tokens(patches, (8, 8), 2)
    assert pooled.tolist() == [[[1.5, 1.5], [1.5, 5.5], [5.5, 1.5], [5.5, 5.5]]]
    with pytest.raises(ValueError, match="does not split"):
        tile_tokens(patches, (8, 8), 3)


# --------------------------------------------------------------------------- the objective

import math  # noqa: E402

import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from stratavit.objectives.montage import region_contrast  # noqa: E402


def test_region_contrast_hand_value_and_minimum_at_the_true_sources():
    targets = torch.eye(3)  # three orthogonal image embeddings
    pred = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 5.0]])  # normalised: e0, e2
    labels = torch.tensor([0, 2])
    # T = 1: each row's logits are [1, 0, 0] / [0, 0, 1] -> CE = -1 + log(e + 2) each; times 2T
    want = 2 * (-1 + math.log(math.e + 2))
    assert region_contrast(pred, targets, labels, 1.0).item() == pytest.approx(want, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    t = F.normalize(torch.randn(16, 8, generator=g), dim=1)
    src = torch.randint(0, 16, (40,), generator=g)
    right = region_contrast(t[src] * 3, t, src, 1.0)
    wrong = region_contrast(t[src] * 3, t, (src + 1) % 16, 1.0)
    assert right < wrong


MCL_TINY = [
    "backbone.arch=vit_tiny_patch16_224", "backbone.img_size=32", "backbone.patch_size=4", "backbone.embed_dim=32",
    "backbone.depth=2", "backbone.num_heads=2", "views.global_size=32", "views.local_size=32", "data.batch_size=64",
    "objectives.montage.proj_hidden_dim=32", "objectives.montage.pred_hidden_dim=32", "objectives.montage.proj_dim=16",
]


def _mcl_module(extra=()):
    from stratavit.config import resolve_config, to_dict
    from stratavit.module import PretrainModule

    torch.manual_seed(0)
    cfg = resolve_config("mcl", [*MCL_TINY, *extra])
    return cfg, PretrainModule(to_dict(cfg))


def _batch_for(cfg, n=64):
    from PIL import Image

    from stratavit.views import MultiCropTransform, collate_views

    tf = MultiCropTransform(cfg.views, patch_size=4)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)) for _ in range(n)]
    return collate_views([(tf(im), 0, i) for i, im in enumerate(images)])


def test_engine_step_runs_every_montage_level_and_trains_the_backbone_through_the_tiles():
    cfg, module = _mcl_module()
    obj = module.objectives["montage"]
    assert obj in module._extra_viewers and module.teacher.heads["montage"] is not obj.neck
    batch = _batch_for(cfg)
    total, logs = module.compute_losses(batch)
    assert torch.isfinite(total)
    # every level of both sides: 2T * CE over 64 targets starts near 2 * ln 64 per side
    for i in range(4):
        assert 2 * 2 * math.log(64) * 0.8 < float(logs[f"montage/level{i}"]) < 2 * 2 * math.log(64) * 1.2
    weights = [0.5, 0.25, 0.125, 0.125]
    assert float(total.detach()) == pytest.approx(
        sum(w * float(logs[f"montage/level{i}"]) for i, w in enumerate(weights)), rel=1e-5)
    # the montage canvases went through the student: 2 sides x (16 + 4 + 1) canvases
    student, _ = module.compute_features(batch)
    assert student.extra["montage"][obj.levels[0]].tokens_pre.shape[0] == 2 * (16 + 4 + 1)
    assert [(side, level, m.ratio) for side, level, m in obj._pending] == [
        (s, lv, 2**lv) for s in (0, 1) for lv in (1, 2, 3)]
    total.backward()
    assert module.backbone.vit.patch_embed.proj.weight.grad is None  # frozen patch embedding (mcl recipe)
    assert module.backbone.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in obj.predictors.parameters() if p.requires_grad)


def test_montage_geometry_errors_are_clear():
    from stratavit.config import ConfigError

    with pytest.raises(ConfigError, match="views.local_crops=6"):  # refused when the module is built
        _mcl_module(["views.local_crops=2"])
    with pytest.raises(ConfigError, match="multiple of 64"):
        _mcl_module(["data.batch_size=16"])
    with pytest.raises(ConfigError, match="local_size equal"):
        _mcl_module(["views.local_size=16"])
    cfg, module = _mcl_module()
    with pytest.raises(ConfigError, match="multiple of 64"):  # a last partial batch is refused too
        module.compute_losses(_batch_for(cfg, n=16))
    with pytest.raises(ConfigError, match="one level weight per montage level"):
        _mcl_module(["objectives.montage.level_weights=[1.0]"])
