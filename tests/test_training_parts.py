"""Schedules and the EMA teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from stratavit.backbones.vit import Backbone
from stratavit.config import BackboneConfig
from stratavit.engine.schedules import cosine_schedule, momentum_schedule
from stratavit.engine.teacher import Teacher
from stratavit.objectives.heads import DINOHead, moco_mlp


def test_cosine_schedule_endpoints_and_warmup():
    s = cosine_schedule(1.0, 0.0, 10, warmup_steps=4)
    assert len(s) == 10
    np.testing.assert_allclose(s[:4], [0.0, 0.25, 0.5, 0.75])
    assert s[4] == pytest.approx(1.0)
    assert np.all(np.diff(s[4:]) < 0)
    m = momentum_schedule(0.99, 1.0, 101)
    assert m[0] == pytest.approx(0.99) and m[50] == pytest.approx(1 - 0.01 * (1 + np.cos(np.pi * 50 / 101)) / 2) and m[-1] == pytest.approx(1.0, abs=1e-5)


def test_teacher_ema_update():
    torch.manual_seed(0)
    bb = Backbone(BackboneConfig(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2))
    head = moco_mlp(16, 8, 4, 2)
    teacher = Teacher(bb, {"x": head})
    assert all(not p.requires_grad for p in teacher.parameters())
    before = [p.clone() for p in teacher.parameters()]
    with torch.no_grad():
        for p in list(bb.parameters()) + list(head.parameters()):
            p.add_(1.0)
    teacher.update(bb, {"x": head}, 0.9)
    for b, t in zip(before, teacher.parameters()):
        torch.testing.assert_close(t, b + 0.1)  # 0.9 b + 0.1 (b + 1)
    teacher.train()
    assert not teacher.backbone.training and teacher.heads.training


def test_heads_shapes_and_dino_weight_norm():
    mlp = moco_mlp(32, 64, 16, 3)
    assert mlp(torch.randn(5, 32)).shape == (5, 16)
    assert not any(isinstance(m, nn.Linear) and m.bias is not None for m in mlp)
    head = DINOHead(32, 100, hidden_dim=64, bottleneck_dim=16)
    assert head(torch.randn(4, 32)).shape == (4, 100)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    # with the gain fixed at 1, every prototype (row) has unit norm
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(100))


def test_compiled_backbones_keep_their_state_dict_and_losses():
    """train.compile: torch.compile in place (here the 'eager' backend: no C compiler needed)."""
    import numpy as np
    from PIL import Image

    from stratavit.config import to_dict
    from stratavit.data.views import MultiCropTransform, collate_views
    from stratavit.engine.module import PretrainModule
    from stratavit.recipe import resolve_config

    over = ["backbone.arch=vit_tiny_patch16_224", "backbone.img_size=32", "backbone.patch_size=4",
            "backbone.embed_dim=32", "backbone.depth=2", "backbone.num_heads=2", "views.global_size=32",
            "objectives.infonce.proj_hidden_dim=32", "objectives.infonce.pred_hidden_dim=32", "train.compile=true"]
    cfg = resolve_config("mocov3", over)
    assert cfg.train.compile is True
    torch.manual_seed(0)
    plain = PretrainModule(to_dict(cfg))
    torch.manual_seed(0)
    compiled = PretrainModule(to_dict(cfg))
    keys = list(compiled.state_dict())
    compiled.compile_backbones(backend="eager")
    assert list(compiled.state_dict()) == keys
    tf = MultiCropTransform(cfg.views, 4)
    rng = np.random.default_rng(0)
    batch = collate_views([(tf(Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))), 0, i)
                           for i in range(8)])
    torch.manual_seed(1)
    a, _ = plain.compute_losses(batch)
    torch.manual_seed(1)
    b, _ = compiled.compute_losses(batch)
    assert torch.allclose(a, b, atol=1e-5)


def test_objective_capabilities_are_declared_by_protocols():
    """The engine finds what an objective does beyond its loss with isinstance on small protocols."""
    from stratavit.objectives import OBJECTIVES
    from stratavit.objectives.base import (
        AddsStudentViews,
        AdjustsGradients,
        AugmentsStudent,
        MasksStudent,
        NeedsDatasetPass,
        Objective,
    )

    found = {P.__name__: sorted(n for n, c in OBJECTIVES.items() if issubclass(c, P))
             for P in (MasksStudent, AugmentsStudent, AddsStudentViews, AdjustsGradients, NeedsDatasetPass)}
    assert found == {
        "MasksStudent": ["ibot_mim"],
        "AugmentsStudent": ["patch_match"],
        "AddsStudentViews": ["montage"],
        "AdjustsGradients": ["dino", "ibot_mim", "patch_match"],
        "NeedsDatasetPass": ["protonce"],
    }
    assert not any(hasattr(Objective, m) for m in ("student_masks", "augment_student", "student_views",
                                                   "on_after_backward", "needs_dataset_pass"))


def test_module_takes_a_typed_config_and_saves_it_as_a_dict():
    from stratavit.config import to_dict
    from stratavit.engine.module import PretrainModule
    from stratavit.recipe import resolve_config

    over = ["backbone.arch=vit_tiny_patch16_224", "backbone.img_size=32", "backbone.patch_size=4",
            "backbone.embed_dim=32", "backbone.depth=1", "backbone.num_heads=2", "views.global_size=32",
            "objectives.infonce.proj_hidden_dim=32", "objectives.infonce.pred_hidden_dim=32"]
    cfg = resolve_config("mocov3", over)
    typed = PretrainModule(cfg)
    assert typed.hparams["config"] == to_dict(cfg) and typed.cfg is cfg
    from_dict = PretrainModule(to_dict(cfg))  # what load_from_checkpoint passes
    assert from_dict.cfg == cfg and from_dict.hparams["config"] == to_dict(cfg)
