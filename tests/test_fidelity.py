"""The base methods against independent references written from the papers / the authors' method
descriptions (never their code): MoCo v3's ViT heads, per-tensor gradient clipping, the lr warm-up
shapes, DINO's and iBOT's teacher-temperature arrays, and the recipes' switches that select them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stratavit.backbones.features import LevelFeatures
from stratavit.backbones.vit import Backbone
from stratavit.config import BackboneConfig
from stratavit.engine.schedules import cosine_schedule
from stratavit.objectives import InfoNCE, InfoNCEConfig, StepState, ViewFeatures
from stratavit.objectives.dino import DINOConfig, teacher_temperature
from stratavit.objectives.heads import ContrastiveHeadConfig, predictor_last_bn
from stratavit.objectives.ibot_mim.objective import (
    IBOTConfig,
    teacher_patch_temperature,
)
from stratavit.objectives.patch_aggregate import PatchAggregate, PatchAggregateConfig
from stratavit.recipe import resolve_config

B, C = 8, 16


def _backbone() -> Backbone:
    return Backbone(BackboneConfig(arch="vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=C, depth=2, num_heads=2))


# ---------------------------------------------------------------------------------- MoCo v3 heads


def _ref_bn(x: torch.Tensor, bn: nn.BatchNorm1d) -> torch.Tensor:
    """Training-mode batch norm from its definition: biased batch variance, eps 1e-5, optional affine."""
    y = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + bn.eps)
    return y * bn.weight + bn.bias if bn.affine else y


def _ref_mlp(x: torch.Tensor, layers: nn.Sequential, last_bn: bool) -> torch.Tensor:
    """MoCo v3's MLP read from the paper: [Linear(no bias), BN, ReLU] x (L-1), Linear, [BN no affine]."""
    linears = [m for m in layers if isinstance(m, nn.Linear)]
    bns = [m for m in layers if isinstance(m, nn.BatchNorm1d)]
    for i, lin in enumerate(linears):
        assert lin.bias is None
        x = x @ lin.weight.t()
        if i < len(linears) - 1:
            x = F.relu(_ref_bn(x, bns[i]))
    if last_bn:
        assert not bns[-1].affine
        x = _ref_bn(x, bns[-1])
    return x


def _ref_ctr(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """2τ · mean_i −log( exp(q_i·k_i/τ) / Σ_j exp(q_i·k_j/τ) ), q and k l2-normalised, by explicit sums."""
    q = q / q.norm(dim=1, keepdim=True)
    k = k / k.norm(dim=1, keepdim=True)
    total = 0.0
    for i in range(q.shape[0]):
        logits = torch.stack([q[i] @ k[j] / tau for j in range(k.shape[0])])
        total = total - (logits[i] - torch.logsumexp(logits, 0))
    return 2 * tau * total / q.shape[0]


def test_vit_predictor_ends_with_batchnorm_without_affine_and_matches_moco_v3():
    torch.manual_seed(0)
    bb = _backbone()
    cfg = InfoNCEConfig(levels=[-1], proj_hidden_dim=32, proj_dim=8, pred_hidden_dim=24)
    obj = InfoNCE(cfg, bb).train()
    pred = obj.predictors["2"]
    assert isinstance(pred[-1], nn.BatchNorm1d) and not pred[-1].affine  # MoCo_ViT's predictor
    assert [type(m) for m in pred] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    g = torch.Generator().manual_seed(1)
    tokens_s = torch.randn(2 * B, 17, C, generator=g)
    tokens_t = torch.randn(2 * B, 17, C, generator=g)
    s = {2: LevelFeatures(tokens_s, (4, 4), bb.vit.norm)}
    t = {2: LevelFeatures(tokens_t, (4, 4), bb.vit.norm)}
    state = StepState(step=0, epoch=0, steps_per_epoch=10, total_steps=100)
    # the teacher's projector is the EMA copy: identical weights at initialisation
    out = obj(ViewFeatures(s, None, 2, 0, None), ViewFeatures(t, None, 2, 0, None), obj.teacher_head(), state)  # type: ignore[arg-type]

    with torch.no_grad():
        feat_s = bb.vit.norm(tokens_s)[:, 0]
        feat_t = bb.vit.norm(tokens_t)[:, 0]
        # MoCo v3 runs the heads once per view: batch-norm statistics of one view's batch
        qs = [_ref_mlp(_ref_mlp(x, obj.projectors["2"], True), pred, True) for x in feat_s.chunk(2)]
        ks = [_ref_mlp(x, obj.projectors["2"], True) for x in feat_t.chunk(2)]
        want = _ref_ctr(qs[0], ks[1], 0.2) + _ref_ctr(qs[1], ks[0], 0.2)  # ctr(q1, k2) + ctr(q2, k1)
        got_q = obj.query(s[2], 2, n_views=2)
        got_k = obj.key(t[2], 2, obj.teacher_head(), n_views=2)
    torch.testing.assert_close(got_q, torch.cat(qs), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_k, torch.cat(ks), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.loss.detach(), want, rtol=1e-4, atol=1e-5)
    # the former predictor (no final BN) and batch statistics over both views give other queries
    no_bn = torch.cat([_ref_mlp(_ref_mlp(x, obj.projectors["2"], True), pred, False) for x in feat_s.chunk(2)])
    assert not torch.allclose(no_bn, got_q, atol=1e-2)
    joint = _ref_mlp(_ref_mlp(feat_s, obj.projectors["2"], True), pred, True)
    assert not torch.allclose(joint, got_q, atol=1e-3)


def test_cl_edi_module_b_predictor_has_the_final_batchnorm_too():
    bb = _backbone()
    pa = PatchAggregate(PatchAggregateConfig(aggregator="mean_mlp", proj_hidden_dim=32, proj_dim=8, pred_hidden_dim=16), bb)
    assert isinstance(pa.predictor[-1], nn.BatchNorm1d) and not pa.predictor[-1].affine


def test_predictor_final_batchnorm_follows_the_backbone_unless_set():
    from stratavit.backbones.pyramid import PyramidBackbone

    vit = _backbone()
    assert predictor_last_bn(ContrastiveHeadConfig(), vit) is True
    assert predictor_last_bn(ContrastiveHeadConfig(pred_last_bn=False), vit) is False
    cnn = PyramidBackbone(BackboneConfig(type="resnet_fpn", arch="resnet18", fpn_dim=16))
    assert predictor_last_bn(ContrastiveHeadConfig(), cnn) is False  # MoCo v3's ResNet variant drops it
    for recipe, names in (("mocov3", ["infonce"]), ("mcvt", ["infonce", "protonce"]), ("cl-edi", ["infonce", "patch_aggregate"])):
        cfg = resolve_config(recipe)
        for name in names:
            assert cfg.objectives[name].pred_last_bn is None  # = the authors' choice: BN on the ViT


# ---------------------------------------------------------------------------------- clipping


def _ref_clip_per_tensor(grads: list[torch.Tensor], clip: float) -> list[torch.Tensor]:
    """DINO's clip_gradients from its description: each tensor scaled by clip/(‖g‖+1e-6) if that is < 1."""
    out = []
    for g in grads:
        norm = math.sqrt(float((g.double() ** 2).sum()))
        coef = clip / (norm + 1e-6)
        out.append(g * coef if coef < 1 else g.clone())
    return out


def _tiny_module(recipe: str, *extra: str):
    from stratavit.config import to_dict
    from stratavit.engine.module import PretrainModule

    overrides = [
        "backbone.img_size=32", "backbone.patch_size=8", "backbone.embed_dim=32", "backbone.depth=2",
        "backbone.num_heads=2", "views.global_size=32", "views.local_size=16", "data.batch_size=4",
        "objectives.dino.out_dim=64", "objectives.dino.hidden_dim=32", "objectives.dino.bottleneck_dim=16", *extra,
    ]
    return PretrainModule(to_dict(resolve_config(recipe, overrides)))


def test_per_tensor_clipping_clips_every_tensor_on_its_own():
    torch.manual_seed(0)
    module = _tiny_module("dino")
    assert module.cfg.optim.clip_mode == "per_tensor" and module.cfg.optim.clip_grad == 3.0
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 5
    before = [p.grad.clone() for p in params]
    opt = torch.optim.SGD(params, lr=0.1)
    module.configure_gradient_clipping(opt, 3.0, "norm")
    want = _ref_clip_per_tensor(before, 3.0)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-6)
        assert float(p.grad.norm()) <= 3.0 + 1e-4
    joint = math.sqrt(sum(float((p.grad ** 2).sum()) for p in params))
    assert joint > 3.0 * 2  # many tensors at norm 3: the joint norm is far above the threshold


@pytest.mark.slow
def test_a_training_step_clips_through_clip_mode(monkeypatch, tmp_path, cifar_train):
    """In a real Lightning step of the dino recipe, clipping goes through optim.clip_mode."""
    from conftest import TINY

    import stratavit.engine.module as module_mod
    from stratavit.engine.train import pretrain

    calls: list[float] = []
    real = module_mod.clip_per_tensor

    def spy(params, clip, eps=1e-6):
        calls.append(clip)
        return real(params, clip, eps)

    monkeypatch.setattr(module_mod, "clip_per_tensor", spy)
    small = ["objectives.dino.out_dim=64", "objectives.dino.hidden_dim=32", "objectives.dino.bottleneck_dim=16",
             "views.local_crops=2", "train.max_steps=2"]
    pretrain("dino", str(cifar_train), tmp_path / "pt", [*TINY, *small])
    assert calls == [3.0, 3.0]  # every step, at the recipe's threshold
    calls.clear()
    pretrain("dino", str(cifar_train), tmp_path / "gl", [*TINY, *small, "optim.clip_mode=global"])
    assert calls == []  # Lightning's global-norm clipping instead
    for recipe in ("dino", "ibot", "sere", "local-global"):
        assert resolve_config(recipe).optim.clip_mode == "per_tensor", recipe
    for recipe in ("mocov3", "mcvt", "cl-edi", "mcl", "mcl-resnet"):
        assert resolve_config(recipe).optim.clip_mode == "global", recipe


# ---------------------------------------------------------------------------------- schedules


def _ref_dino_schedule(base: float, final: float, epochs: int, niter: int, warmup_epochs: int) -> np.ndarray:
    """DINO's cosine_scheduler as described: linspace(0, base, W) (end included), then cosine over the rest."""
    w = warmup_epochs * niter
    warm = np.linspace(0.0, base, w)
    iters = np.arange(epochs * niter - w)
    return np.concatenate([warm, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))])


def _ref_moco_schedule(base: float, epochs: int, niter: int, warmup_epochs: int) -> np.ndarray:
    """MoCo v3's per-iteration lr: e = epoch + i/niter; lr·e/W during warm-up, then half-cosine to 0."""
    out = []
    for s in range(epochs * niter):
        e = s / niter
        if e < warmup_epochs:
            out.append(base * e / warmup_epochs)
        else:
            out.append(base * 0.5 * (1 + math.cos(math.pi * (e - warmup_epochs) / (epochs - warmup_epochs))))
    return np.array(out)


@pytest.mark.parametrize("epochs,niter,warm", [(10, 7, 2), (5, 3, 1), (100, 4, 10)])
def test_lr_schedules_match_dino_and_moco_v3(epochs, niter, warm):
    dino = cosine_schedule(5e-4, 1e-6, epochs * niter, warm * niter, warmup_includes_end=True)
    np.testing.assert_allclose(dino, _ref_dino_schedule(5e-4, 1e-6, epochs, niter, warm), rtol=1e-12, atol=1e-15)
    assert dino[warm * niter - 1] == pytest.approx(5e-4)  # the ramp ends at the base lr
    moco = cosine_schedule(1.5e-4, 0.0, epochs * niter, warm * niter, warmup_includes_end=False)
    np.testing.assert_allclose(moco, _ref_moco_schedule(1.5e-4, epochs, niter, warm), rtol=1e-12, atol=1e-15)


def test_recipes_choose_their_authors_warmup_shape():
    for recipe in ("dino", "ibot", "sere", "local-global"):
        assert resolve_config(recipe).optim.warmup_includes_end is True, recipe
    for recipe in ("mocov3", "mcvt", "cl-edi", "mcl", "mcl-resnet"):
        assert resolve_config(recipe).optim.warmup_includes_end is False, recipe


def _ref_teacher_temps(warm_t: float, t: float, warm_epochs: int, epochs: int, start: int = 0) -> np.ndarray:
    """DINO's / iBOT's per-epoch teacher-temperature arrays as described in the papers' code READMEs:
    [warm_t] * start, linspace(warm_t, t, W), then t."""
    return np.concatenate([
        np.full(start, warm_t), np.linspace(warm_t, t, warm_epochs), np.full(epochs - warm_epochs - start, t),
    ])


@pytest.mark.parametrize("warm", [0, 1, 2, 5, 30])
def test_dino_teacher_temperature_is_the_reference_array(warm):
    cfg = DINOConfig(teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=warm)
    ref = _ref_teacher_temps(0.04, 0.07, warm, 40)
    np.testing.assert_allclose([teacher_temperature(cfg, e) for e in range(40)], ref, rtol=1e-12)
    if warm == 1:
        assert teacher_temperature(cfg, 0) == pytest.approx(0.04)  # linspace(0.04, 0.07, 1) == [0.04]


@pytest.mark.parametrize("warm,start", [(0, 0), (1, 0), (1, 3), (5, 0), (5, 3), (30, 2)])
def test_ibot_patch_temperature_is_the_reference_array(warm, start):
    cfg = IBOTConfig(
        teacher_patch_temp=0.07, warmup_teacher_patch_temp=0.04, warmup_teacher_temp_epochs=warm, pred_start_epoch=start,
    )
    ref = _ref_teacher_temps(0.04, 0.07, warm, 50, start)
    np.testing.assert_allclose([teacher_patch_temperature(cfg, e) for e in range(50)], ref, rtol=1e-12)
    for e in range(start):  # before masking starts: the warm-up value, as the docstring says
        assert teacher_patch_temperature(cfg, e) == pytest.approx(0.04)
