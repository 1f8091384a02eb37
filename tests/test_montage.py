"""MCL montages: exact tiles of the nearest-downscaled sources, a permutation, patch-aligned tiles."""

from __future__ import annotations

import pytest
import torch

from stratavit.config import ConfigError
from stratavit.objectives.montage.layout import (
    check_montage_geometry,
    make_montage,
    tile_tokens,
)


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
    check_montage_geometry(batch_size=64, size=32, patch=4, tile_copies=[1, 1, 1, 1], readout="pool")
    for t in make_montage(_batch(), 3).boxes:  # tiles of 32, 16, 8, 4 px: whole 4-px patches
        assert all(float(v) % 4 == 0 for v in t)
    with pytest.raises(ConfigError, match="not whole 8-px patches: use views.global_size=64"):
        check_montage_geometry(64, size=32, patch=8, tile_copies=[1, 1, 1, 1], readout="pool")
    with pytest.raises(ConfigError, match="multiple of 64: use data.batch_size=64"):
        check_montage_geometry(32, size=64, patch=4, tile_copies=[1, 1, 1, 1], readout="pool")
    with pytest.raises(ValueError, match="cannot tile"):
        make_montage(_batch(b=8), 2)
    with pytest.raises(ValueError, match="cannot tile"):
        make_montage(_batch(b=8), 3, copies=2)  # 16 tiles, canvases of 64


# --------------------------------------------------------------------------- tile copies


def test_hand_checkable_copies_every_image_twice_on_two_canvases():
    # B = 16 images, level 2 (4x4 = 16 tiles a canvas), copies 2: 32 tiles on 2 canvases
    images = torch.arange(16.0).reshape(16, 1, 1, 1).expand(16, 3, 8, 8).contiguous()  # image k is all k
    m = make_montage(images, 2, torch.Generator().manual_seed(0), copies=2)
    assert m.canvases.shape == (2, 3, 8, 8) and m.sources.shape == (2, 16) and m.copies == 2
    assert torch.bincount(m.sources.flatten(), minlength=16).tolist() == [2] * 16
    # every 2x2 tile of the canvas is constant, equal to its source's index
    tiles = m.canvases[:, 0].reshape(2, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(2, 16, 4)
    assert torch.equal(tiles, m.sources[..., None].float().expand(2, 16, 4))


@pytest.mark.parametrize("level,copies", [(1, 1), (1, 3), (2, 1), (2, 2), (3, 1), (3, 2), (3, 4)])
def test_every_image_appears_exactly_copies_times_as_its_exact_downscaled_self(level, copies):
    b, s = 64, 16
    images = _batch(b, s)
    r = 2**level
    m = make_montage(images, level, torch.Generator().manual_seed(level * 10 + copies), copies=copies)
    assert m.canvases.shape == (copies * b // r**2, 3, s, s) and m.sources.shape == (copies * b // r**2, r * r)
    assert torch.bincount(m.sources.flatten(), minlength=b).tolist() == [copies] * b
    for k in range(m.canvases.shape[0]):
        for t in range(r * r):
            x0, y0, x1, y1 = (int(v) for v in m.boxes[t])
            assert torch.equal(m.canvases[k, :, y0:y1, x0:x1], images[m.sources[k, t], :, ::r, ::r])


def test_authors_defaults_give_b_b4_b16_b32_canvases():
    b = 64
    images = _batch(b, 16)
    counts = [make_montage(images, i, copies=c).canvases.shape[0] for i, c in enumerate([1, 1, 1, 2])]
    assert counts == [b, b // 4, b // 16, b // 32]
    # level 3: 2 canvases of 64 tiles hold every image exactly twice
    m = make_montage(images, 3, torch.Generator().manual_seed(1), copies=2)
    assert m.canvases.shape[0] == 2 and sorted(m.sources.flatten().tolist()) == sorted(list(range(b)) * 2)


def test_batch_multiple_is_the_lcm_of_the_levels_needs():
    from stratavit.objectives.montage.layout import batch_multiple

    assert batch_multiple([1, 1, 1, 2]) == 32 and batch_multiple([1, 1, 1, 1]) == 64
    assert batch_multiple([1, 2, 4, 8]) == 8 and batch_multiple([1]) == 1 and batch_multiple([1, 1, 4]) == 4


# --------------------------------------------------------------------------- one message, fixes that work

import re  # noqa: E402


def _suggested(message: str, key: str) -> list[int]:
    """The values a message suggests for ``key`` ("use KEY=a or b")."""
    values = re.findall(r"use " + re.escape(key) + r"=(\d+)(?: or (\d+))?", message)
    assert values, (key, message)
    return [int(v) for pair in values for v in pair if v]


def _problems(*args, **kw):
    from stratavit.objectives.montage.layout import montage_problems

    return montage_problems(*args, **kw)


@pytest.mark.parametrize("readout", ["pool", "roi_align"])
@pytest.mark.parametrize("batch,size", [(48, 224), (16, 200), (33, 225), (100, 96), (6, 216), (32, 224), (64, 256)])
def test_geometry_check_names_every_problem_once_and_its_suggestions_pass(readout, batch, size):
    copies, patch = [1, 1, 1, 2], 16
    problems = _problems(batch, size, patch, copies, readout)
    try:
        check_montage_geometry(batch, size, patch, copies, readout)
        message = ""
    except ConfigError as e:
        message = str(e)
    assert bool(problems) == bool(message)
    if not problems:
        return
    # one message naming every violation, each key once
    assert message.count(f"data.batch_size={batch} ") <= 1 and message.count(f"views.global_size={size}:") <= 1
    batch_bad, size_bad = batch % 32 != 0, size % (128 if readout == "pool" else 16) != 0
    assert len(problems) == batch_bad + size_bad
    assert ("data.batch_size" in message) == batch_bad and ("views.global_size" in message) == size_bad
    if len(problems) > 1:
        assert message.startswith("objectives.montage: 2 problems:")
    good_batch = _suggested(message, "data.batch_size") if batch_bad else [batch]
    good_size = _suggested(message, "views.global_size") if size_bad else [size]
    for bb in good_batch:
        for ss in good_size:
            check_montage_geometry(bb, ss, patch, copies, readout)  # every suggestion works
            assert ss % patch == 0  # and the backbone can read it
    if batch_bad:
        lo = [v for v in good_batch if v < batch]
        hi = [v for v in good_batch if v > batch]
        assert hi == [(batch // 32 + 1) * 32] and lo == ([batch // 32 * 32] if batch >= 32 else [])
    if readout == "pool" and size_bad and size % 16 == 0:
        assert "objectives.montage.readout=roi_align" in message
        check_montage_geometry(good_batch[0], size, patch, copies, "roi_align")  # that suggestion works too


def test_the_example_of_the_brief_reads_as_promised():
    with pytest.raises(ConfigError) as e:
        check_montage_geometry(48, 224, 16, [1, 1, 1, 2], "roi_align")
    assert "data.batch_size=48" in str(e.value) and "use data.batch_size=32 or 64" in str(e.value)
    with pytest.raises(ConfigError) as e:
        check_montage_geometry(48, 224, 16, [1, 1, 1, 1], "pool")  # the former B/64 and the pooled readout
    text = str(e.value)
    assert "multiple of 64: use data.batch_size=64" in text and "use views.global_size=128 or 256" in text
    assert "objectives.montage.readout=roi_align" in text


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

import functools  # noqa: E402
import math  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from stratavit.objectives.base import StepState  # noqa: E402
from stratavit.objectives.montage.objective import region_contrast  # noqa: E402


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
    "backbone.depth=2", "backbone.num_heads=2", "views.global_size=32", "views.local_size=32", "data.batch_size=32",
    "objectives.montage.proj_hidden_dim=32", "objectives.montage.pred_hidden_dim=32", "objectives.montage.proj_dim=16",
    "views.global_blur_p=[0.0,0.0]", "views.local_blur_p=0.0",  # tensor blur is most of a test batch's cost
]


def _mcl_module(extra=()):
    from stratavit.config import to_dict
    from stratavit.engine.module import PretrainModule
    from stratavit.recipe import resolve_config

    torch.manual_seed(0)
    cfg = resolve_config("mcl", [*MCL_TINY, *extra])
    return cfg, PretrainModule(to_dict(cfg))


@functools.lru_cache(maxsize=4)
def _batch_of(n: int):
    """A batch of ``n`` random 36-px images in the views of MCL_TINY (all tests here share those views)."""
    from PIL import Image

    from stratavit.data.views import MultiCropTransform, collate_views
    from stratavit.recipe import resolve_config

    tf = MultiCropTransform(resolve_config("mcl", MCL_TINY).views, patch_size=4)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)) for _ in range(n)]
    return collate_views([(tf(im), 0, i) for i, im in enumerate(images)])


def _batch_for(cfg, n=32):
    assert (cfg.views.global_size, cfg.views.local_size, cfg.views.local_crops) == (32, 32, 6)  # MCL_TINY's views
    return _batch_of(n)


def _check_step(module, cfg, batch_n=32):
    obj = module.objectives["montage"]
    batch = _batch_for(cfg, n=batch_n)
    total, logs = module.compute_losses(batch)
    assert torch.isfinite(total)
    # every level of both sides: 2T * CE over B targets starts near 2 * ln B per side
    for i in range(4):
        assert 2 * 2 * math.log(batch_n) * 0.8 < float(logs[f"montage/level{i}"]) < 2 * 2 * math.log(batch_n) * 1.2
    weights = [0.5, 0.25, 0.125, 0.125]
    assert float(total.detach()) == pytest.approx(
        sum(w * float(logs[f"montage/level{i}"]) for i, w in enumerate(weights)), rel=1e-5)
    # the montage canvases went through the student: 2 sides x (B/4 + B/16 + 2B/64) canvases
    layout = obj.student_views(batch, module.state())["montage"].layout  # what the step ran (seeded by the step)
    assert [(side, level, m.ratio, m.copies, m.canvases.shape[0]) for side, level, m in layout] == [
        (s, lv, 2**lv, c, c * batch_n // 4**lv) for s in (0, 1) for lv, c in ((1, 1), (2, 1), (3, 2))]
    for _, level, m in layout:  # every image exactly tile_copies[level] times
        assert torch.bincount(m.sources.flatten(), minlength=batch_n).tolist() == [obj.cfg.tile_copies[level]] * batch_n
    return obj, batch, total


def test_engine_step_with_the_default_roi_align_readout_and_tile_copies():
    cfg, module = _mcl_module(["objectives.montage.pyramid_dim=16", "objectives.montage.neck_convs=1"])
    assert cfg.objectives["montage"].readout == "roi_align" and cfg.objectives["montage"].tile_copies == [1, 1, 1, 2]
    obj, batch, total = _check_step(module, cfg)
    assert obj.readout.strides == [1, 2, 4, 8] and obj.readout.window(32) == 4  # 32-px canvas, patch 4
    student, _ = module.compute_features(batch)
    assert student.extra["montage"][obj.levels[0]].tokens_pre.shape[0] == 2 * (8 + 2 + 1)  # B = 32: B/4 + B/16 + 2B/64
    total.backward()
    assert module.backbone.vit.patch_embed.proj.weight.grad is None  # frozen patch embedding (mcl recipe)
    assert module.backbone.vit.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in obj.readout.parameters() if p.requires_grad)
    assert all(p.grad is not None for p in obj.predictors.parameters() if p.requires_grad)


def test_engine_step_with_the_pool_readout_trains_the_backbone_through_the_tiles():
    cfg, module = _mcl_module(["objectives.montage.readout=pool"])
    obj = module.objectives["montage"]
    assert obj in module._extra_viewers and module.teacher.heads["montage"] is not obj.neck
    obj, batch, total = _check_step(module, cfg)
    total.backward()
    assert module.backbone.vit.patch_embed.proj.weight.grad is None
    assert module.backbone.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in obj.predictors.parameters() if p.requires_grad)


def test_former_b64_layout_is_a_switch():
    cfg, module = _mcl_module(["objectives.montage.readout=pool", "objectives.montage.tile_copies=[1,1,1,1]",
                               "data.batch_size=64"])
    obj = module.objectives["montage"]
    crops = [SimpleNamespace(images=torch.randn(64, 3, 32, 32)) for _ in range(6)]
    views = obj.student_views(SimpleNamespace(batch_size=64, local_views=crops), StepState(0, 0, 1, 1))  # montages only
    assert [m.canvases.shape[0] for _, _, m in views["montage"].layout] == [16, 4, 1] * 2
    with pytest.raises(ConfigError, match="multiple of 64: use data.batch_size=64"):
        _mcl_module(["objectives.montage.readout=pool", "objectives.montage.tile_copies=[1,1,1,1]"])


def test_setup_problems_come_in_one_message_and_the_fixes_work():
    bad = ["views.local_crops=2", "data.batch_size=16", "views.local_size=16", "views.global_crops=3",
           "objectives.montage.readout=pool", "views.global_size=48"]
    with pytest.raises(ConfigError) as e:
        _mcl_module(bad)
    text = str(e.value)
    assert text.startswith("objectives.montage: 5 problems:")
    for part in ("views.global_crops=3", "views.local_crops=2", "views.local_size=16", "data.batch_size=16",
                 "use data.batch_size=32", "views.global_size=48", "use views.global_size=32 or 64",
                 "objectives.montage.readout=roi_align"):
        assert part in text, part
    # apply the suggestions: it builds
    _mcl_module(["views.local_crops=6", "data.batch_size=32", "views.local_size=64", "views.global_crops=2",
                 "objectives.montage.readout=pool", "views.global_size=64", "backbone.img_size=64"])
    _mcl_module(["data.batch_size=32", "objectives.montage.readout=roi_align", "views.global_size=48",
                 "views.local_size=48", "backbone.img_size=48"])
    cfg, module = _mcl_module()
    with pytest.raises(ConfigError, match="a batch of 16 images.*multiple of 32"):  # a hand-made partial batch
        module.compute_losses(_batch_for(cfg, n=16))


def test_montage_config_errors_come_in_one_message():
    with pytest.raises(ConfigError) as e:
        _mcl_module(["objectives.montage.level_weights=[1.0]", "objectives.montage.tile_copies=[1,0]"])
    text = str(e.value)
    assert "objectives.montage.level_weights: give one level weight per montage level (4), not 1" in text
    assert "objectives.montage.tile_copies: give one value per montage level (4), not 2" in text
    assert "objectives.montage.tile_copies must all be >= 1" in text
    with pytest.raises(ConfigError, match=r"tile_copies\[0\] must be 1"):
        _mcl_module(["objectives.montage.tile_copies=[2,1,1,2]"])
    # fewer montage levels: give weights and copies of that length
    cfg, module = _mcl_module(["objectives.montage.montage_levels=2", "objectives.montage.level_weights=[0.5,0.5]",
                               "objectives.montage.tile_copies=[1,1]", "views.local_crops=2", "data.batch_size=4"])
    assert module.objectives["montage"].readout.strides == [4, 8]
