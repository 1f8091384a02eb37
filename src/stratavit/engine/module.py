"""PretrainModule: the Lightning module that runs one training step of any recipe.

Step: student forward once per view group, teacher forward once over the global views (no
grad), every objective computes its loss from the shared features, the weighted sum is
optimised; after the optimiser step the teacher is updated by EMA. lr, weight decay and EMA
momentum follow per-step arrays (:mod:`stratavit.engine.schedules`).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from stratavit.backbone import build_backbone
from stratavit.engine.callbacks.collapse import CollapseMonitor, collapse_metrics
from stratavit.config import Config, ConfigError, config_from_dict, to_dict
from stratavit.distributed import gather_concat, rank, world_size
from stratavit.objectives import OBJECTIVES, Objective, StepState, ViewFeatures
from stratavit.engine.schedules import cosine_schedule, momentum_schedule
from stratavit.engine.teacher import Teacher
from stratavit.views import MultiViewBatch

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss."""


def build_optimizer(o: Any, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """The optimiser ``o.name`` names over stratavit's parameter groups (see :func:`_param_groups`).

    LARS adapts (trust ratio) only the weight-decayed group, like the references' ``lars_exclude``
    of biases and norms.
    """
    if o.name == "lars":
        from stratavit.engine.lars import LARS

        for g in groups:
            g["lars_adapt"] = g["apply_wd"]
        return LARS(groups, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum, eta=o.lars_eta)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), weight_decay=o.weight_decay)


def _param_groups(modules: list[nn.Module]) -> list[dict[str, Any]]:
    """Trainable parameters split into weight-decayed (matrices) and not (biases, norms, tokens)."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for m in modules:
        for name, p in m.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name:
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


@torch.no_grad()
def clip_per_tensor(params: list[Tensor], max_norm: float, eps: float = 1e-6) -> None:
    """Scale each gradient on its own to L2 norm ≤ ``max_norm`` (DINO's ``clip_gradients``):
    ``g ← g · max_norm / (‖g‖ + eps)`` where that factor is < 1; tensors without a gradient are skipped."""
    for p in params:
        if p.grad is not None:  # the factor stays a tensor: no host sync per parameter on a GPU
            p.grad.mul_((max_norm / (p.grad.norm(2) + eps)).clamp_(max=1.0))


class PretrainModule(L.LightningModule):
    """Backbone + objectives + teacher for one recipe.

    Args:
        config: the resolved config as a plain dict (saved in checkpoints as hyper-parameters).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters({"config": config})
        self.cfg: Config = config_from_dict(config)
        self.backbone = build_backbone(self.cfg.backbone)
        self.objectives = nn.ModuleDict(
            {name: OBJECTIVES[name](ocfg, self.backbone) for name, ocfg in self.cfg.objectives.items()}
        )
        self._student_heads = self._teacher_heads()  # plain dict: the modules are already registered
        self.teacher = Teacher(self.backbone, self._student_heads)
        self.student_levels = sorted({lv for o in self._objs() for lv in o.student_levels()})
        self.teacher_levels = sorted({lv for o in self._objs() for lv in o.teacher_levels()})
        self.uses_local = any(o.reads_local_views for o in self._objs()) and self.cfg.views.local_crops > 0
        maskers = [n for n, o in self.objectives.items() if type(o).student_masks is not Objective.student_masks]
        if len(maskers) > 1:
            raise ConfigError(f"objectives {maskers} all mask the student's views; a recipe can have only one")
        self._masker: str | None = maskers[0] if maskers else None
        self._augmenters = [o for o in self._objs() if type(o).augment_student is not Objective.augment_student]
        self._extra_viewers = [o for o in self._objs() if type(o).student_views is not Objective.student_views]
        for obj in self._objs():
            obj.check_setup(self.cfg.views, self.cfg.data.batch_size)
        self._nonfinite_streak = 0
        self.nonfinite_steps = 0
        self._stepped = False
        self._schedules: dict[str, np.ndarray] = {}
        self.steps_per_epoch = 1
        self._embed_data: tuple[Dataset, int, int] | None = None
        self.show_progress = self.cfg.train.progress_bar
        t = self.cfg.train
        self.collapse_monitor: CollapseMonitor | None = (
            CollapseMonitor(t.collapse_rank_fraction, t.collapse_std_threshold, t.collapse_patience)
            if t.collapse_monitor else None
        )

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
        o = self.cfg.optim
        total = int(self.trainer.estimated_stepping_batches)
        batches = self.trainer.num_training_batches
        accumulate = self.trainer.accumulate_grad_batches
        self.steps_per_epoch = max(1, int(batches) // accumulate) if math.isfinite(batches) else max(1, total)
        lr = self.effective_lr()
        warmup = int(round(o.warmup_epochs * self.steps_per_epoch))
        self._schedules = {
            "lr": cosine_schedule(lr, o.min_lr, total, warmup, warmup_includes_end=o.warmup_includes_end),
            "wd": cosine_schedule(o.weight_decay, o.weight_decay if o.weight_decay_end is None else o.weight_decay_end, total),
            "momentum": momentum_schedule(self.cfg.teacher.momentum, self.cfg.teacher.momentum_end, total),
        }
        groups = _param_groups([self.backbone, self.objectives])
        return build_optimizer(o, groups, lr)

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

    # ---------------------------------------------------------------------------------- E-step

    def needs_dataset(self) -> bool:
        """True if some objective has a per-epoch pass over the whole training set (e.g. k-means)."""
        return any(type(o).needs_dataset_pass is not Objective.needs_dataset_pass for o in self._objs())

    def set_embedding_dataset(self, dataset: Dataset, batch_size: int, num_workers: int) -> None:
        """The training images with the evaluation transform, yielding ``(image, label, index)``."""
        self._embed_data = (dataset, batch_size, num_workers)

    @torch.no_grad()
    def embed_dataset(self, objectives: dict[str, Objective]) -> dict[str, tuple[Tensor, Tensor]]:
        """Teacher embeddings of this process's share of the training set for each objective.

        Returns:
            name -> (local embeddings (n_local, D), their data-set indices (n_local,)).
        """
        if self._embed_data is None:
            raise RuntimeError(
                f"objectives {list(objectives)} need a pass over the training set each epoch; "
                "train through stratavit.pretrain (which provides it) or call set_embedding_dataset()"
            )
        dataset, batch_size, num_workers = self._embed_data
        n = len(dataset)  # type: ignore[arg-type]
        shard = list(range(rank(), n, world_size()))
        loader = DataLoader(Subset(dataset, shard), batch_size=batch_size, num_workers=num_workers, shuffle=False)
        levels = sorted({lv for o in objectives.values() for lv in o.teacher_levels()})
        was_training = self.teacher.training
        self.teacher.eval()
        out: dict[str, list[Tensor]] = {name: [] for name in objectives}
        idx: list[Tensor] = []
        iterator: Any = loader
        if self.show_progress and rank() == 0:
            from tqdm.auto import tqdm

            iterator = tqdm(loader, desc=f"E-step: embedding {n} images", leave=False)
        try:
            for images, _, index in iterator:
                images = images.to(self.device)
                with self.trainer.precision_plugin.forward_context():
                    feats = self.teacher.backbone(images, levels)
                    for name, obj in objectives.items():
                        head = self.teacher.heads[name] if name in self.teacher.heads else None
                        out[name].append(obj.embed(feats, head).float())
                idx.append(index.to(self.device))
        finally:
            self.teacher.train(was_training)
        index_all = torch.cat(idx)
        return {name: (torch.cat(chunks), index_all) for name, chunks in out.items()}

    def on_train_epoch_start(self) -> None:
        epoch, epochs = int(self.current_epoch), self.cfg.train.epochs
        due = {name: o for name, o in self.objectives.items() if o.needs_dataset_pass(epoch, epochs)}  # type: ignore[operator]
        if not due:
            return
        n_total = len(self._embed_data[0]) if self._embed_data else 0  # type: ignore[arg-type]
        started = time.time()
        embeddings = self.embed_dataset(due)  # type: ignore[arg-type]
        metrics: dict[str, float] = {}
        for name, obj in due.items():
            emb, index = embeddings[name]
            metrics.update(obj.on_dataset_embeddings(emb, index, n_total, epoch))
        metrics["estep/seconds"] = time.time() - started
        if metrics:
            for lg in self.loggers:
                lg.log_metrics({**metrics, "epoch": epoch}, step=int(self.global_step))

    # ---------------------------------------------------------------------------------- step

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        step = int(self.global_step)
        for opt in self.trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] = self._schedule("lr", step)
                if group.get("apply_wd", True):
                    group["weight_decay"] = self._schedule("wd", step)

    def compute_features(self, batch: MultiViewBatch) -> tuple[ViewFeatures, ViewFeatures]:
        """Student features of every view group and teacher features of the global views."""
        g = torch.cat([v.images for v in batch.global_views])
        state = self.state()
        n_g = len(batch.global_views)
        masks, token = None, None
        if self._masker is not None:
            p = self.backbone.patch_size
            grid = (g.shape[-2] // p, g.shape[-1] // p)
            masked = self.objectives[self._masker].student_masks(n_g, batch.batch_size, grid, state, g.device)  # type: ignore[operator]
            if masked is not None:
                masks, token = masked
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
        extra = {}
        for obj in self._extra_viewers:
            for name, images in obj.student_views(batch, state).items():
                extra[name] = self.backbone(images, obj.student_levels())
        with torch.no_grad():
            t_global = self.teacher.backbone(g, self.teacher_levels)
        n_l = len(batch.local_views) if s_local is not None else 0
        return (
            ViewFeatures(s_global, s_local, n_g, n_l, batch, self.backbone, masks, extra),
            ViewFeatures(t_global, None, n_g, 0, batch, self.teacher.backbone),
        )

    def compute_losses(self, batch: MultiViewBatch) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Total weighted loss and every named term/metric for one batch."""
        student, teacher = self.compute_features(batch)
        state = self.state()
        total: Tensor | float = 0.0
        logs: dict[str, Tensor | float] = {}
        for name, obj in self.objectives.items():
            head = self.teacher.heads[name] if name in self.teacher.heads else None
            out = obj(student, teacher, head, state)
            total = total + obj.cfg.weight * out.loss
            logs[f"loss/{name}"] = out.loss.detach()
            logs.update(out.metrics)
        if self._collapse_due() and teacher.global_:
            logs.update(self.collapse_logs(teacher))
        assert isinstance(total, Tensor)
        return total, logs

    def _collapse_due(self) -> bool:
        """True on the steps Lightning writes to the loggers (every ``train.log_every_n_steps``)."""
        if self.collapse_monitor is None or not isinstance(self._trainer, L.Trainer):
            return False  # outside a Lightning run (benchmarks, tests calling compute_losses)
        n = self.trainer.log_every_n_steps
        # the counter Lightning's logger connector uses (+1: checked before the step completes)
        stepped = getattr(self.trainer.fit_loop.epoch_loop, "_batches_that_stepped", int(self.global_step))
        return n > 0 and (int(stepped) + 1) % n == 0

    def collapse_logs(self, teacher: ViewFeatures) -> dict[str, Tensor | float]:
        """Collapse indicators (:mod:`stratavit.engine.callbacks.collapse`) of the teacher's CLS at its deepest level.

        Read on the first global view only (one embedding per image, (B, C) per process), gathered
        over processes: a collective, so every process calls it at the same steps. The rank-0
        process feeds the monitor, which warns once when the values stay low.
        """
        level = max(teacher.global_)
        with torch.no_grad():
            cls = teacher.global_[level].cls
            z = gather_concat(cls[: cls.shape[0] // teacher.n_global].float())
            with torch.autocast(self.device.type, enabled=False):  # SVD in fp32 under bf16 training
                metrics = collapse_metrics(z)
        assert self.collapse_monitor is not None
        below = self.collapse_monitor.is_below(metrics)
        if rank() == 0:
            self.collapse_monitor.update(int(self.global_step), metrics)
        return {**{f"collapse/{k}": v for k, v in metrics.items()}, "collapse/alert": float(below)}

    def training_step(self, batch: MultiViewBatch, batch_idx: int) -> Tensor | None:
        total, logs = self.compute_losses(batch)
        self._stepped = False
        if not torch.isfinite(total):
            self.nonfinite_steps += 1
            self._nonfinite_streak += 1
            log.warning("step %d: non-finite loss (%s); skipping the step", self.global_step, total.item())
            if self._nonfinite_streak >= self.cfg.train.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{self._nonfinite_streak} consecutive steps had a non-finite loss (last: {total.item()}). "
                    "Lower optim.base_lr, set optim.clip_grad, or check the data; the last good "
                    "checkpoint is kept in the run folder."
                )
            return None
        self._nonfinite_streak = 0
        self._stepped = True
        bs = batch.batch_size
        self.log("loss", total.detach(), prog_bar=True, batch_size=bs)
        self.log_dict({k: v for k, v in logs.items()}, batch_size=bs)
        self.log("lr", self._schedule("lr", int(self.global_step)), batch_size=bs)
        self.log("wd", self._schedule("wd", int(self.global_step)), batch_size=bs)
        self.log("momentum", self._schedule("momentum", int(self.global_step)), batch_size=bs)
        return total

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

    def on_after_backward(self) -> None:
        state = self.state()
        for obj in self._objs():
            obj.on_after_backward(state)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._stepped:
            return
        step = int(self.global_step) - 1  # the optimiser step that just finished
        self.teacher.update(self.backbone, self._student_heads, self._schedule("momentum", max(step, 0)))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nonfinite_steps"] = self.nonfinite_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_steps = int(checkpoint.get("nonfinite_steps", 0))

    def config_dict(self) -> dict[str, Any]:
        return to_dict(self.cfg)
