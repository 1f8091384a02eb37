"""``infonce``: MoCo v3's contrastive loss (Chen, Xie, He 2021), at one or more levels.

Student: feature -> projector g -> predictor h -> q; teacher (EMA): feature -> g_t -> k. g is
MoCo v3's 3-layer MLP ending in BatchNorm without affine; h its 2-layer MLP, which on a ViT ends
in the same BatchNorm (``MoCo_ViT``) and on a CNN does not (``pred_last_bn``).
``ctr(q, k) = 2τ · CE(q kᵀ/τ, own index)`` with l2-normalised q, k and the keys of the whole
global batch gathered across processes (no queue). Over the global views, every ordered pair
(i, j ≠ i) contributes ``ctr(q_i, k_j)``; the sum is scaled so that two views give MoCo v3's
``ctr(q1, k2) + ctr(q2, k1)``. Each level has its own projector and predictor (MCVT), and with
``norm: own`` its own LayerNorm (EMA-copied to the teacher with the projector).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stratavit.backbones.features import FeatureBackbone, LevelFeatures
from stratavit.distributed import gather_concat, rank
from stratavit.objectives.base import (
    Objective,
    ObjectiveOutput,
    StepState,
    ViewFeatures,
)
from stratavit.objectives.heads import (
    ContrastiveHeadConfig,
    moco_mlp,
    moco_predictor,
    per_view,
    predictor_last_bn,
)


@dataclass
class InfoNCEConfig(ContrastiveHeadConfig):
    feature: Literal["cls", "mean_patch"] = "cls"
    """Per-level feature: the CLS token, or the mean of the patch tokens."""
    norm: Literal["backbone", "own"] = "backbone"
    """LayerNorm before the feature: the backbone's final norm, or a new one per level (MCVT)."""
    level_weights: list[float] | None = None
    """Weight of each level's loss (default 1 each)."""
    queue_size: int = 0
    """Extra negatives: a FIFO queue of this many past keys per level (MoCo v2 style; 0 = off,
    MoCo v3's default). MCVT's shallow levels allow it as an option [inferred]."""


def infonce_loss(q: Tensor, k: Tensor, temperature: float, queue: Tensor | None = None) -> Tensor:
    """MoCo v3 ``ctr``: ``2τ · CE(q [k_all; queue]ᵀ / τ, own index)``.

    Args:
        q: (B, D) queries of this process (normalised here).
        k: (B, D) keys of this process (normalised here, no gradient); keys of all processes are
            gathered, so the negatives are the whole global batch.
        queue: optional (Q, D) l2-normalised past keys, extra negatives.
    Returns:
        scalar, mean over this process's B queries.
    """
    q = F.normalize(q, dim=1)
    k_all = F.normalize(gather_concat(k), dim=1)
    if queue is not None and queue.numel():
        k_all = torch.cat([k_all, queue.to(k_all.dtype)])
    logits = q @ k_all.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device) + rank() * q.shape[0]
    return F.cross_entropy(logits, labels) * (2 * temperature)


def symmetric_infonce(q: Tensor, k: Tensor, n_views: int, temperature: float, queue: Tensor | None = None) -> Tensor:
    """Sum of ``ctr(q_i, k_j)`` over ordered view pairs i ≠ j, × 2/(n(n−1)).

    Args:
        q, k: (n_views · B, D), view-major.
        queue: optional (Q, D) extra negatives shared by every pair.
    """
    if n_views < 2:
        raise ValueError("a contrastive loss needs at least 2 global views (views.global_crops >= 2)")
    qs, ks = q.float().chunk(n_views), k.float().chunk(n_views)
    total = sum(
        infonce_loss(qs[i], ks[j], temperature, queue) for i in range(n_views) for j in range(n_views) if i != j
    )
    return total * (2.0 / (n_views * (n_views - 1)))  # type: ignore[return-value]


def pooled_feature(f: LevelFeatures, kind: str, norm: nn.Module | None = None) -> Tensor:
    """(B, C) CLS or mean patch token, after ``norm`` (default: the backbone's final norm)."""
    tokens = norm(f.tokens_pre) if norm is not None else f.tokens
    return tokens[:, 0] if kind == "cls" else tokens[:, 1:].mean(dim=1)


class InfoNCE(Objective):
    name = "infonce"
    config_class = InfoNCEConfig

    def __init__(self, cfg: InfoNCEConfig, backbone: FeatureBackbone) -> None:
        super().__init__(cfg, backbone)
        self.cfg: InfoNCEConfig = cfg
        if cfg.level_weights is not None and len(cfg.level_weights) != len(self.levels):
            raise ValueError(
                f"objectives.{self.name}.level_weights has {len(cfg.level_weights)} values for {len(self.levels)} levels"
            )
        d = backbone.embed_dim
        self.projectors = nn.ModuleDict(
            {str(lv): moco_mlp(d, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers) for lv in self.levels}
        )
        last_bn = predictor_last_bn(cfg, backbone)
        self.predictors = nn.ModuleDict({str(lv): moco_predictor(cfg, last_bn) for lv in self.levels})
        self.norms = nn.ModuleDict({str(lv): nn.LayerNorm(d, eps=1e-6) for lv in self.levels}) if cfg.norm == "own" else None
        if cfg.queue_size < 0:
            raise ValueError(f"objectives.{self.name}.queue_size must be >= 0")
        for lv in self.levels:
            self.register_buffer(f"queue_{lv}", F.normalize(torch.randn(cfg.queue_size, cfg.proj_dim), dim=1))
            self.register_buffer(f"queue_ptr_{lv}", torch.zeros((), dtype=torch.long))

    def queue(self, lv: int) -> Tensor | None:
        """(Q, proj_dim) past keys of level ``lv`` (None when the queue is off)."""
        return getattr(self, f"queue_{lv}") if self.cfg.queue_size > 0 else None

    @torch.no_grad()
    def enqueue(self, lv: int, keys: Tensor, n_views: int = 1) -> None:
        """Write the gathered, normalised ``keys`` (n_views · B, D), view-major, into level ``lv``'s
        FIFO queue, in the view-major order of the batch of all processes (so the queue does not
        depend on how the batch is split across processes)."""
        if self.cfg.queue_size <= 0:
            return
        queue, ptr = getattr(self, f"queue_{lv}"), getattr(self, f"queue_ptr_{lv}")
        gathered = gather_concat(keys.float())  # (world · n_views · B, D), process-major
        world = gathered.shape[0] // keys.shape[0]
        gathered = gathered.reshape(world, n_views, -1, keys.shape[1]).transpose(0, 1).reshape(-1, keys.shape[1])
        keys = F.normalize(gathered, dim=1)[: self.cfg.queue_size]
        n, size = keys.shape[0], queue.shape[0]
        pos = (int(ptr) + torch.arange(n, device=queue.device)) % size
        queue[pos] = keys.to(queue.dtype)
        ptr.fill_((int(ptr) + n) % size)

    def teacher_head(self) -> nn.Module:
        parts = {"proj": self.projectors}
        if self.norms is not None:
            parts["norm"] = self.norms
        return nn.ModuleDict(parts)

    def query(self, f: LevelFeatures, lv: int, n_views: int = 1) -> Tensor:
        """(n_views · B, proj_dim) student predictions at level ``lv``; heads run per view (:func:`per_view`)."""
        norm = self.norms[str(lv)] if self.norms is not None else None
        proj, pred = self.projectors[str(lv)], self.predictors[str(lv)]
        return per_view(lambda x: pred(proj(x)), pooled_feature(f, self.cfg.feature, norm), n_views)

    def key(self, f: LevelFeatures, lv: int, teacher_head: nn.Module, n_views: int = 1) -> Tensor:
        """(n_views · B, proj_dim) teacher projections at level ``lv`` (no gradient), per view."""
        with torch.no_grad():
            norm = teacher_head["norm"][str(lv)] if "norm" in teacher_head else None
            return per_view(teacher_head["proj"][str(lv)], pooled_feature(f, self.cfg.feature, norm), n_views)

    def contrast(
        self, student: ViewFeatures, teacher: ViewFeatures, teacher_head: nn.Module
    ) -> tuple[Tensor, dict[str, Tensor | float], dict[int, Tensor]]:
        """Weighted per-level InfoNCE; also returns each level's queries (n_global · B, proj_dim)."""
        weights = self.cfg.level_weights or [1.0] * len(self.levels)
        total: Tensor | float = 0.0
        metrics: dict[str, Tensor | float] = {}
        queries: dict[int, Tensor] = {}
        for lv, w in zip(self.levels, weights):
            q = queries[lv] = self.query(student.global_[lv], lv, student.n_global)
            k = self.key(teacher.global_[lv], lv, teacher_head, teacher.n_global)
            queue = self.queue(lv)
            loss = symmetric_infonce(q, k, student.n_global, self.cfg.temperature, queue)
            if self.training:
                self.enqueue(lv, k, student.n_global)
            total = total + w * loss
            if len(self.levels) > 1:
                metrics[f"{self.name}/block{lv}"] = loss.detach()
        assert isinstance(total, Tensor)
        return total, metrics, queries

    def forward(
        self, student: ViewFeatures, teacher: ViewFeatures, teacher_head: nn.Module | None, state: StepState
    ) -> ObjectiveOutput:
        assert teacher_head is not None
        total, metrics, _ = self.contrast(student, teacher, teacher_head)
        return ObjectiveOutput(total, metrics)
