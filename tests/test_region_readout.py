"""MCL's region readout: RoI-align windows, the ViT simple pyramid, the CNN + FPN backbone, LARS,
and the montage objective with readout=roi_align on both backbones (recipe mcl-resnet)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from stratavit.backbones.build import build_backbone
from stratavit.config import BackboneConfig, ConfigError, to_dict
from stratavit.objectives.montage.layout import make_montage
from stratavit.objectives.montage.readout import SimplePyramid, roi_features
from stratavit.recipe import resolve_config


def test_roi_align_on_grid_aligned_boxes_returns_the_exact_window():
    feature = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    # stride 4: a 32-px canvas, tiles of 16 px = 4x4 cells
    boxes = torch.tensor([[0, 0, 16, 16], [16, 0, 32, 16], [0, 16, 16, 32], [16, 16, 32, 32]], dtype=torch.float32)
    out = roi_features(feature, boxes.expand(2, 4, 4), stride=4, size=4)
    assert out.shape == (8, 3, 4, 4)
    for n in range(2):
        for t, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            assert torch.allclose(out[n * 4 + t], feature[n, :, y0 // 4 : y1 // 4, x0 // 4 : x1 // 4])
    # a box between cells is resampled bilinearly: the mean of a 2x2 window read at 1x1
    half = roi_features(feature[:1], torch.tensor([[[0.0, 0.0, 8.0, 8.0]]]), stride=4, size=1)
    assert torch.allclose(half[0, :, 0, 0], feature[0, :, :2, :2].mean(dim=(1, 2)))


def test_simple_pyramid_strides_and_shapes_follow_vitdet():
    pyr = SimplePyramid(in_dim=64, out_dim=16, patch_size=16, num_levels=4)
    assert pyr.strides == [4, 8, 16, 32]
    x = torch.randn(2, 64, 14, 14)
    assert [tuple(pyr(x, k).shape) for k in range(4)] == [(2, 16, 56, 56), (2, 16, 28, 28), (2, 16, 14, 14), (2, 16, 7, 7)]
    with pytest.raises(ValueError, match="cannot be upsampled"):
        SimplePyramid(64, 16, patch_size=2, num_levels=4)  # stride 1/2 does not exist


def test_vit_small_pyramid_reads_every_tile_of_224_px_montages_as_an_exact_7x7_window():
    """The mcl recipe's default: ViT-S/16 (384 channels, 14x14 tokens at 224 px), pyramid of 256 channels."""
    from stratavit.objectives.montage.readout import ConvRegionNeck, RegionReadout

    torch.manual_seed(0)
    pyr = SimplePyramid(in_dim=384, out_dim=256, patch_size=16, num_levels=4).eval()
    assert pyr.strides == [4, 8, 16, 32]
    x = torch.randn(1, 384, 14, 14)
    maps = [pyr(x, k) for k in range(4)]
    assert [tuple(m.shape) for m in maps] == [(1, 256, 56, 56), (1, 256, 28, 28), (1, 256, 14, 14), (1, 256, 7, 7)]
    readout = RegionReadout(pyr, pyr.strides, ConvRegionNeck(256, 32, 16, convs=1), None)
    assert readout.window(224) == 7
    for level in range(4):
        m = make_montage(torch.zeros(64, 3, 224, 224), level, copies=[1, 1, 1, 2][level])
        k = 3 - level  # montage level i reads stride 32 / 2^i
        stride = pyr.strides[k]
        out = roi_features(maps[k], m.boxes[None], stride, size=7)
        for t, (x0, y0, x1, y1) in enumerate(m.boxes.int().tolist()):
            assert (x1 - x0) == 7 * stride
            assert torch.allclose(out[t], maps[k][0, :, y0 // stride : y1 // stride, x0 // stride : x1 // stride], atol=1e-5)


@pytest.mark.parametrize("dim,patch,size", [(32, 4, 32), (24, 16, 224)])
def test_tiles_cut_as_windows_equal_roi_align_values_and_gradients(dim, patch, size, monkeypatch):
    """The readout's direct windows (tiles=r) == RoI-align on the montage boxes: embeddings and gradients."""
    from stratavit.objectives.montage import readout as readout_module
    from stratavit.objectives.montage.readout import ConvRegionNeck, RegionReadout, tile_windows

    roi_calls = []
    monkeypatch.setattr(readout_module, "roi_features", lambda *a, **k: roi_calls.append(1) or roi_features(*a, **k))

    torch.manual_seed(0)
    pyr = SimplePyramid(in_dim=dim, out_dim=8, patch_size=patch, num_levels=4)
    readout = RegionReadout(pyr, pyr.strides, ConvRegionNeck(8, 16, 4, convs=1), None).double()
    x = torch.randn(2, dim, size // patch, size // patch, dtype=torch.float64, requires_grad=True)
    for level in range(4):
        r = 2**level
        m = make_montage(torch.zeros(r * r, 3, size, size), level)
        boxes = m.boxes.expand(2, *m.boxes.shape).double()
        fast = readout(x, level, boxes, size, tiles=r)
        (g_fast,) = torch.autograd.grad(fast.square().sum(), x)
        assert not roi_calls  # the windows were cut directly
        slow = readout(x, level, boxes, size)
        assert roi_calls.pop()
        (g_slow,) = torch.autograd.grad(slow.square().sum(), x)
        torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-9, atol=1e-12)
    whole = readout(x, 0, torch.tensor([[[0.0, 0.0, size, size]]], dtype=torch.float64).expand(2, 1, 4), size, tiles=1)
    assert whole.shape == (2, 4)
    with pytest.raises(ValueError, match="does not split"):
        tile_windows(torch.zeros(1, 2, 6, 6), 4)


def _cnn_cfg(**kw) -> BackboneConfig:
    return BackboneConfig(type="resnet_fpn", arch="resnet18", fpn_dim=16, **kw)


def test_pyramid_backbone_levels_are_fpn_maps_with_average_pooled_cls():
    torch.manual_seed(0)
    b = build_backbone(_cnn_cfg())
    assert b.strides == [4, 8, 16, 32] and b.patch_size == 32 and b.depth == 4 and b.embed_dim == 16
    feats = b(torch.randn(2, 3, 64, 64), [1, 2, 3, -1])
    assert [feats[lv].grid for lv in (1, 2, 3, 4)] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert feats[-1] is feats[4]
    p5 = feats[4]
    assert torch.allclose(p5.cls, p5.patches.mean(dim=1)) and torch.equal(p5.tokens, p5.tokens_pre)
    with pytest.raises(ValueError, match="multiple of the coarsest stride 32"):
        b(torch.randn(1, 3, 48, 48))
    with pytest.raises(ConfigError, match="needs a ViT"):
        b(torch.randn(1, 3, 64, 64), mask=torch.zeros(1, 4, dtype=torch.bool), mask_token=torch.zeros(16))


def test_pyramid_backbone_refuses_vit_settings_and_unknown_archs():
    with pytest.raises(ConfigError, match=r"backbone.num_heads.*ViT settings"):
        build_backbone(_cnn_cfg(num_heads=12))
    with pytest.raises(ConfigError, match="pos_embed"):
        build_backbone(BackboneConfig(type="resnet_fpn", arch="resnet18", pos_embed="sincos"))
    with pytest.raises(ConfigError, match="cannot be built as a CNN feature pyramid"):
        build_backbone(BackboneConfig(type="resnet_fpn", arch="no_such_net"))


def test_lars_step_matches_hand_computation():
    from stratavit.engine.lars import LARS

    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ‖w‖ = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([{"params": [w], "lars_adapt": True}, {"params": [b], "lars_adapt": False, "weight_decay": 0.0}],
               lr=0.5, weight_decay=0.1, momentum=0.9, eta=0.01)
    w.grad = torch.tensor([[0.7, -0.4]])
    b.grad = torch.tensor([2.0])
    opt.step()
    d = np.array([0.7 + 0.1 * 3, -0.4 + 0.1 * 4])  # [1.0, 0.0]: ‖d‖ = 1
    q = 0.01 * 5 / 1.0
    assert np.allclose(w.detach().numpy(), [[3 - 0.5 * q * d[0], 4 - 0.5 * q * d[1]]])
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.5 * 2.0]))  # plain momentum SGD, no decay
    w.grad = torch.tensor([[0.0, 0.0]])
    b.grad = torch.tensor([0.0])
    before = b.detach().clone()
    opt.step()  # momentum carries on: v = 0.9 * v
    assert torch.allclose(b.detach(), before - 0.5 * 0.9 * 2.0)


# ------------------------------------------------------------------------------------------- objective

RESNET_TINY = [
    "backbone.arch=resnet18", "backbone.fpn_dim=16", "views.global_size=64", "views.local_size=64",
    "data.batch_size=32", "objectives.montage.proj_hidden_dim=32", "objectives.montage.pred_hidden_dim=32",
    "objectives.montage.proj_dim=16", "objectives.montage.neck_convs=1",
    "views.global_blur_p=[0.0,0.0]", "views.local_blur_p=0.0",  # tensor blur is most of a test batch's cost
]
VIT_TINY = [
    "backbone.arch=vit_tiny_patch16_224", "backbone.img_size=32", "backbone.patch_size=4", "backbone.embed_dim=32",
    "backbone.depth=2", "backbone.num_heads=2", "views.global_size=32", "views.local_size=32", "data.batch_size=32",
    "objectives.montage.proj_hidden_dim=32", "objectives.montage.pred_hidden_dim=32", "objectives.montage.proj_dim=16",
    "objectives.montage.readout=roi_align", "objectives.montage.pyramid_dim=16", "objectives.montage.neck_convs=1",
    "views.global_blur_p=[0.0,0.0]", "views.local_blur_p=0.0",
]


def _module(recipe, overrides):
    from stratavit.engine.module import PretrainModule

    torch.manual_seed(0)
    cfg = resolve_config(recipe, overrides)
    return cfg, PretrainModule(to_dict(cfg))


def _batch(cfg, patch, n=32, side=72):
    from PIL import Image

    from stratavit.data.views import MultiCropTransform, collate_views

    tf = MultiCropTransform(cfg.views, patch_size=patch)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)) for _ in range(n)]
    return collate_views([(tf(im), 0, i) for i, im in enumerate(images)])


def test_montage_tiles_of_a_resnet_are_exact_windows_of_their_fpn_level():
    """Level i reads P(5-i): every tile is an (S/32)-cell window there, RoI-align reads it exactly."""
    torch.manual_seed(0)
    b = build_backbone(_cnn_cfg()).eval()
    images = torch.randn(64, 3, 64, 64)
    for level in range(4):
        m = make_montage(images, level, torch.Generator().manual_seed(level))
        feats = b(m.canvases, [4 - level])[4 - level]
        stride = b.strides[3 - level]
        fmap = feats.patches.transpose(1, 2).reshape(m.canvases.shape[0], 16, *feats.grid)
        out = roi_features(fmap, m.boxes.expand(fmap.shape[0], *m.boxes.shape), stride, size=64 // 32)
        for k in range(fmap.shape[0]):
            for t, (x0, y0, x1, y1) in enumerate(m.boxes.int().tolist()):
                window = fmap[k, :, y0 // stride : y1 // stride, x0 // stride : x1 // stride]
                assert window.shape[-1] == 2
                assert torch.allclose(out[k * m.ratio**2 + t], window, atol=1e-6)


def test_mcl_resnet_engine_step_trains_body_fpn_neck_and_predictors():
    cfg, module = _module("mcl-resnet", RESNET_TINY)
    obj = module.objectives["montage"]
    assert cfg.optim.name == "lars" and obj.on_pyramid and obj.readout.pyramid is None
    assert type(module.teacher.heads["montage"]).__name__ == "RegionReadout"
    module.teacher.train()
    assert module.teacher.backbone.training  # batch statistics, like MoCo's key encoder
    assert cfg.objectives["montage"].tile_copies == [1, 1, 1, 2]
    batch = _batch(cfg, patch=32)
    total, logs = module.compute_losses(batch)
    for i in range(4):  # 2T * CE over 32 targets starts near 2 * ln 32 per side, two sides
        assert 4 * math.log(32) * 0.8 < float(logs[f"montage/level{i}"]) < 4 * math.log(32) * 1.2
    # B, B/4, B/16, B/32 canvases; every image once per level, twice at level 3
    layout = obj.student_views(batch, module.state())["montage"].layout  # what the step ran (seeded by the step)
    assert [m.canvases.shape[0] for _, _, m in layout] == [8, 2, 1] * 2
    for _, level, m in layout:
        assert torch.bincount(m.sources.flatten(), minlength=32).tolist() == [[1, 1, 1, 2][level]] * 32
    total.backward()
    assert module.backbone.body.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in module.backbone.fpn.parameters())
    assert all(p.grad is not None for p in obj.readout.parameters())
    assert all(p.grad is not None for p in obj.predictors.parameters())


def test_vit_with_roi_align_readout_builds_a_simple_pyramid():
    cfg, module = _module("mcl", VIT_TINY)
    obj = module.objectives["montage"]
    assert obj.readout.strides == [1, 2, 4, 8] and obj.readout.window(32) == 4
    batch = _batch(cfg, patch=4, side=36)
    total, logs = module.compute_losses(batch)
    assert torch.isfinite(total)
    layout = obj.student_views(batch, module.state())["montage"].layout  # what the step ran (seeded by the step)
    assert [(m.copies, m.canvases.shape[0]) for _, _, m in layout] == [(1, 8), (1, 2), (2, 1)] * 2
    total.backward()
    assert all(p.grad is not None for p in obj.readout.pyramid.parameters())
    assert module.backbone.vit.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0


def test_montage_readout_errors_are_clear():
    with pytest.raises(ConfigError, match="readout=roi_align"):
        _module("mcl-resnet", [*RESNET_TINY, "objectives.montage.readout=pool"])
    with pytest.raises(ConfigError, match="give 4 pyramid levels"):
        _module("mcl-resnet", [*RESNET_TINY, "objectives.montage.levels=[-1]"])
    with pytest.raises(ConfigError, match="ViT settings"):
        _module("mcl-resnet", [*RESNET_TINY, "backbone.patch_size=16"])
    from stratavit.data.views import MultiCropTransform

    cfg, module = _module("mcl-resnet", RESNET_TINY)
    cfg.views.global_size = cfg.views.local_size = 48
    with pytest.raises(ConfigError, match="not a multiple of backbone.patch_size=32"):  # the loader's check
        MultiCropTransform(cfg.views, module.backbone.patch_size)


@pytest.mark.slow
def test_mcl_resnet_from_the_command_line_exports_a_plain_timm_resnet(tmp_path, cifar_train):
    import timm
    from safetensors.torch import load_file

    from stratavit.backbones.export import load_backbone, read_metadata
    from stratavit.engine.train import pretrain

    run = pretrain("mcl-resnet", str(cifar_train), tmp_path / "run", [
        *RESNET_TINY, "data.limit=128", "data.num_workers=0", "train.max_steps=2", "data.allow_upsampling=true", "train.progress_bar=false",
        "train.log_every_n_steps=1", "optim.warmup_epochs=0.5",
    ])
    summary = json.loads((run / "run.json").read_text())
    assert summary["global_step"] == 2 and summary["nonfinite_steps"] == 0
    meta = read_metadata(run / "backbone.safetensors")
    assert meta["arch"] == "resnet18" and meta["backbone_type"] == "resnet_fpn"
    model = load_backbone(run)
    assert isinstance(model, timm.models.ResNet)
    plain = timm.create_model("resnet18", num_classes=0)
    plain.load_state_dict(load_file(str(run / "backbone.safetensors")), strict=True)  # what users do
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 512)
