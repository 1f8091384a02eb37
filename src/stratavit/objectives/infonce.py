"""``infonce``: MoCo v3's contrastive loss (Chen, Xie, He 2021), at one or more levels.

Student: feature -> projector g -> predictor h -> q; teacher (EMA): feature -> g_t -> k.
``ctr(q, k) = 2τ · CE(q kᵀ/τ, own index)`` with l2-normalised q, k and the keys of the whole
global batch gathered across processes (no queue). Over the global views, every ordered pair
(i, j ≠ i) contributes ``ctr(q_i, k_j)``; the sum is scaled so that two views give MoCo v3's
``ctr(q1, k2) + ctr(q2, k1)``. Each level has its own projector and predictor (MCVT).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stratavit.backbone import Backbone, LevelFeatures
from stratavit.distributed import gather_concat, rank
from stratavit.objectives.base import Objective, ObjectiveConfig, ObjectiveOutput, StepState, ViewFeatures
from stratavit.objectives.heads import moco_mlp


@dataclass
class InfoNCEConfig(ObjectiveConfig):
    temperature: float = 0.2
    feature: Literal["cls", "mean_patch"] = "cls"
    """Per-level feature: the CLS token, or the mean of the patch tokens (both after LayerNorm)."""
    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    proj_layers: int = 3
    pred_hidden_dim: int = 4096
    pred_layers: int = 2
    level_weights: list[float] | None = None
    """Weight of each level's loss (default 1 each)."""


def infonce_loss(q: Tensor, k: Tensor, temperature: float) -> Tensor:
    """MoCo v3 ``ctr``: ``2τ · CE(q k_allᵀ / τ, own index)``.

    Args:
        q: (B, D) queries of this process (normalised here).
        k: (B, D) keys of this process (normalised here, no gradient); keys of all processes are
            gathered, so the negatives are the whole global batch.
    Returns:
        scalar, mean over this process's B queries.
    """
    q = F.normalize(q, dim=1)
    k_all = F.normalize(gather_concat(k), dim=1)
    logits = q @ k_all.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device) + rank() * q.shape[0]
    return F.cross_entropy(logits, labels) * (2 * temperature)


def level_feature(f: LevelFeatures, kind: str) -> Tensor:
    """(B, C) per-level feature: CLS or mean of patch tokens, after the final LayerNorm."""
    return f.cls if kind == "cls" else f.patches.mean(dim=1)


class InfoNCE(Objective):
    name = "infonce"
    config_class = InfoNCEConfig

    def __init__(self, cfg: InfoNCEConfig, backbone: Backbone) -> None:
        super().__init__(cfg, backbone)
        self.cfg: InfoNCEConfig = cfg
        if cfg.level_weights is not None and len(cfg.level_weights) != len(self.levels):
            raise ValueError(
                f"objectives.infonce.level_weights has {len(cfg.level_weights)} values for {len(self.levels)} levels"
            )
        d = backbone.embed_dim
        self.projectors = nn.ModuleDict(
            {str(lv): moco_mlp(d, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers) for lv in self.levels}
        )
        self.predictors = nn.ModuleDict(
            {str(lv): moco_mlp(cfg.proj_dim, cfg.pred_hidden_dim, cfg.proj_dim, cfg.pred_layers) for lv in self.levels}
        )

    def teacher_head(self) -> nn.Module:
        return self.projectors

    def forward(
        self, student: ViewFeatures, teacher: ViewFeatures, teacher_head: nn.Module | None, state: StepState
    ) -> ObjectiveOutput:
        assert teacher_head is not None
        n = student.n_global
        if n < 2:
            raise ValueError("infonce needs at least 2 global views (views.global_crops >= 2)")
        weights = self.cfg.level_weights or [1.0] * len(self.levels)
        total = torch.zeros((), device=student.global_[self.levels[0]].tokens_pre.device)
        metrics: dict[str, Tensor | float] = {}
        for lv, w in zip(self.levels, weights):
            key = str(lv)
            q = self.predictors[key](self.projectors[key](level_feature(student.global_[lv], self.cfg.feature)))
            with torch.no_grad():
                k = teacher_head[key](level_feature(teacher.global_[lv], self.cfg.feature))
            qs, ks = q.float().chunk(n), k.float().chunk(n)
            loss = sum(infonce_loss(qs[i], ks[j], self.cfg.temperature) for i in range(n) for j in range(n) if i != j)
            loss = loss * (2.0 / (n * (n - 1)))
            total = total + w * loss
            if len(self.levels) > 1:
                metrics[f"infonce/block{lv}"] = loss.detach()
        return ObjectiveOutput(total, metrics)
