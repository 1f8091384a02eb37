"""Every shipped recipe runs at its own defaults (the papers' sizes: 224-px crops, patch 16, the
full heads) on real images of at least 224 px; only the depth, the steps and the batch are reduced,
as a CPU user's first smoke test would (plus no loader workers and no progress bar)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from stratavit.engine.train import pretrain
from stratavit.recipe import load_config_file, recipe_names, resolve_config

# the smallest batch each recipe accepts at its defaults (MCL: level 3 puts 64 tiles on B/32 canvases)
BATCH = {"mcl": 32, "mcl-resnet": 32}


@pytest.fixture(scope="module")
def large_horses(horses_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flat folder of the Weizmann horse photos whose shorter side is at least 224 px (98 of 328)."""
    folder = tmp_path_factory.mktemp("horses224")
    n = 0
    for split in ("train", "val"):
        for path in sorted((horses_dir / split / "images").iterdir()):
            with Image.open(path) as im:
                if min(im.size) >= 224:
                    os.symlink(path, folder / f"{split}_{path.name}")
                    n += 1
    assert n >= 64, n
    return folder


def test_every_recipe_is_covered():
    assert set(recipe_names()) == {"cl-edi", "dino", "ibot", "local-global", "mcl", "mcl-resnet", "mcvt", "mocov3", "sere"}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", recipe_names())
def test_recipe_runs_two_steps_at_its_shipped_defaults(recipe, large_horses, tmp_path):
    shipped = resolve_config(recipe)
    overrides = [
        "train.max_steps=2",
        f"data.batch_size={BATCH.get(recipe, 4)}",
        "data.num_workers=0",
        "train.progress_bar=false",
        "train.log_every_n_steps=1",
    ]
    if shipped.backbone.type == "vit":
        overrides.append("backbone.depth=2")
    run = pretrain(recipe, str(large_horses), tmp_path / recipe, overrides)
    summary = json.loads((run / "run.json").read_text())
    assert summary["global_step"] == 2 and summary["nonfinite_steps"] == 0
    assert (run / "backbone.safetensors").exists()
    # nothing but depth, steps and batch changed: the run trained at the recipe's sizes
    ran = load_config_file(run / "config.yaml")
    assert ran.views == shipped.views and ran.objectives == shipped.objectives and ran.optim == shipped.optim
    assert ran.views.global_size == 224
