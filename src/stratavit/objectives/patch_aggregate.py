"""``patch_aggregate``: CL-EDI's module B (Liang et al. 2024), reconstructed ([inferred]).

The final patch tokens (CLS excluded) are aggregated into one "detail" vector per view, which
has its own projector, predictor and EMA teacher and is contrasted with symmetric InfoNCE over
the global batch (τ 0.2, MoCo v3's 2τ scaling). Aggregators (``aggregator``):

- ``transformer`` (default): a small transformer (``agg_depth`` timm blocks) over the patch
  tokens with its own learnable aggregation token; the detail vector is that token's output.
- ``mean_mlp``: mean of the patch tokens, then an MLP (Linear, GELU, Linear).
- ``cls_attention``: mean of the patch tokens weighted by the CLS token's attention in the
  level's own block (heads averaged), recomputed from the block's input tokens.

Optional cross term (``cross_weight`` > 0): the student CLS of each view, through this module's
projector and predictor, against the teacher detail vector of the other views.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from stratavit.backbones.features import FeatureBackbone, Features, LevelFeatures
from stratavit.backbones.vit import cls_attention
from stratavit.config import ConfigError
from stratavit.objectives.base import (
    Objective,
    ObjectiveOutput,
    StepState,
    ViewFeatures,
)
from stratavit.objectives.heads import (
    ContrastiveHeadConfig,
    moco_heads,
    per_view,
    predictor_last_bn,
)
from stratavit.objectives.infonce import symmetric_infonce


@dataclass
class PatchAggregateConfig(ContrastiveHeadConfig):
    aggregator: Literal["transformer", "mean_mlp", "cls_attention"] = "transformer"
    agg_depth: int = 1
    agg_heads: int | None = None
    """Heads of the aggregation transformer (default: the backbone's)."""
    cross_weight: float = 0.0
    """Weight of the optional CLS ↔ detail cross term (0 = off)."""


class TransformerAggregator(nn.Module):
    """(B, N, C) patch tokens -> (B, C): transformer blocks over [agg token; patches]."""

    def __init__(self, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.token, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, patches: Tensor) -> Tensor:
        x = torch.cat([self.token.expand(patches.shape[0], -1, -1), patches], dim=1)
        return self.norm(self.blocks(x))[:, 0]


class MeanMLPAggregator(nn.Module):
    """(B, N, C) -> (B, C): mean over patches, then Linear-GELU-Linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, patches: Tensor) -> Tensor:
        return self.mlp(patches.mean(dim=1))


def cls_attention_weights(block: nn.Module, tokens_in: Tensor) -> Tensor:
    """CLS → patch attention of a timm ViT block, heads averaged: (B, 1 + N, C) -> (B, N), rows sum to 1.

    Args:
        block: the timm ``Block`` whose attention is read.
        tokens_in: the tokens entering that block (pre-norm).
    """
    weights = cls_attention(block, tokens_in)[:, :, 1:].mean(dim=1)  # (B, N)
    return weights / weights.sum(dim=1, keepdim=True)


class PatchAggregate(Objective):
    name = "patch_aggregate"
    config_class = PatchAggregateConfig

    def __init__(self, cfg: PatchAggregateConfig, backbone: FeatureBackbone) -> None:
        super().__init__(cfg, backbone)
        self.cfg: PatchAggregateConfig = cfg
        self.require_one_level("the patch tokens it aggregates")
        self.level = self.levels[0]
        d = backbone.embed_dim
        if cfg.aggregator == "transformer":
            self.aggregator: nn.Module | None = TransformerAggregator(d, cfg.agg_depth, cfg.agg_heads or backbone.num_heads)
        elif cfg.aggregator == "mean_mlp":
            self.aggregator = MeanMLPAggregator(d)
        else:
            if self.level < 2:
                raise ConfigError("objectives.patch_aggregate: cls_attention needs a level >= 2 (it reads the block's input)")
            self.aggregator = None
        self.projector, self.predictor = moco_heads(d, cfg, predictor_last_bn(cfg, backbone))

    def student_levels(self) -> list[int]:
        if self.cfg.aggregator == "cls_attention":
            return [self.level - 1, self.level]
        return [self.level]

    teacher_levels = student_levels

    def teacher_head(self) -> nn.Module:
        parts = {"proj": self.projector}
        if self.aggregator is not None:
            parts["agg"] = self.aggregator
        return nn.ModuleDict(parts)

    def detail(self, feats: Features, aggregator: nn.Module | None, blocks: nn.Module | None) -> Tensor:
        """(B, C) detail vector of every view in ``feats``."""
        f: LevelFeatures = feats[self.level]
        if aggregator is not None:
            return aggregator(f.patches)
        if blocks is None:
            raise ValueError("cls_attention needs ViewFeatures.backbone to read the block's attention")
        weights = cls_attention_weights(blocks[self.level - 1], feats[self.level - 1].tokens_pre)
        return (weights.unsqueeze(-1) * f.patches).sum(dim=1)

    def forward(
        self, student: ViewFeatures, teacher: ViewFeatures, teacher_head: nn.Module | None, state: StepState
    ) -> ObjectiveOutput:
        assert teacher_head is not None
        n = student.n_global
        def heads(x: Tensor) -> Tensor:  # run per view, as MoCo v3 (batch-norm statistics)
            return self.predictor(self.projector(x))

        q = per_view(heads, self.detail(student.global_, self.aggregator, _blocks(student)), n)
        with torch.no_grad():
            t_agg = teacher_head["agg"] if "agg" in teacher_head else None
            k = per_view(teacher_head["proj"], self.detail(teacher.global_, t_agg, _blocks(teacher)), teacher.n_global)
        loss = symmetric_infonce(q, k, student.n_global, self.cfg.temperature)
        metrics: dict[str, Tensor | float] = {"patch_aggregate/detail": loss.detach()}
        if self.cfg.cross_weight > 0:
            q_cls = per_view(heads, student.global_[self.level].cls, n)
            cross = symmetric_infonce(q_cls, k, student.n_global, self.cfg.temperature)
            metrics["patch_aggregate/cross"] = cross.detach()
            loss = loss + self.cfg.cross_weight * cross
        return ObjectiveOutput(loss, metrics)


def _blocks(features: ViewFeatures) -> nn.Module | None:
    """The blocks of the backbone that produced ``features`` (needed by ``cls_attention``)."""
    return features.backbone.vit.blocks if features.backbone is not None else None
