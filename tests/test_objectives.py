"""Objectives wired to backbone features: view ordering, symmetric pairs, last-layer freezing."""

from __future__ import annotations

import pytest
import torch

from stratavit.backbones.features import LevelFeatures
from stratavit.backbones.vit import Backbone
from stratavit.config import BackboneConfig
from stratavit.objectives import (
    DINO,
    DINOConfig,
    InfoNCE,
    InfoNCEConfig,
    StepState,
    ViewFeatures,
)
from stratavit.objectives.infonce import infonce_loss

B, C = 4, 16


def _backbone() -> Backbone:
    return Backbone(BackboneConfig(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=C, depth=2, num_heads=2))


def _features(bb: Backbone, n: int, batch: int = B, seed: int = 0) -> dict[int, LevelFeatures]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n * batch, 17, C, generator=g)
    return {2: LevelFeatures(tokens, (4, 4), bb.vit.norm)}


def _state(epoch: int = 0) -> StepState:
    return StepState(step=0, epoch=epoch, steps_per_epoch=10, total_steps=100)


def test_infonce_objective_is_the_symmetric_moco_loss():
    torch.manual_seed(0)
    bb = _backbone()
    obj = InfoNCE(InfoNCEConfig(levels=[-1], proj_hidden_dim=32, proj_dim=8, pred_hidden_dim=32), bb).eval()
    s, t = _features(bb, 2, seed=1), _features(bb, 2, seed=2)
    student = ViewFeatures(s, None, 2, 0, None)  # type: ignore[arg-type]
    teacher = ViewFeatures(t, None, 2, 0, None)  # type: ignore[arg-type]
    out = obj(student, teacher, obj.teacher_head(), _state())
    q = obj.predictors["2"](obj.projectors["2"](s[2].cls))
    k = obj.projectors["2"](t[2].cls)
    want = infonce_loss(q[:B], k[B:], 0.2) + infonce_loss(q[B:], k[:B], 0.2)
    torch.testing.assert_close(out.loss, want)


def test_dino_last_layer_frozen_in_first_epoch_only():
    torch.manual_seed(0)
    bb = _backbone()
    obj = DINO(DINOConfig(out_dim=32, hidden_dim=16, bottleneck_dim=8, freeze_last_layer_epochs=1), bb)
    head_t = DINO(DINOConfig(out_dim=32, hidden_dim=16, bottleneck_dim=8), bb).head
    for epoch, frozen in ((0, True), (1, False)):
        s = ViewFeatures(_features(bb, 2), _features(bb, 3, seed=3), 2, 3, None)  # type: ignore[arg-type]
        t = ViewFeatures(_features(bb, 2, seed=4), None, 2, 0, None)  # type: ignore[arg-type]
        obj.zero_grad()
        out = obj(s, t, head_t, _state(epoch))
        out.loss.backward()
        obj.on_after_backward(_state(epoch))
        v = obj.head.last_layer.parametrizations.weight.original1
        assert (v.grad is None) == frozen
        assert obj.head.mlp[0].weight.grad is not None
    assert torch.count_nonzero(obj.center) > 0  # centre moved towards the teacher mean


@pytest.mark.parametrize("recipe,name", [("dino", "dino"), ("ibot", "ibot_mim"), ("local-global", "patch_match")])
def test_one_global_view_and_no_local_views_is_refused_in_one_line(recipe, name, tmp_path, cifar_train, capsys):
    """A DINO-style loss compares each teacher global view with the other views: with one global view
    and no local views there is no pair, which is said before training, in one line, exit 2."""
    from conftest import TINY
    from stratavit.cli import main

    capsys.readouterr()
    code = main(["pretrain", "--recipe", recipe, "--data", str(cifar_train), "--out", str(tmp_path / "x"), *TINY,
                 "views.global_crops=1", "views.local_crops=0", "train.max_steps=1"])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in out + err
    assert len(lines) == 1 and lines[0].startswith("stratavit pretrain: error: ")
    assert (f"objectives.{name} compares each teacher global view with the student's other views, and "
            "views.global_crops=1 with views.local_crops=0 leaves no pair: set views.global_crops=2 or "
            "views.local_crops=1 (or more)") in lines[0]
