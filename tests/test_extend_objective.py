"""Adding an objective takes the steps of docs/adding-an-objective.md: one file (here: the class
below), one entry in the registry, a recipe that names it. Nothing in the engine, the config or the
CLI changes: the new section is validated, overridable, trained and logged like the shipped ones."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TINY
from torch import Tensor

from stratavit.backbones.features import FeatureBackbone, LevelFeatures
from stratavit.backbones.vit import Backbone
from stratavit.cli import main
from stratavit.config import BackboneConfig, ConfigError
from stratavit.objectives import (
    OBJECTIVES,
    Objective,
    ObjectiveConfig,
    ObjectiveOutput,
    StepState,
    ViewFeatures,
)
from stratavit.recipe import resolve_config

# ------------------------------------------------------------------------------------------------
# Step 1: the objective's file (src/stratavit/objectives/cls_cosine.py in a real change)


def cosine_regression(p: Tensor, z: Tensor) -> Tensor:
    """BYOL's regression loss ``2 - 2 cos(p, z)``, averaged over the batch: (B, C), (B, C) -> scalar."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


@dataclass
class ClsCosineConfig(ObjectiveConfig):
    swap: bool = True
    """Regress each student view on the teacher's *other* view (False: on the same view)."""


class ClsCosine(Objective):
    """Each student global view's CLS regresses the teacher's CLS of a global view, at one level."""

    name = "cls_cosine"
    config_class = ClsCosineConfig

    def __init__(self, cfg: ClsCosineConfig, backbone: FeatureBackbone) -> None:
        super().__init__(cfg, backbone)
        self.level = self.require_one_level("its CLS token")

    def forward(self, student: ViewFeatures, teacher: ViewFeatures, teacher_head, state: StepState) -> ObjectiveOutput:
        s = student.global_[self.level].cls.float().chunk(student.n_global)
        t = teacher.global_[self.level].cls.float().chunk(teacher.n_global)
        n = len(s)
        pairs = [(i, (i + 1) % n if self.cfg.swap and n > 1 else i) for i in range(n)]
        loss = torch.stack([cosine_regression(s[i], t[j]) for i, j in pairs]).mean()
        return ObjectiveOutput(loss, {"cls_cosine/pairs": float(len(pairs))})


# ------------------------------------------------------------------------------------------------


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 2: one entry in the registry (``OBJECTIVES`` in stratavit/objectives/__init__.py)."""
    monkeypatch.setitem(OBJECTIVES, ClsCosine.name, ClsCosine)


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    """Step 3: a recipe that names it (a YAML file; shipped ones live in stratavit/recipes/)."""
    path = tmp_path / "cls-cosine.yaml"
    path.write_text(yaml.safe_dump({
        "description": "example: CLS cosine regression on the EMA teacher (BYOL's loss without a predictor)",
        "objectives": {"cls_cosine": {"weight": 1.0, "levels": [-1]}},
        "optim": {"base_lr": 1e-3, "warmup_epochs": 0.0},
        "teacher": {"momentum": 0.99, "momentum_end": 1.0},
    }))
    return path


def test_the_loss_against_hand_computed_values():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    z = torch.tensor([[1.0, 1.0], [0.0, -3.0]])
    # cos = 1/sqrt(2) and -1: (2 - sqrt(2) + 4) / 2
    assert cosine_regression(p, z).item() == pytest.approx((6 - 2 ** 0.5) / 2)


def test_the_objective_on_given_features():
    bb = Backbone(BackboneConfig(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=8, depth=2, num_heads=2))
    obj = ClsCosine(ClsCosineConfig(levels=[-1]), bb)
    g = torch.Generator().manual_seed(0)
    s = {2: LevelFeatures(torch.randn(2 * 3, 17, 8, generator=g), (4, 4), torch.nn.Identity())}
    t = {2: LevelFeatures(torch.randn(2 * 3, 17, 8, generator=g), (4, 4), torch.nn.Identity())}
    out = obj(ViewFeatures(s, None, 2, 0, None), ViewFeatures(t, None, 2, 0, None), None,  # type: ignore[arg-type]
              StepState(step=0, epoch=0, steps_per_epoch=1, total_steps=1))
    sc, tc = s[2].tokens_pre[:, 0], t[2].tokens_pre[:, 0]
    expected = (cosine_regression(sc[:3], tc[3:]) + cosine_regression(sc[3:], tc[:3])) / 2
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_config_validates_and_overrides_the_new_section(registered, recipe):
    cfg = resolve_config(str(recipe), ["objectives.cls_cosine.swap=false"])
    assert isinstance(cfg.objectives["cls_cosine"], ClsCosineConfig) and cfg.objectives["cls_cosine"].swap is False
    with pytest.raises(ConfigError, match="Did you mean 'swap'"):
        resolve_config(str(recipe), ["objectives.cls_cosine.swp=false"])


@pytest.mark.slow
def test_it_trains_through_the_cli_like_a_shipped_objective(registered, recipe, cifar_train, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["pretrain", "--recipe", str(recipe), "--data", str(cifar_train), "--out", str(run),
                 *TINY, "train.max_steps=3", "train.epochs=1"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((run / "run.json").read_text())["global_step"] == 3
    with (run / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    losses = [float(r["loss/cls_cosine"]) for r in rows if r.get("loss/cls_cosine")]
    assert len(losses) == 3 and all(0 <= v <= 4 for v in losses)  # 2 - 2 cos lies in [0, 4]
    assert (run / "backbone.safetensors").exists()
