"""Objectives by name: the one dict recipes are resolved through."""

from __future__ import annotations

from stratavit.objectives.base import Objective, ObjectiveConfig, ObjectiveOutput, StepState, ViewFeatures
from stratavit.objectives.dino import DINO, DINOConfig
from stratavit.objectives.infonce import InfoNCE, InfoNCEConfig

OBJECTIVES: dict[str, type[Objective]] = {
    InfoNCE.name: InfoNCE,
    DINO.name: DINO,
}

__all__ = [
    "OBJECTIVES",
    "DINO",
    "DINOConfig",
    "InfoNCE",
    "InfoNCEConfig",
    "Objective",
    "ObjectiveConfig",
    "ObjectiveOutput",
    "StepState",
    "ViewFeatures",
]
