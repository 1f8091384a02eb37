"""``dino``: self-distillation with no labels (Caron et al. 2021) on the CLS token.

``P_t = softmax((t − c)/τ_t)`` on the teacher's global views, ``P_s = softmax(s/τ_s)`` on every
student view; loss = mean over pairs (teacher global view q, student view v ≠ q) of
``mean_b CE(P_t(q), P_s(v))``, every pair in one matrix product (:func:`pair_cross_entropy`). The
centre ``c`` is an EMA (momentum 0.9) of the teacher outputs' mean over the whole global batch
(all-reduced across processes). τ_t warms up linearly per epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stratavit.backbones.features import FeatureBackbone
from stratavit.config import ConfigError, ViewsConfig
from stratavit.distributed import all_reduce_sum, world_size
from stratavit.objectives.base import (
    Objective,
    ObjectiveConfig,
    ObjectiveOutput,
    StepState,
    ViewFeatures,
)
from stratavit.objectives.heads import DINOHead


@dataclass
class DINOConfig(ObjectiveConfig):
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    use_bn: bool = False
    norm_last_layer: bool = True
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0
    """Epochs of the teacher-temperature warm-up. A whole number: DINO's per-epoch array. A fraction
    (what ``train.budget`` makes of a recipe's epochs when the run has far fewer): a linear ramp over
    the fractional epoch (see :func:`teacher_temperature`)."""
    center_momentum: float = 0.9
    freeze_last_layer_epochs: float = 1
    """The prototype layer's gradient is dropped while ``step / steps_per_epoch`` is below this (for a
    whole number exactly DINO's ``epoch < freeze_last_layer``; a fraction freezes that share of an epoch)."""


def teacher_temperature(cfg: DINOConfig, epoch: float) -> float:
    """τ_t at (fractional) ``epoch`` (``step / steps_per_epoch``).

    A whole ``W = warmup_teacher_temp_epochs``: DINO's per-epoch array ``linspace(warmup_teacher_temp,
    teacher_temp, W)`` followed by ``teacher_temp``, read at the whole epoch ``e = floor(epoch)``: ``e < W``
    gets ``warm + e (τ − warm)/(W − 1)`` (just ``warm`` when W = 1), and ``e ≥ W`` gets ``teacher_temp``.
    A fractional ``W`` (a budget-compressed recipe, where the warm-up lasts less than an epoch or a
    few): the same ramp, continuous, ``warm + (epoch / W)(τ − warm)`` up to ``W``."""
    warm = float(cfg.warmup_teacher_temp_epochs)
    if epoch >= warm:
        return cfg.teacher_temp
    if not warm.is_integer():
        frac = max(float(epoch), 0.0) / warm
        return cfg.warmup_teacher_temp + frac * (cfg.teacher_temp - cfg.warmup_teacher_temp)
    if warm == 1:
        return cfg.warmup_teacher_temp
    frac = max(math.floor(epoch), 0) / (warm - 1)
    return cfg.warmup_teacher_temp + frac * (cfg.teacher_temp - cfg.warmup_teacher_temp)


def teacher_probs(teacher_out: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """``softmax((t − c) / τ_t)`` without gradient: (..., K) teacher logits, (1, K) centre -> (..., K)."""
    with torch.no_grad():
        return F.softmax((teacher_out - center) / teacher_temp, dim=-1)


def pair_cross_entropy(student_logp: Tensor, teacher_p: Tensor) -> Tensor:
    """Every (teacher view q, student view v) cross-entropy at once, the same-view pairs excluded.

    Args:
        student_logp: (V, B, K) student log-probabilities; the first Q views are the teacher's views.
        teacher_p: (Q, B, K) teacher probabilities.
    Returns:
        scalar: mean over pairs (q, v ≠ q) of ``mean_b Σ_k −P_t(q) log P_s(v)``. One matrix product
        ``(Q, B·K) @ (B·K, V)`` gives every pair's sum; the diagonal q = v is masked out.
    """
    n_q, b = teacher_p.shape[:2]
    n_v = student_logp.shape[0]
    sums = teacher_p.reshape(n_q, -1) @ student_logp.reshape(n_v, -1).t()  # (Q, V): Σ_b Σ_k P_t(q) log P_s(v)
    keep = ~torch.eye(n_q, n_v, dtype=torch.bool, device=sums.device)
    n_pairs = n_q * n_v - min(n_q, n_v)  # counted on the host: no device sync
    return -torch.where(keep, sums, 0.0).sum() / (n_pairs * b)


def dino_loss(
    student_out: list[Tensor] | Tensor, teacher_out: list[Tensor] | Tensor, center: Tensor, student_temp: float,
    teacher_temp: float,
) -> Tensor:
    """Cross-entropy between centred, sharpened teacher and student distributions, over every view pair at once.

    Args:
        student_out: one (B, K) logit tensor per student view, or them stacked (V, B, K); the first
            ``len(teacher_out)`` are the global views, in the same order as ``teacher_out``.
        teacher_out: one (B, K) logit tensor per teacher (global) view, or them stacked (Q, B, K).
        center: (1, K) teacher centre.
    Returns:
        scalar: mean over pairs (q, v ≠ q) of ``mean_b Σ_k −P_t(q) log P_s(v)``
        (:func:`pair_cross_entropy`; no Python loop over the pairs).
    """
    s = torch.stack(list(student_out)) if isinstance(student_out, (list, tuple)) else student_out
    t = torch.stack(list(teacher_out)) if isinstance(teacher_out, (list, tuple)) else teacher_out
    return pair_cross_entropy(F.log_softmax(s / student_temp, dim=-1), teacher_probs(t, center, teacher_temp))


def check_view_pairs(name: str, views: ViewsConfig) -> None:
    """Raise ``ConfigError`` when the views give no (teacher global view, other student view) pair."""
    if views.global_crops < 2 and views.local_crops < 1:
        raise ConfigError(
            f"objectives.{name} compares each teacher global view with the student's other views, and "
            f"views.global_crops={views.global_crops} with views.local_crops={views.local_crops} leaves no pair: "
            "set views.global_crops=2 or views.local_crops=1 (or more)"
        )


@torch.no_grad()
def updated_center(center: Tensor, teacher_out: Tensor, momentum: float) -> Tensor:
    """``c ← m c + (1 − m) · mean(teacher outputs over the batch of all processes)``; (1, K)."""
    return updated_center_from_sum(center, teacher_out.sum(dim=0, keepdim=True), teacher_out.shape[0], momentum)


@torch.no_grad()
def updated_center_from_sum(center: Tensor, local_sum: Tensor, local_count: int, momentum: float) -> Tensor:
    """:func:`updated_center` from this process's sum (1, K) of its ``local_count`` teacher outputs
    (e.g. the linear prototype layer applied once to the summed bottleneck vectors)."""
    batch_mean = all_reduce_sum(local_sum) / (local_count * world_size())
    return center * momentum + batch_mean * (1 - momentum)


class DINO(Objective):
    name = "dino"
    config_class = DINOConfig
    reads_local_views = True

    def __init__(self, cfg: DINOConfig, backbone: FeatureBackbone) -> None:
        super().__init__(cfg, backbone)
        self.require_one_level("its CLS token")
        self.cfg: DINOConfig = cfg
        self.head = DINOHead(
            backbone.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers, cfg.use_bn, cfg.norm_last_layer
        )
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))

    def teacher_head(self) -> nn.Module:
        return self.head

    def check_setup(self, views: ViewsConfig, batch_size: int) -> None:
        check_view_pairs(self.name, views)

    def forward(
        self, student: ViewFeatures, teacher: ViewFeatures, teacher_head: nn.Module | None, state: StepState
    ) -> ObjectiveOutput:
        assert teacher_head is not None
        lv = self.levels[0]
        s_out = self.head(student.global_[lv].cls)
        if student.local:
            s_out = torch.cat([s_out, self.head(student.local[lv].cls)])
        s_out = s_out.float()
        with torch.no_grad():
            t_all = teacher_head(teacher.global_[lv].cls).float()
        temp = teacher_temperature(self.cfg, state.epoch_for(self.cfg.warmup_teacher_temp_epochs))
        b = t_all.shape[0] // teacher.n_global
        pt = teacher_probs(t_all, self.center, temp)
        loss = pair_cross_entropy(F.log_softmax(s_out / self.cfg.student_temp, dim=-1).reshape(-1, b, s_out.shape[-1]),
                                  pt.reshape(teacher.n_global, b, -1))
        with torch.no_grad():
            entropy = -(pt * torch.log(pt.clamp_min(1e-12))).sum(-1).mean()
            if self.training:
                self.center.copy_(updated_center(self.center, t_all, self.cfg.center_momentum))
        return ObjectiveOutput(loss, {"dino/teacher_temp": temp, "dino/teacher_entropy": entropy})

    def on_after_backward(self, state: StepState) -> None:
        if state.epoch_for(self.cfg.freeze_last_layer_epochs) < self.cfg.freeze_last_layer_epochs:
            for p in self.head.last_layer.parameters():
                p.grad = None
