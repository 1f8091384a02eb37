"""PretrainModule: the Lightning module that runs one training step of any recipe.

:meth:`PretrainModule.training_step` is the step, top to bottom; what Lightning runs around it
(backward, gradient hooks, clipping, the optimiser step) and the EMA update after it are listed in
its docstring. lr, weight decay and EMA momentum follow per-step arrays
(:mod:`stratavit.engine.schedules`). Monitors and the per-epoch dataset pass are callbacks
(:mod:`stratavit.engine.callbacks`).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn

from stratavit.backbones.build import build_backbone
from stratavit.config import Config, ConfigError, to_dict
from stratavit.data.photometric import DevicePhotometric, photometric_seed
from stratavit.data.views import MultiViewBatch
from stratavit.engine.callbacks.collapse import TEACHER_EMBEDDING, teacher_embedding
from stratavit.engine.nonfinite import NonFiniteGuard
from stratavit.engine.optim import build_optimizer, clip_per_tensor, param_groups
from stratavit.engine.schedules import cosine_schedule, momentum_schedule
from stratavit.engine.teacher import Teacher
from stratavit.objectives import OBJECTIVES, Objective, StepState, ViewFeatures
from stratavit.objectives.base import (
    AddsStudentViews,
    AdjustsGradients,
    AugmentsStudent,
    MasksStudent,
    NeedsDatasetPass,
)
from stratavit.recipe import config_from_dict

__all__ = ["SKIPPED", "PretrainModule"]

SKIPPED = "skipped"
"""Key of a skipped step's outputs under several processes (see :meth:`PretrainModule.skip_step`)."""


class PretrainModule(L.LightningModule):
    """Backbone + objectives + teacher for one recipe.

    Args:
        config: the resolved config; a plain dict (as in a checkpoint's hyper-parameters, which is
            what Lightning's ``load_from_checkpoint`` passes) is read with ``config_from_dict``.
            Checkpoints save it as ``{"config": to_dict(config)}``.
    """

    def __init__(self, config: Config | dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config if isinstance(config, dict) else to_dict(config)})
        self.cfg: Config = config if isinstance(config, Config) else config_from_dict(config)
        self.backbone = build_backbone(self.cfg.backbone)
        self.objectives = nn.ModuleDict(
            {name: OBJECTIVES[name](ocfg, self.backbone) for name, ocfg in self.cfg.objectives.items()}
        )
        self._student_heads = self._teacher_heads()  # plain dict: the modules are already registered
        self.teacher = Teacher(self.backbone, self._student_heads)
        objs = self._objs()
        self.student_levels = sorted({lv for o in objs for lv in o.student_levels()})
        self.teacher_levels = sorted({lv for o in objs for lv in o.teacher_levels()})
        self.uses_local = any(o.reads_local_views for o in objs) and self.cfg.views.local_crops > 0
        # capabilities (objectives/base.py): found once, called at fixed points of the step
        maskers = [n for n, o in self.objectives.items() if isinstance(o, MasksStudent)]
        if len(maskers) > 1:
            raise ConfigError(f"objectives {maskers} all mask the student's views; a recipe can have only one")
        self._masker: str | None = maskers[0] if maskers else None
        self._augmenters: list[AugmentsStudent] = [o for o in objs if isinstance(o, AugmentsStudent)]
        self._extra_viewers: list[AddsStudentViews] = [o for o in objs if isinstance(o, AddsStudentViews)]
        self._gradient_hooks: list[AdjustsGradients] = [o for o in objs if isinstance(o, AdjustsGradients)]
        for obj in objs:
            obj.check_setup(self.cfg.views, self.cfg.data.batch_size)
        self.nonfinite = NonFiniteGuard(self.cfg.train.max_nonfinite_steps)
        self.device_photometric = DevicePhotometric(self.cfg.views) if self.cfg.views.photometric == "device" else None
        self._schedules: dict[str, np.ndarray] = {}
        self.steps_per_epoch = 1

    @property
    def nonfinite_steps(self) -> int:
        """Steps skipped for a non-finite loss (over resumes: it travels in the checkpoint)."""
        return self.nonfinite.skipped

    def compile_backbones(self, backend: str = "inductor") -> None:
        """``torch.compile`` the student and teacher backbones in place (``train.compile``).

        ``nn.Module.compile`` keeps the modules and their state-dict keys, so checkpoints and exports
        are the same as without it; the heads and losses stay eager (small, shape-varying).
        """
        self.backbone.compile(backend=backend)
        self.teacher.backbone.compile(backend=backend)

    def _objs(self) -> list[Objective]:
        return list(self.objectives.values())  # type: ignore[arg-type]

    def _teacher_heads(self) -> dict[str, nn.Module]:
        heads = {}
        for name, obj in self.objectives.items():
            head = obj.teacher_head()  # type: ignore[operator]
            if head is not None:
                heads[name] = head
        return heads

    # ---------------------------------------------------------------------------------- setup

    def effective_lr(self) -> float:
        world = self.trainer.world_size if self._trainer is not None else 1
        return self.cfg.optim.base_lr * self.cfg.data.batch_size * world / 256

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The optimiser, and the per-step schedules of lr, weight decay and EMA momentum."""
        o = self.cfg.optim
        total = int(self.trainer.estimated_stepping_batches)
        batches = self.trainer.num_training_batches
        accumulate = self.trainer.accumulate_grad_batches
        self.steps_per_epoch = max(1, int(batches) // accumulate) if math.isfinite(batches) else max(1, total)
        self.set_total_steps(total)
        return build_optimizer(o, param_groups([self.backbone, self.objectives]), self.effective_lr())

    def set_total_steps(self, total: int) -> None:
        """Lay the per-step schedules (lr with its warm-up, weight decay, EMA momentum) over ``total``
        optimiser steps (``train.budget`` re-plans call it again with a new total)."""
        o = self.cfg.optim
        warmup = int(round(o.warmup_epochs * self.steps_per_epoch))
        self._schedules = {
            "lr": cosine_schedule(self.effective_lr(), o.min_lr, total, warmup, warmup_includes_end=o.warmup_includes_end),
            "wd": cosine_schedule(o.weight_decay, o.weight_decay if o.weight_decay_end is None else o.weight_decay_end, total),
            "momentum": momentum_schedule(self.cfg.teacher.momentum, self.cfg.teacher.momentum_end, total),
        }

    def _schedule(self, name: str, step: int) -> float:
        arr = self._schedules[name]
        return float(arr[min(step, len(arr) - 1)])

    def state(self) -> StepState:
        return StepState(
            step=int(self.global_step),
            epoch=int(self.current_epoch),
            steps_per_epoch=self.steps_per_epoch,
            total_steps=len(self._schedules.get("lr", [0])),
        )

    def on_fit_start(self) -> None:
        needs = [n for n, o in self.objectives.items() if isinstance(o, NeedsDatasetPass)]
        if needs and not any(getattr(cb, "provides_dataset_pass", False) for cb in self.trainer.callbacks):
            raise RuntimeError(
                f"objectives {needs} need a pass over the training set each epoch; train through "
                "stratavit.engine.train.pretrain, which provides it, or add a "
                "stratavit.engine.callbacks.dataset_pass.DatasetPass callback"
            )

    # ---------------------------------------------------------------------------------- step

    def training_step(self, batch: MultiViewBatch, batch_idx: int) -> dict[str, Tensor] | None:
        """One training step. Lightning calls it inside the optimiser's closure, gradients zeroed.

        Here, in order: the step's lr and weight decay are set (:meth:`apply_schedules`); with
        ``views.photometric = "device"`` the views get their colour, blur and solarize here
        (:meth:`finish_views`); the views go through the student and the teacher
        (:meth:`compute_features`); every objective's loss, weighted, makes the total (:meth:`objective_losses`); the processes agree whether every
        one's total is finite (:class:`~stratavit.engine.nonfinite.NonFiniteGuard`), and if one is
        not, all skip the step (:meth:`skip_step`: no parameter gets a gradient, the optimiser
        step changes nothing, no EMA); else the terms are logged and the total returned.

        Then Lightning, with the returned loss: backward (DDP averages the gradients) →
        :meth:`on_after_backward` (the objectives' gradient hooks) →
        :meth:`configure_gradient_clipping` (``optim.clip_grad`` / ``clip_mode``) → the optimiser
        step → :meth:`on_train_batch_end`: the teacher's EMA update (:meth:`update_teacher`). The
        callbacks' ``on_train_batch_end`` run just before it; the collapse monitor reads the
        returned :data:`~stratavit.engine.callbacks.collapse.TEACHER_EMBEDDING` there.
        """
        state = self.state()
        self.apply_schedules(state.step)  # lr and weight decay of this step
        batch = self.finish_views(batch, batch_idx)  # views.photometric=device: photometric ops + normalise here
        student, teacher = self.compute_features(batch)  # views -> student and teacher features
        total, logs = self.objective_losses(student, teacher, state)  # objectives -> weighted total
        if not self.nonfinite.step_ok(total, state.step):  # collective: every process decides alike
            return self.skip_step(total)  # all skip: no gradient, no optimiser update, no EMA
        self._log_step(total, logs, batch.batch_size, state.step)
        # Lightning now: backward -> on_after_backward -> configure_gradient_clipping -> optimiser step
        # -> callbacks' on_train_batch_end (collapse monitor) -> on_train_batch_end (EMA)
        return {"loss": total, TEACHER_EMBEDDING: teacher_embedding(teacher)}

    def finish_views(self, batch: MultiViewBatch, batch_idx: int) -> MultiViewBatch:
        """``views.photometric = "device"``: the loader's uint8 crops get colour jitter, grayscale,
        blur, solarize and normalisation here, batched on the device
        (:class:`~stratavit.data.photometric.DevicePhotometric`), drawn from ``(train.seed, epoch,
        batch_idx, rank)`` so a resumed run draws the same; in the backbone's dtype. Otherwise the
        batch unchanged (the loader did all that)."""
        if self.device_photometric is None:
            return batch
        seed = photometric_seed(self.cfg.train.seed, self.current_epoch, batch_idx, self.global_rank)
        return self.device_photometric(batch, seed, dtype=next(self.backbone.parameters()).dtype)

    def skip_step(self, total: Tensor) -> dict[str, Tensor | bool] | None:
        """What a skipped step returns.

        One process: None; Lightning then runs no backward, and the optimiser step finds no
        gradient (they were zeroed to None before the step), so it changes nothing. Several
        processes, where Lightning refuses None: a zero loss that reaches no parameter, marked
        :data:`SKIPPED`; its backward leaves every gradient None on every process alike (no
        gradient all-reduce either), so again the optimiser step changes nothing, and
        :meth:`on_train_batch_end` skips the EMA. (Under ``16-mixed`` precision the gradient
        scaler refuses a step without gradients: there, several processes cannot skip a step.)
        """
        if self.trainer.world_size == 1:
            return None
        return {"loss": torch.zeros((), device=total.device, requires_grad=True), SKIPPED: True}

    def _log_step(self, total: Tensor, logs: dict[str, Tensor | float], batch_size: int, step: int) -> None:
        """The step's loss, every objective term and metric, and the scheduled values."""
        self.log("loss", total.detach(), prog_bar=True, batch_size=batch_size)
        self.log_dict(logs, batch_size=batch_size)
        for name in ("lr", "wd", "momentum"):
            self.log(name, self._schedule(name, step), batch_size=batch_size)

    def apply_schedules(self, step: int) -> None:
        """Set the lr (every group) and weight decay (decayed groups) of optimiser step ``step``."""
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = self._schedule("lr", step)
                if group.get("apply_wd", True):
                    group["weight_decay"] = self._schedule("wd", step)

    def compute_features(self, batch: MultiViewBatch) -> tuple[ViewFeatures, ViewFeatures]:
        """Student features of every view group and teacher features of the global views.

        The student sees the global views (masked if an objective masks them, augmented by the
        objectives that augment the student), the local views if an objective reads them, and the
        extra batches objectives add; the teacher sees the plain global views, without gradient.
        """
        state = self.state()
        g = torch.cat([v.images for v in batch.global_views])
        n_g = len(batch.global_views)
        masks, token = self._student_masks(g, n_g, batch.batch_size, state)
        s_in = g
        for obj in self._augmenters:
            s_in = obj.augment_student(s_in, "global", state)
        s_global = self.backbone(s_in, self.student_levels, mask=masks, mask_token=token)
        s_local = None
        if self.uses_local and batch.local_views:
            local = torch.cat([v.images for v in batch.local_views])
            for obj in self._augmenters:
                local = obj.augment_student(local, "local", state)
            s_local = self.backbone(local, self.student_levels)
        extra, layouts = {}, {}
        for obj in self._extra_viewers:
            for name, views in obj.student_views(batch, state).items():
                extra[name] = self.backbone(views.images, obj.student_levels())  # type: ignore[attr-defined]
                layouts[name] = views.layout
        with torch.no_grad():
            t_global = self.teacher.backbone(g, self.teacher_levels)
        n_l = len(batch.local_views) if s_local is not None else 0
        return (
            ViewFeatures(s_global, s_local, n_g, n_l, batch, self.backbone, masks, extra, layouts),
            ViewFeatures(t_global, None, n_g, 0, batch, self.teacher.backbone),
        )

    def _student_masks(
        self, g: Tensor, n_views: int, batch_size: int, state: StepState
    ) -> tuple[Tensor | None, Tensor | None]:
        """The masking objective's masks and mask token for the global views (None, None: no mask)."""
        if self._masker is None:
            return None, None
        p = self.backbone.patch_size
        grid = (g.shape[-2] // p, g.shape[-1] // p)
        masker: MasksStudent = self.objectives[self._masker]  # type: ignore[assignment]
        masked = masker.student_masks(n_views, batch_size, grid, state, g.device)
        return masked if masked is not None else (None, None)

    def objective_losses(
        self, student: ViewFeatures, teacher: ViewFeatures, state: StepState
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Total weighted loss ``Σ weight · loss`` and every named term/metric of the objectives."""
        total: Tensor | float = 0.0
        logs: dict[str, Tensor | float] = {}
        for name, obj in self.objectives.items():
            head = self.teacher.heads[name] if name in self.teacher.heads else None
            out = obj(student, teacher, head, state)
            total = total + obj.cfg.weight * out.loss
            logs[f"loss/{name}"] = out.loss.detach()
            logs.update(out.metrics)
        assert isinstance(total, Tensor)
        return total, logs

    def compute_losses(self, batch: MultiViewBatch) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Features and losses of one batch, outside a Lightning step (tests, benchmarks)."""
        student, teacher = self.compute_features(self.finish_views(batch, 0))
        return self.objective_losses(student, teacher, self.state())

    def on_after_backward(self) -> None:
        state = self.state()
        for obj in self._gradient_hooks:
            obj.on_after_backward(state)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """``optim.clip_mode``: Lightning's global-norm clipping, or per-tensor clipping (DINO's
        ``clip_gradients``). Lightning calls this after unscaling (fp16) and before the step."""
        if gradient_clip_val is None or self.cfg.optim.clip_mode == "global":
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        clip_per_tensor([p for g in optimizer.param_groups for p in g["params"]], float(gradient_clip_val))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not outputs or outputs.get(SKIPPED):  # a skipped step (see skip_step): no EMA
            return
        self.update_teacher(int(self.global_step) - 1)  # the optimiser step that just finished

    def update_teacher(self, step: int) -> None:
        """EMA of the student into the teacher at the momentum of optimiser step ``step``."""
        self.teacher.update(self.backbone, self._student_heads, self._schedule("momentum", max(step, 0)))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_steps"] = self.nonfinite.skipped

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite.skipped = int(checkpoint.get("nonfinite_steps", 0))

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.cfg)
