"""The small-compute preset (train.preset): when it applies, what it sets, and that overrides win."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stratavit.config import ConfigError
from stratavit.data.datasets import SAMPLE_NAME
from stratavit.engine.preset import apply_preset, auto_applies, preset_overrides, small_view_size
from stratavit.recipe import resolve_config

RECIPES = ["mocov3", "dino", "ibot", "mcvt", "cl-edi", "sere", "local-global", "mcl"]


def _new_run(recipe: str, *overrides: str):
    given = [f"data.path={SAMPLE_NAME}", *overrides]
    return apply_preset(resolve_config(recipe, given), recipe, given)


def test_view_and_patch_size_make_an_8x8_token_grid():
    assert small_view_size(32) == (32, 4)
    assert small_view_size(64) == (64, 8)
    assert small_view_size(40) == (40, 5)
    assert small_view_size(28) == (27, 3)  # patch 28 // 8 = 3; the view 28 // 3 * 3 = 27
    assert small_view_size(5) == (5, 1)
    assert small_view_size(32, 4) == (32, 8)


def test_auto_applies_on_small_images_without_size_overrides():
    cifar = [(32, 32)] * 5
    assert auto_applies(cifar, ["data.path=x", "optim.base_lr=1e-3"]) == 32
    assert auto_applies([(300, 230), (64, 48), (500, 375)], []) is None  # median smallest side 230
    assert auto_applies([(64, 80)] * 3, []) == 64  # at the limit: applies
    assert auto_applies([(65, 80)] * 3, []) is None
    assert auto_applies([], []) is None  # sizes unknown
    for own in ("backbone.depth=2", "views.global_size=32", "data.allow_upsampling=true"):
        assert auto_applies(cifar, [own]) is None  # whoever sets sizes keeps them


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_resolves_under_the_preset(recipe):
    cfg, line = _new_run(recipe)
    assert cfg.train.preset == "small" and line is not None and "train.preset=none" in line
    b, v = cfg.backbone, cfg.views
    coarse = recipe in ("mocov3", "mcvt", "cl-edi")  # 4 x 4 tokens, 192 wide (the sweep's best contrastive run)
    assert (b.img_size, b.patch_size, b.embed_dim, b.depth, b.num_heads) == (
        (32, 8, 192, 4, 3) if coarse else (32, 4, 128, 4, 4))
    assert v.global_size == 32 and v.global_blur_p == [0.0] and v.resize is None
    if recipe == "mcl":
        assert v.local_size == 32  # montage canvases are global-sized
    elif v.local_crops:
        assert v.local_size == 16
    assert cfg.data.batch_size == 64 and cfg.teacher.momentum == cfg.teacher.momentum_end == 0.99


def test_heads_are_scaled_down():
    dino, _ = _new_run("dino")
    d = dino.objectives["dino"]
    assert (d.out_dim, d.hidden_dim, d.bottleneck_dim) == (4096, 512, 128)
    assert dino.views.local_crops == 4
    moco, _ = _new_run("mocov3")
    m = moco.objectives["infonce"]
    assert (m.proj_hidden_dim, m.pred_hidden_dim) == (1024, 1024)


def test_overrides_win_over_the_preset():
    cfg, _ = _new_run("dino", "optim.base_lr=1e-3", "data.batch_size=32", "objectives.dino.out_dim=1024")
    assert cfg.train.preset == "small"
    assert cfg.optim.base_lr == 1e-3 and cfg.data.batch_size == 32 and cfg.objectives["dino"].out_dim == 1024


def test_none_and_size_overrides_keep_the_recipe():
    cfg, line = _new_run("mocov3", "train.preset=none")
    assert line is None and cfg.backbone.arch == "vit_small_patch16_224" and cfg.views.global_size == 224
    cfg, line = _new_run("mocov3", "views.global_size=32", "backbone.patch_size=4", "backbone.img_size=32")
    assert line is None and cfg.train.preset == "none" and cfg.backbone.arch == "vit_small_patch16_224"


def test_large_images_keep_the_recipe_unless_small_is_asked_for(tmp_path):
    from PIL import Image

    (tmp_path / "horse").mkdir()
    for i in range(3):
        Image.new("RGB", (300, 230), (i * 40, 90, 160)).save(tmp_path / "horse" / f"{i}.jpg")
    given = [f"data.path={tmp_path}"]
    cfg, line = apply_preset(resolve_config("dino", given), "dino", given)
    assert line is None and cfg.train.preset == "none" and cfg.views.global_size == 224
    forced = [*given, "train.preset=small"]
    cfg, line = apply_preset(resolve_config("dino", forced), "dino", forced)
    assert line is not None and cfg.train.preset == "small"
    assert (cfg.views.global_size, cfg.backbone.patch_size) == (224, 28)  # 230 // 8 = 28; 8 x 28 = 224


def test_small_without_readable_sizes_is_one_clear_error(tmp_path):
    given = [f"data.path={tmp_path}", "train.preset=small"]
    with pytest.raises(ConfigError, match="train.preset=small"):
        apply_preset(resolve_config("dino", given), "dino", given)


def test_overrides_list_for_a_recipe_without_local_views_has_no_local_size():
    assert not any(o.startswith("views.local_size") for o in preset_overrides("mocov3", 32, 0))
    assert "views.local_size=16" in preset_overrides("dino", 32, 8)


def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("stratavit")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "stratavit.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_recipe_on_cifar_sized_images_just_runs(tmp_path):
    """`--recipe dino` on 32-px images without any size setting: the preset line, then a run that trains."""
    out = tmp_path / "dino"
    r = _cli("pretrain", "--recipe", "dino", "--data", SAMPLE_NAME, "--out", str(out),
             "train.max_steps=2", "data.limit=256", "train.progress_bar=false")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "small-compute preset (images 32 px): ViT 4 x 128, patch 4, views 2 x 32 px + 4 x 16 px" in r.stderr
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["train"]["preset"] == "small" and cfg["views"]["global_size"] == 32
    assert json.loads((out / "run.json").read_text())["global_step"] == 2
    # continuing keeps the recorded config (no second preset decision)
    r2 = _cli("pretrain", "--out", str(out), "train.max_steps=3", "train.progress_bar=false")
    assert r2.returncode == 0, r2.stderr[-2000:]
    assert "small-compute preset" not in r2.stderr


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [r for r in RECIPES if r != "dino"])
def test_every_recipe_trains_under_the_preset(tmp_path, recipe):
    from stratavit import pretrain

    run = pretrain(recipe, SAMPLE_NAME, tmp_path / recipe,
                   ["train.max_steps=2", "data.limit=256", "train.progress_bar=false"])
    assert json.loads((run / "run.json").read_text())["global_step"] == 2
