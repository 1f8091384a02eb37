"""Objectives by name: the one dict recipes are resolved through."""

from __future__ import annotations

from stratavit.objectives.base import (
    Objective,
    ObjectiveConfig,
    ObjectiveOutput,
    StepState,
    ViewFeatures,
)
from stratavit.objectives.dino import DINO, DINOConfig
from stratavit.objectives.ibot_mim.objective import IBOT, IBOTConfig
from stratavit.objectives.infonce import InfoNCE, InfoNCEConfig
from stratavit.objectives.montage.objective import MontageConfig, MontageObjective
from stratavit.objectives.patch_aggregate import PatchAggregate, PatchAggregateConfig
from stratavit.objectives.patch_match.objective import PatchMatch, PatchMatchConfig
from stratavit.objectives.protonce.objective import ProtoNCE, ProtoNCEConfig
from stratavit.objectives.self_relation import SelfRelation, SelfRelationConfig

OBJECTIVES: dict[str, type[Objective]] = {
    InfoNCE.name: InfoNCE,
    DINO.name: DINO,
    ProtoNCE.name: ProtoNCE,
    PatchAggregate.name: PatchAggregate,
    IBOT.name: IBOT,
    SelfRelation.name: SelfRelation,
    PatchMatch.name: PatchMatch,
    MontageObjective.name: MontageObjective,
}

__all__ = [
    "OBJECTIVES",
    "DINO",
    "DINOConfig",
    "IBOT",
    "IBOTConfig",
    "InfoNCE",
    "InfoNCEConfig",
    "MontageConfig",
    "MontageObjective",
    "PatchAggregate",
    "PatchAggregateConfig",
    "PatchMatch",
    "PatchMatchConfig",
    "ProtoNCE",
    "ProtoNCEConfig",
    "SelfRelation",
    "SelfRelationConfig",
    "Objective",
    "ObjectiveConfig",
    "ObjectiveOutput",
    "StepState",
    "ViewFeatures",
]
