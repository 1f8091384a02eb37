"""Training throughput of stratavit's ``mocov3`` and ``dino`` against LightlySSL, side by side.

Environment (benchmark only; LightlySSL never goes into the project's .venv). Build it with
``bash bench/lightly_env.sh [/work/bench-venv]``, which runs exactly::

    python3 -m venv /work/bench-venv
    printf 'torch==2.14.1\\ntorchvision==0.29.1\\n' > /work/bench-venv/bench-constraints.txt
    /work/bench-venv/bin/python -m pip install torch==2.14.1 torchvision==0.29.1
    /work/bench-venv/bin/python -m pip install -c /work/bench-venv/bench-constraints.txt -e /work/main
    /work/bench-venv/bin/python -m pip install -c /work/bench-venv/bench-constraints.txt lightly==1.6.0

(the constraints file keeps pip from replacing torch/torchvision when it resolves lightly's deps).

Run (from the repository root)::

    /work/bench-venv/bin/python bench/lightly_compare.py --method both --steps 30 [--repeats 2]
    /work/bench-venv/bin/python bench/lightly_compare.py --method both --threads 1 --fix-dino-loss
        # --threads 1: on a shared, oversubscribed 2-core machine two OpenMP threads stall at every
        # parallel op whenever one is descheduled; one thread gives far steadier ratios
    /work/bench-venv/bin/python bench/lightly_compare.py --method dino --profile 5     # where time goes
    /work/bench-venv/bin/python bench/lightly_compare.py --preset vits16 --device cuda  # ViT-S/16 @ 224

What is compared, per method (one process, one machine, identical inputs):

* **Backbone**: the same timm ViT (``timm.create_model`` with stratavit's ``timm_kwargs``); the
  LightlySSL model starts from a copy of stratavit's initial weights (and heads), and trains the
  same parameters (MoCo v3's frozen patch projection and fixed sin-cos positions are frozen on
  both sides). LightlySSL runs it through its own ViT wrapper ``MaskedVisionTransformerTIMM``
  (as in LightlySSL's ViT benchmarks; ``--lightly-backbone plain`` calls the timm model directly).
* **Views**: multi-view batches built once with stratavit's ``MultiCropTransform`` on real
  CIFAR-10 images (the shipped sample, or ``--data DIR``) before timing; both sides receive the
  same tensors, so data loading and augmentation are excluded.
* **Step**: what one optimiser step really costs, without the Lightning trainer on either side.
  stratavit: ``PretrainModule`` from the resolved recipe (``resolve_config`` + ``to_dict``), i.e.
  ``on_train_batch_start`` (lr / wd schedules), ``compute_losses``, the finite-loss check of
  ``training_step``, backward, ``on_after_backward``, AdamW step, ``on_train_batch_end`` (teacher
  EMA). LightlySSL: the training step of its examples and ViT benchmarks: ``update_momentum`` of
  backbone and heads, one student forward per view group and one teacher forward over the global
  views (``deactivate_requires_grad`` teacher), ``NTXentLoss`` (MoCo v3: symmetric, in-batch
  negatives, τ = 0.2; heads ``MoCoProjectionHead`` 3-layer projector + 2-layer predictor with BN)
  or ``DINOLoss`` (``DINOProjectionHead``, centre, τ_s 0.1, τ_t 0.04), backward,
  ``cancel_last_layer_gradients`` (DINO), AdamW with the same lr, weight-decay split and betas,
  cosine lr / wd / momentum schedules. Gradient clipping only with ``--clip-grad`` (then on both).
* **Check**: before timing, with both students in eval mode (no drop-path, BN running stats),
  both compute their loss on the same batch from the same weights: DINO losses must agree; for
  MoCo v3 stratavit's loss is compared with MoCo v3's loss evaluated on LightlySSL's own q / k
  (LightlySSL's NTXent itself is SimCLR-style and has another value by definition). Forward
  passes, images through each network, head parameter counts and trainable parameters are
  printed for both.

Timing: steps interleave (A B, then B A, ...) after warm-up; the table gives the median seconds
per step, images per second (source images; a step sees ``global + local`` crops of each) and the
ratio stratavit img/s ÷ LightlySSL img/s (> 1: stratavit is faster), the ratio of mean step
times (which, unlike the median, includes stratavit's every-``log_every_n_steps`` collapse
monitor) and the median of per-step paired ratios with a 95 % bootstrap interval (robust to a
noisy shared machine: both sides of a pair ran back to back). ``--profile N`` runs
``torch.profiler`` over N steps of each side and prints where the time goes, per op; on CPU
(or with ``--phases`` on CUDA) a per-phase table (forward + loss, backbone forwards within it,
backward, optimiser, EMA) is printed for every run. ``--fix-dino-loss`` adds a third side:
stratavit with a batched DINO loss, monkeypatched here as a prototype (no source file changes).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import platform
import random
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stratavit.config import to_dict
from stratavit.data.datasets import SAMPLE_NAME, build_dataset
from stratavit.data.views import MultiCropTransform, MultiViewBatch, collate_views
from stratavit.engine.module import PretrainModule
from stratavit.recipe import resolve_config

try:
    import lightly
    from lightly.loss import DINOLoss, NTXentLoss
    from lightly.models.modules import MaskedVisionTransformerTIMM
    from lightly.models.modules.heads import (
        DINOProjectionHead,
        MoCoProjectionHead,
        ProjectionHead,
    )
    from lightly.models.utils import (
        deactivate_requires_grad,
        get_weight_decay_parameters,
        update_momentum,
    )
    from lightly.utils.scheduler import cosine_schedule
except ImportError as e:  # pragma: no cover - environment message
    raise SystemExit(
        f"LightlySSL is not importable ({e}). Build the benchmark environment with "
        "`bash bench/lightly_env.sh /work/bench-venv` and run this script with /work/bench-venv/bin/python."
    ) from None

TOTAL_STEPS = 10_000  # schedule length both sides lay out (only the first steps run)


# ---------------------------------------------------------------------------------------- config


def stratavit_overrides(method: str, args: argparse.Namespace) -> list[str]:
    """Recipe overrides giving the benchmark's backbone, views and head sizes."""
    o = [f"data.batch_size={args.batch_size}", "data.num_workers=0"]
    if args.preset == "small":
        o += [
            "backbone.arch=vit_tiny_patch16_224",
            f"backbone.img_size={args.img}",
            f"backbone.patch_size={args.patch}",
            f"backbone.embed_dim={args.dim}",
            f"backbone.depth={args.depth}",
            f"backbone.num_heads={args.heads}",
            f"views.global_size={args.img}",
            "views.global_blur_p=[0.0]",
        ]
        if method == "dino":
            o += [f"views.local_crops={args.local_crops}", f"views.local_size={args.local_size}",
                  "views.local_scale=[0.1,0.4]", "views.local_blur_p=0.0"]
    elif method == "dino":
        o += [f"views.local_crops={args.local_crops}"]
    if method == "mocov3":
        o += [f"objectives.infonce.proj_hidden_dim={args.proj_hidden}",
              f"objectives.infonce.pred_hidden_dim={args.proj_hidden}",
              f"objectives.infonce.proj_dim={args.proj_dim}"]
    else:
        o += [f"objectives.dino.out_dim={args.out_dim}", f"objectives.dino.hidden_dim={args.dino_hidden}",
              f"objectives.dino.bottleneck_dim={args.dino_bottleneck}"]
    return o


class FakeTrainer:
    """What PretrainModule reads from a Lightning trainer (the trainer itself is not run)."""

    world_size = 1
    estimated_stepping_batches = TOTAL_STEPS
    num_training_batches = 100
    accumulate_grad_batches = 1
    current_epoch = 1  # past DINO's frozen-last-layer epoch on both sides: every head trains
    is_global_zero = True

    def __init__(self, log_every_n_steps: int) -> None:
        self.optimizers: list[torch.optim.Optimizer] = []
        self.global_step = 0
        self.log_every_n_steps = log_every_n_steps  # steps on which the engine logs (and runs its monitors)
        self.fit_loop = SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=0))

    def advance(self) -> None:
        self.global_step += 1
        self.fit_loop.epoch_loop._batches_that_stepped = self.global_step


# ---------------------------------------------------------------------------------------- sides


@dataclass
class Side:
    """One implementation: its step function and what to count."""

    name: str
    step: Callable[[MultiViewBatch], float]
    student_vit: nn.Module
    teacher_vit: nn.Module
    heads: dict[str, nn.Module]  # name -> module (student heads, then teacher heads)
    optimizer: torch.optim.Optimizer
    eval_loss: Callable[[MultiViewBatch], dict[str, Any]]
    set_train: Callable[[], None]
    times: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)


class PhaseClock:
    """Per-step wall time of each named phase of a step (a profiler range too).

    ``active`` turns the timers on; on CUDA each boundary then synchronises (``--phases``).
    """

    active = False
    cuda = False
    current: dict[str, float] = defaultdict(float)

    @classmethod
    def now(cls) -> float:
        if cls.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


class _Phase:
    def __init__(self, name: str) -> None:
        self.name = name
        self.rf = torch.profiler.record_function(name)

    def __enter__(self) -> None:
        self.rf.__enter__()
        if PhaseClock.active:
            self.t0 = PhaseClock.now()

    def __exit__(self, *exc: Any) -> None:
        if PhaseClock.active:
            PhaseClock.current[self.name.split(".", 1)[1]] += PhaseClock.now() - self.t0
        self.rf.__exit__(*exc)


def _rf(name: str) -> _Phase:
    return _Phase(name)


def time_module(module: nn.Module, name: str) -> None:
    """Add the wall time of every forward of ``module`` to the phase ``name`` (forward hooks)."""
    starts: list[float] = []

    def pre(_m: nn.Module, _i: Any) -> None:
        if PhaseClock.active:
            starts.append(PhaseClock.now())

    def post(_m: nn.Module, _i: Any, _o: Any) -> None:
        if PhaseClock.active and starts:
            PhaseClock.current[name] += PhaseClock.now() - starts.pop()

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


def build_stratavit(method: str, args: argparse.Namespace, device: torch.device) -> tuple[Side, PretrainModule]:
    cfg = resolve_config(method, stratavit_overrides(method, args))
    module = PretrainModule(to_dict(cfg)).to(device)
    trainer = FakeTrainer(cfg.train.log_every_n_steps)
    module._trainer = trainer  # type: ignore[assignment]
    opt = module.configure_optimizers()
    trainer.optimizers = [opt]
    module.train()

    def step(batch: MultiViewBatch) -> float:
        i = trainer.global_step
        with _rf("stratavit.schedules"):
            module.apply_schedules(i)
        with _rf("stratavit.forward+loss"):
            total, _logs = module.compute_losses(batch)
        with _rf("stratavit.finite_check"):
            if not torch.isfinite(total):
                raise FloatingPointError("stratavit: non-finite loss")
        with _rf("stratavit.backward"):
            opt.zero_grad(set_to_none=True)
            total.backward()
            module.on_after_backward()
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], args.clip_grad)
        with _rf("stratavit.optimizer"):
            opt.step()
        trainer.advance()
        with _rf("stratavit.ema"):
            module.update_teacher(i)
        return float(total.detach())

    @torch.no_grad()
    def eval_loss(batch: MultiViewBatch) -> dict[str, Any]:
        module.eval()
        total, _ = module.compute_losses(batch)
        out: dict[str, Any] = {"loss": float(total)}
        if method == "mocov3":
            obj = module.objectives["infonce"]
            s, t = module.compute_features(batch)
            lv = obj.levels[0]
            out["q"] = obj.query(s.global_[lv], lv)
            out["k"] = obj.key(t.global_[lv], lv, module.teacher.heads["infonce"])
        module.train()
        return out

    if method == "mocov3":
        obj = module.objectives["infonce"]
        heads = {"projector": obj.projectors[str(obj.levels[0])], "predictor": obj.predictors[str(obj.levels[0])],
                 "teacher projector": module.teacher.heads["infonce"]["proj"][str(obj.levels[0])]}
    else:
        heads = {"head": module.objectives["dino"].head, "teacher head": module.teacher.heads["dino"]}
    time_module(module.backbone, " student backbone forward")
    time_module(module.teacher.backbone, " teacher backbone forward")
    side = Side("stratavit", step, module.backbone.vit, module.teacher.backbone.vit, heads, opt, eval_loss, module.train)
    return side, module


class LightlyMoCoV3(nn.Module):
    """MoCo v3 written the LightlySSL way (its heads, loss and momentum utilities)."""

    def __init__(self, backbone: nn.Module, dim: int, hidden: int, out: int, pred_last_bn: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = MoCoProjectionHead(dim, hidden, out, num_layers=3, batch_norm=True)
        # MoCo v3's predictor: Linear-BN-ReLU-Linear, no BN on the output (stratavit's too). Older
        # stratavit trees ended it in BN: then LightlySSL's 2-layer MoCoProjectionHead matches.
        self.prediction_head = (
            MoCoProjectionHead(out, hidden, out, num_layers=2, batch_norm=True) if pred_last_bn
            else ProjectionHead([(out, hidden, nn.BatchNorm1d(hidden), nn.ReLU(), False), (hidden, out, None, None, False)])
        )
        self.backbone_momentum = copy.deepcopy(backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: Tensor) -> Tensor:
        return self.prediction_head(self.projection_head(self.backbone(x).flatten(start_dim=1)))

    @torch.no_grad()
    def forward_momentum(self, x: Tensor) -> Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x).flatten(start_dim=1)).detach()


class LightlyDINO(nn.Module):
    """DINO written the LightlySSL way (as in its examples / ViT benchmark)."""

    def __init__(self, backbone: nn.Module, dim: int, hidden: int, bottleneck: int, out: int) -> None:
        super().__init__()
        self.student_backbone = backbone
        self.student_head = DINOProjectionHead(dim, hidden, bottleneck, out, freeze_last_layer=1, norm_last_layer=True)
        self.teacher_backbone = copy.deepcopy(backbone)
        # a separate head, as in LightlySSL's examples (a weight-normed layer cannot be deep-copied)
        self.teacher_head = DINOProjectionHead(dim, hidden, bottleneck, out, norm_last_layer=True)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)

    def forward(self, x: Tensor) -> Tensor:
        return self.student_head(self.student_backbone(x).flatten(start_dim=1))

    @torch.no_grad()
    def forward_teacher(self, x: Tensor) -> Tensor:
        return self.teacher_head(self.teacher_backbone(x).flatten(start_dim=1))


def _copy_params(src: nn.Module, dst: nn.Module) -> None:
    """Copy parameters then buffers in order, pairing tensors of equal shape (extra affine BN
    parameters of LightlySSL's last MoCo BN, which stratavit's has not, keep their init)."""
    for kind in ("parameters", "buffers"):
        s_list = [t for t in getattr(src, kind)() if t.dtype.is_floating_point]
        d_list = [t for t in getattr(dst, kind)() if t.dtype.is_floating_point]
        i = 0
        with torch.no_grad():
            for d in d_list:
                if i < len(s_list) and s_list[i].shape == d.shape:
                    d.copy_(s_list[i])
                    i += 1
        if i != len(s_list):
            raise RuntimeError(f"could not pair all {kind} of {type(src).__name__} with {type(dst).__name__}")


def build_lightly(method: str, module: PretrainModule, args: argparse.Namespace, device: torch.device) -> Side:
    cfg = module.cfg
    s_vit = copy.deepcopy(module.backbone.vit)  # same timm model, same initial weights and frozen params
    if args.lightly_backbone == "masked":
        wrapped = MaskedVisionTransformerTIMM(vit=s_vit, weight_initialization="skip", pos_embed_initialization="skip")
        wrapped.mask_token.requires_grad_(False)  # unused without masking: keep it out of the optimiser
    else:
        wrapped = s_vit
    dim = module.backbone.embed_dim
    if method == "mocov3":
        ocfg = cfg.objectives["infonce"]
        obj = module.objectives["infonce"]
        lv = str(obj.levels[0])
        pred_last_bn = isinstance(obj.predictors[lv][-1], nn.BatchNorm1d)
        model: nn.Module = LightlyMoCoV3(wrapped, dim, ocfg.proj_hidden_dim, ocfg.proj_dim, pred_last_bn).to(device)
        _copy_params(obj.projectors[lv], model.projection_head)
        _copy_params(obj.predictors[lv], model.prediction_head)
        model.projection_head_momentum.load_state_dict(model.projection_head.state_dict())
        student_modules = [model.backbone, model.projection_head, model.prediction_head]
        criterion: nn.Module = NTXentLoss(temperature=ocfg.temperature, memory_bank_size=0).to(device)
    else:
        ocfg = cfg.objectives["dino"]
        model = LightlyDINO(wrapped, dim, ocfg.hidden_dim, ocfg.bottleneck_dim, ocfg.out_dim).to(device)
        _copy_params(module.objectives["dino"].head, model.student_head)
        model.teacher_head.load_state_dict(model.student_head.state_dict())
        student_modules = [model.student_backbone, model.student_head]
        criterion = DINOLoss(
            output_dim=ocfg.out_dim, warmup_teacher_temp=ocfg.warmup_teacher_temp, teacher_temp=ocfg.teacher_temp,
            warmup_teacher_temp_epochs=max(ocfg.warmup_teacher_temp_epochs, 1), student_temp=ocfg.student_temp,
            center_momentum=ocfg.center_momentum,
        ).to(device)
    teacher_vit = model.backbone_momentum if method == "mocov3" else model.teacher_backbone
    teacher_vit.eval()  # a teacher ViT never drops paths (same as stratavit's Teacher)
    o = cfg.optim
    params, params_no_wd = get_weight_decay_parameters(student_modules)
    params = [p for p in params if p.requires_grad]
    params_no_wd = [p for p in params_no_wd if p.requires_grad]
    lr = o.base_lr * cfg.data.batch_size / 256
    opt = torch.optim.AdamW(
        [{"name": "decay", "params": params, "weight_decay": o.weight_decay},
         {"name": "no_decay", "params": params_no_wd, "weight_decay": 0.0}],
        lr=lr, betas=tuple(o.betas),
    )
    wd_end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
    warmup = int(round(o.warmup_epochs * FakeTrainer.num_training_batches))
    n_global = cfg.views.global_crops
    state = {"step": 0}

    def schedules(i: int) -> float:
        """lr (warm-up + cosine), weight decay and EMA momentum for step i (LightlySSL's helpers)."""
        step_lr = lr * (i + 1) / warmup if i < warmup else cosine_schedule(i - warmup, TOTAL_STEPS - warmup, lr, o.min_lr)
        wd = cosine_schedule(i, TOTAL_STEPS, o.weight_decay, wd_end)
        for g in opt.param_groups:
            g["lr"] = step_lr
            if g["name"] == "decay":
                g["weight_decay"] = wd
        return cosine_schedule(i, TOTAL_STEPS, cfg.teacher.momentum, cfg.teacher.momentum_end)

    def forward_loss(batch: MultiViewBatch) -> Tensor:
        g = torch.cat([v.images for v in batch.global_views])
        if method == "mocov3":
            q = model(g)  # one student forward over both global views, like stratavit
            k = model.forward_momentum(g)
            qs, ks = q.chunk(n_global), k.chunk(n_global)
            pairs = [(i, j) for i in range(n_global) for j in range(n_global) if i != j]
            return sum(criterion(qs[i], ks[j]) for i, j in pairs) / len(pairs)  # type: ignore[return-value]
        local = torch.cat([v.images for v in batch.local_views]) if batch.local_views else None
        t_out = model.forward_teacher(g).chunk(n_global)
        s_out = list(model(g).chunk(n_global))
        if local is not None:
            s_out += list(model(local).chunk(len(batch.local_views)))
        return criterion(t_out, s_out, teacher_temp=ocfg.teacher_temp)

    def step(batch: MultiViewBatch) -> float:
        i = state["step"]
        with _rf("lightly.schedules"):
            m = schedules(i)
        with _rf("lightly.ema"):
            if method == "mocov3":
                update_momentum(model.backbone, model.backbone_momentum, m)
                update_momentum(model.projection_head, model.projection_head_momentum, m)
            else:
                update_momentum(model.student_backbone, model.teacher_backbone, m)
                update_momentum(model.student_head, model.teacher_head, m)
        with _rf("lightly.forward+loss"):
            loss = forward_loss(batch)
        with _rf("lightly.backward"):
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if method == "dino":
                model.student_head.cancel_last_layer_gradients(FakeTrainer.current_epoch)
            if args.clip_grad:
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], args.clip_grad)
        with _rf("lightly.optimizer"):
            opt.step()
        state["step"] += 1
        return float(loss.detach())

    def set_train() -> None:
        model.train()
        teacher_vit.eval()

    @torch.no_grad()
    def eval_loss(batch: MultiViewBatch) -> dict[str, Any]:
        model.eval()
        if method == "dino":
            center = criterion.center.clone()
            out = {"loss": float(forward_loss(batch))}
            criterion.center.copy_(center)  # DINOLoss updates its centre on every call
        else:
            g = torch.cat([v.images for v in batch.global_views])
            q, k = model(g), model.forward_momentum(g)
            out = {"loss": float(forward_loss(batch)), "q": q, "k": k}
        set_train()
        return out

    if method == "mocov3":
        heads = {"projector": model.projection_head, "predictor": model.prediction_head,
                 "teacher projector": model.projection_head_momentum}
        t_vit = model.backbone_momentum
    else:
        heads = {"head": model.student_head, "teacher head": model.teacher_head}
        t_vit = model.teacher_backbone
    set_train()
    time_module(wrapped, " student backbone forward")
    time_module(t_vit, " teacher backbone forward")
    s_vit_mod = wrapped.vit if isinstance(wrapped, MaskedVisionTransformerTIMM) else wrapped
    t_vit_mod = t_vit.vit if isinstance(t_vit, MaskedVisionTransformerTIMM) else t_vit
    return Side("lightly", step, s_vit_mod, t_vit_mod, heads, opt, eval_loss, set_train)


# ---------------------------------------------------------------------------------------- checks


def mocov3_ctr(q: Tensor, k: Tensor, tau: float) -> Tensor:
    """MoCo v3's ctr(q, k) = 2τ · CE(q̂ k̂ᵀ/τ, own index), written out here for the check."""
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t() / tau
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device)) * 2 * tau


def n_params(m: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)


def count_work(side: Side, batch: MultiViewBatch) -> dict[str, Any]:
    """Backbone passes and images per network during one real training step of ``side``."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, inputs: tuple[Tensor, ...], _o: Any) -> None:
            counts[name][0] += 1
            counts[name][1] += int(inputs[0].shape[0])
        return fn

    handles = [side.student_vit.patch_embed.register_forward_hook(hook("student backbone")),
               side.teacher_vit.patch_embed.register_forward_hook(hook("teacher backbone"))]
    handles += [h.register_forward_hook(hook(n)) for n, h in side.heads.items()]
    side.step(batch)
    for h in handles:
        h.remove()
    opt_params = sum(p.numel() for g in side.optimizer.param_groups for p in g["params"] if p.requires_grad)
    return {"passes": dict(counts), "opt_params": opt_params,
            "head_params": {n: n_params(h) for n, h in side.heads.items()},
            "student_backbone_trainable": n_params(side.student_vit, trainable=True)}


def print_equivalence(method: str, a: Side, b: Side, batch: MultiViewBatch, module: PretrainModule) -> float:
    """Print the loss check and the work table (runs one real training step of each side);
    returns stratavit's loss before that step."""
    la, lb = a.eval_loss(batch), b.eval_loss(batch)
    print(f"\n## {method}: equivalence check (same weights, same batch, eval mode)")
    if method == "dino":
        print(f"loss  stratavit {la['loss']:.6f}  lightly DINOLoss {lb['loss']:.6f}  |Δ| {abs(la['loss'] - lb['loss']):.2e}")
    else:
        tau = module.cfg.objectives["infonce"].temperature
        qs, ks = lb["q"].chunk(2), lb["k"].chunk(2)
        ref = float(mocov3_ctr(qs[0], ks[1], tau) + mocov3_ctr(qs[1], ks[0], tau))
        print(f"q max|Δ| {float((la['q'] - lb['q']).abs().max()):.2e}  k max|Δ| {float((la['k'] - lb['k']).abs().max()):.2e}")
        print(f"loss  stratavit {la['loss']:.6f}  MoCo v3 ctr on lightly's q/k {ref:.6f}  |Δ| {abs(la['loss'] - ref):.2e}"
              f"  (lightly NTXent, SimCLR-style: {lb['loss']:.6f})")
    wa, wb = count_work(a, batch), count_work(b, batch)
    print("\n| per step | stratavit | lightly |\n|---|---|---|")
    for key in sorted(set(wa["passes"]) | set(wb["passes"]), key=lambda k: ("backbone" not in k, k)):
        pa, pb = wa["passes"].get(key, [0, 0]), wb["passes"].get(key, [0, 0])
        print(f"| {key}: forward calls / images | {pa[0]} / {pa[1]} | {pb[0]} / {pb[1]} |")
    for key in wa["head_params"]:
        print(f"| {key} parameters | {wa['head_params'][key]:,} | {wb['head_params'].get(key, 0):,} |")
    print(f"| student backbone trainable parameters | {wa['student_backbone_trainable']:,} | {wb['student_backbone_trainable']:,} |")
    print(f"| parameters in the optimiser | {wa['opt_params']:,} | {wb['opt_params']:,} |")
    crops = len(batch.global_views) + len(batch.local_views)
    print(f"| crops per image | {crops} ({len(batch.global_views)} global {batch.global_views[0].size[0]} px"
          + (f" + {len(batch.local_views)} local {batch.local_views[0].size[0]} px" if batch.local_views else "")
          + ") | same tensors |")
    return float(la["loss"])


# ---------------------------------------------------------------------------------------- timing


def make_batches(module: PretrainModule, args: argparse.Namespace, device: torch.device) -> list[MultiViewBatch]:
    cfg = module.cfg
    transform = MultiCropTransform(cfg.views, module.backbone.patch_size)
    data = build_dataset(args.data, transform=transform)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data), generator=g)[: args.batches * args.batch_size].tolist()  # type: ignore[arg-type]
    samples = [(data[i][0], data[i][1], i) for i in idx]
    return [collate_views(samples[k * args.batch_size:(k + 1) * args.batch_size]).to(device) for k in range(args.batches)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(side: Side, batch: MultiViewBatch, device: torch.device) -> float:
    sync(device)
    PhaseClock.current = defaultdict(float)
    t0 = time.perf_counter()
    loss = side.step(batch)
    sync(device)
    dt = time.perf_counter() - t0
    side.phases.append(dict(PhaseClock.current))
    if not math.isfinite(loss):
        raise FloatingPointError(f"{side.name}: non-finite loss")
    return dt


def batched_dino_loss(
    student_out: list[Tensor], teacher_out: list[Tensor], center: Tensor, student_temp: float, teacher_temp: float
) -> Tensor:
    """Prototype fix: stratavit's ``dino_loss`` (same value) as a few batched ops instead of a Python
    loop over every (teacher view, student view) pair: log-softmax over all V student views at once
    (V, B, K), softmax over the T teacher views (T, B, K), one contraction to the (T, V) matrix of
    mean cross-entropies, the diagonal pairs (same view) dropped."""
    log_ps = F.log_softmax(torch.cat(student_out).unflatten(0, (len(student_out), -1)) / student_temp, dim=-1)
    pts = F.softmax((torch.cat(teacher_out).unflatten(0, (len(teacher_out), -1)) - center) / teacher_temp, dim=-1).detach()
    ce = -torch.einsum("tbk,vbk->tv", pts, log_ps) / log_ps.shape[1]
    keep = ~torch.eye(ce.shape[0], ce.shape[1], dtype=torch.bool, device=ce.device)
    return ce[keep].mean()


_BATCHED = {"on": False}


def install_dino_loss_fix() -> None:
    """Route stratavit's DINO objective through :func:`batched_dino_loss` while ``_BATCHED['on']``."""
    import stratavit.objectives.dino as dino_mod

    original = dino_mod.dino_loss

    def dispatch(*a: Any, **k: Any) -> Tensor:
        return (batched_dino_loss if _BATCHED["on"] else original)(*a, **k)

    dino_mod.dino_loss = dispatch  # type: ignore[assignment]


def with_fix(side: Side) -> Side:
    """The same stratavit side, running with the batched DINO loss."""

    def flagged(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*a: Any) -> Any:
            _BATCHED["on"] = True
            try:
                return fn(*a)
            finally:
                _BATCHED["on"] = False
        return run

    side.name = "stratavit+fix"
    side.step, side.eval_loss = flagged(side.step), flagged(side.eval_loss)
    return side


def run_method(method: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    a, module = build_stratavit(method, args, device)
    b = build_lightly(method, module, args, device)
    batches = make_batches(module, args, device)
    loss0 = print_equivalence(method, a, b, batches[0], module)
    variants = [a]
    if args.fix_dino_loss and method == "dino":
        torch.manual_seed(0)
        fixed = with_fix(build_stratavit(method, args, device)[0])  # same initial weights as `a`
        print(f"prototype fix (batched DINO loss), same check: loss {fixed.eval_loss(batches[0])['loss']:.6f} "
              f"vs stratavit's loop {loss0:.6f}")
        fixed.step(batches[0])  # the step count_work gave the others
        variants.append(fixed)
    sides = [*variants, b]
    n = len(sides)
    for w in range(args.warmup):
        for s in sides[w % n:] + sides[: w % n]:
            timed(s, batches[w % len(batches)], device)
    rows = []
    for rep in range(args.repeats):
        for s in sides:
            s.times, s.phases = [], []
        for i in range(args.steps):
            batch = batches[i % len(batches)]
            for s in sides[i % n:] + sides[: i % n]:  # rotate who goes first: order effects cancel
                s.times.append(timed(s, batch, device))
        for v in variants:
            ma, mb = statistics.median(v.times), statistics.median(b.times)
            row = {"method": method + (" (+ batched DINO loss)" if v is not a else ""), "rep": rep + 1,
                   "stratavit_s": ma, "lightly_s": mb,
                   "stratavit_ips": args.batch_size / ma, "lightly_ips": args.batch_size / mb, "ratio": mb / ma,
                   "stratavit_iqr": _iqr(v.times), "lightly_iqr": _iqr(b.times),
                   "stratavit_mean": statistics.fmean(v.times), "lightly_mean": statistics.fmean(b.times),
                   "paired": paired_ratio(v.times, b.times),
                   "stratavit_ms": [round(t * 1e3) for t in v.times], "lightly_ms": [round(t * 1e3) for t in b.times]}
            if PhaseClock.active:
                row["phases"] = phase_table(v, b)
            rows.append(row)
    if args.profile:
        profile(method, tuple(sides), batches, args.profile, device, args.profile_rows)
    return rows


def paired_ratio(a: list[float], b: list[float], n_boot: int = 2000) -> tuple[float, float, float]:
    """Median over steps of ``b_i / a_i`` (the two sides' times of the same interleaved step, so a
    slow moment of the shared machine hits both) with a 95 % bootstrap interval of that median."""
    r = [tb / ta for ta, tb in zip(a, b)]
    rng = random.Random(0)
    boots = sorted(statistics.median(rng.choices(r, k=len(r))) for _ in range(n_boot))
    return statistics.median(r), boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1]


PHASE_ORDER = ["forward+loss", " student backbone forward", " teacher backbone forward", "finite_check",
               "backward", "optimizer", "ema", "schedules"]


def phase_table(a: Side, b: Side) -> str:
    """Markdown rows: median ms per step of each phase on both sides, and the paired ratio."""
    lines = ["| phase (median ms/step) | stratavit | LightlySSL | paired ratio lightly/stratavit |", "|---|---|---|---|"]
    names = [n for n in PHASE_ORDER if any(n in p for p in a.phases + b.phases)]
    for n in names + ["(rest of the step)"]:
        if n == "(rest of the step)":
            va = [t - sum(v for k, v in p.items() if not k.startswith(" ")) for t, p in zip(a.times, a.phases)]
            vb = [t - sum(v for k, v in p.items() if not k.startswith(" ")) for t, p in zip(b.times, b.phases)]
        else:
            va = [p.get(n, 0.0) for p in a.phases]
            vb = [p.get(n, 0.0) for p in b.phases]
        pr = statistics.median([y / x for x, y in zip(va, vb)]) if all(x > 0 for x in va) and all(y > 0 for y in vb) else float("nan")
        lines.append(f"| {n.replace(' ', '&nbsp;&nbsp;', 1) if n.startswith(' ') else n} | {1e3 * statistics.median(va):.1f} "
                     f"| {1e3 * statistics.median(vb):.1f} | {pr:.3f} |")
    return "\n".join(lines)


def _iqr(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def profile(
    method: str, sides: tuple[Side, ...], batches: list[MultiViewBatch], n: int, device: torch.device, row_limit: int
) -> None:
    """torch.profiler over ``n`` steps of each side: time inside each phase range, then the top ops."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for s in sides:
        with tprofile(activities=acts, record_shapes=False) as prof:
            for i in range(n):
                s.step(batches[i % len(batches)])
            sync(device)
        ev = prof.key_averages()
        phases = [e for e in ev if e.key.startswith(s.name.split("+")[0] + ".")]
        total = sum(e.cpu_time_total for e in phases) or 1.0
        print(f"\n### profile {method} / {s.name}: {n} steps, phases (CPU wall inside each, ms per step)")
        for e in sorted(phases, key=lambda e: -e.cpu_time_total):
            print(f"  {e.key:32s} {e.cpu_time_total / n / 1e3:8.2f} ms  {100 * e.cpu_time_total / total:5.1f} %")
        print(ev.table(sort_by=key, row_limit=row_limit))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=["mocov3", "dino", "both"], default="both")
    ap.add_argument("--preset", choices=["small", "vits16"], default="small",
                    help="small: the CPU ViT below; vits16: the recipes' ViT-S/16 at 224 px (GPU)")
    ap.add_argument("--img", type=int, default=32, help="small preset: image / global crop size")
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--local-crops", type=int, default=None, help="DINO local crops (default 4 small, 8 vits16)")
    ap.add_argument("--local-size", type=int, default=16, help="small preset: local crop size")
    ap.add_argument("--proj-hidden", type=int, default=None, help="MoCo v3 projector/predictor hidden (1024 small, 4096 vits16)")
    ap.add_argument("--proj-dim", type=int, default=256)
    ap.add_argument("--out-dim", type=int, default=None, help="DINO K (4096 small, 65536 vits16)")
    ap.add_argument("--dino-hidden", type=int, default=None, help="DINO head hidden (512 small, 2048 vits16)")
    ap.add_argument("--dino-bottleneck", type=int, default=None, help="DINO bottleneck (128 small, 256 vits16)")
    ap.add_argument("--lightly-backbone", choices=["masked", "plain"], default="masked",
                    help="masked: LightlySSL's MaskedVisionTransformerTIMM wrapper; plain: the timm model's forward")
    ap.add_argument("--clip-grad", type=float, default=0.0, help="global-norm gradient clipping on both sides (0 = off)")
    ap.add_argument("--data", default=SAMPLE_NAME, help="ImageFolder of real images (default: shipped CIFAR-10 sample)")
    ap.add_argument("--batches", type=int, default=4, help="distinct multi-view batches, cycled")
    ap.add_argument("--steps", type=int, default=30, help="measured steps per side and repetition")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1, help="measurement repetitions in this process")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="profile N steps of each side")
    ap.add_argument("--profile-rows", type=int, default=18)
    ap.add_argument("--phases", action="store_true",
                    help="on CUDA, time each phase of a step (synchronises at every boundary); always on for CPU")
    ap.add_argument("--fix-dino-loss", action="store_true",
                    help="also time stratavit with a batched DINO loss (monkeypatched prototype of a fix)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    small = args.preset == "small"
    defaults = {"local_crops": 4 if small else 8, "proj_hidden": 1024 if small else 4096,
                "out_dim": 4096 if small else 65536, "dino_hidden": 512 if small else 2048,
                "dino_bottleneck": 128 if small else 256}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    PhaseClock.cuda = device.type == "cuda" and args.phases
    PhaseClock.active = device.type != "cuda" or args.phases
    import timm

    print(f"# stratavit vs LightlySSL training step — {datetime.date.today().isoformat()}")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    print(f"torch {torch.__version__}, timm {timm.__version__}, lightly {lightly.__version__}; "
          f"preset {args.preset}, batch {args.batch_size}, lightly backbone: {args.lightly_backbone}, "
          f"clip-grad {args.clip_grad or 'off'}; {args.warmup} warm-up + {args.steps} steps × {args.repeats}")
    methods = ["mocov3", "dino"] if args.method == "both" else [args.method]
    if args.fix_dino_loss:
        install_dino_loss_fix()
    rows = [r for m in methods for r in run_method(m, args, device)]
    for r in rows:
        if "phases" in r:
            print(f"\n### {r['method']} rep {r['rep']}: where the step's time goes\n{r['phases']}")
        print(f"\n{r['method']} rep {r['rep']} step times (ms, in order): stratavit {r['stratavit_ms']}")
        print(f"{r['method']} rep {r['rep']} step times (ms, in order): lightly   {r['lightly_ms']}")
    print("\n| method | rep | stratavit s/step median (IQR) | LightlySSL s/step median (IQR) | stratavit img/s | "
          "LightlySSL img/s | ratio stratavit/LightlySSL | ratio of means | paired step ratio (95 % CI) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['rep']} | {r['stratavit_s']:.4f} ({r['stratavit_iqr'][0]:.4f}–{r['stratavit_iqr'][1]:.4f}) "
              f"| {r['lightly_s']:.4f} ({r['lightly_iqr'][0]:.4f}–{r['lightly_iqr'][1]:.4f}) "
              f"| {r['stratavit_ips']:.1f} | {r['lightly_ips']:.1f} | **{r['ratio']:.3f}** "
              f"| {r['lightly_mean'] / r['stratavit_mean']:.3f} "
              f"| {r['paired'][0]:.3f} ({r['paired'][1]:.3f}–{r['paired'][2]:.3f}) |")


if __name__ == "__main__":
    main()
