"""What every objective shares: its config fields, the step state and the features it reads.

An objective owns its heads, declares the levels it reads from the student and the teacher, and
returns its loss with named metrics. It never runs the backbone: the engine runs one student
forward per view group and one teacher forward over the global views, collecting every level any
objective asked for, and hands the same :class:`ViewFeatures` to all objectives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from stratavit.backbone import Backbone, Features
from stratavit.config import ConfigError, ViewsConfig
from stratavit.views import MultiViewBatch


@dataclass
class ObjectiveConfig:
    """Fields every objective has."""

    weight: float = 1.0
    """Weight of this objective's loss in the total."""
    levels: list[int] = field(default_factory=lambda: [-1])
    """Backbone levels read (1-based block numbers; -1 = last block)."""
    levels_for_depth: int | None = None
    """If set, ``levels`` are given for a backbone of this depth and are rescaled proportionally
    to the actual depth (e.g. taps [4, 8] of 12 become [2, 4] of 6)."""


@dataclass
class StepState:
    """Where training is: schedules that belong to an objective (e.g. DINO's teacher temperature) read it."""

    step: int
    epoch: int
    steps_per_epoch: int
    total_steps: int

    @property
    def epoch_float(self) -> float:
        return self.step / max(1, self.steps_per_epoch)


@dataclass
class ViewFeatures:
    """Features of one network over a step's views.

    Attributes:
        global_: level -> features of the global views concatenated view-major: (n_global · B, ...).
        local: the same for local views (None if there are none or this is the teacher).
        n_global, n_local: number of views in each group.
        batch: the batch (geometry of every view, per sample).
        backbone: the network that produced these features (student or teacher backbone), for
            objectives that re-read a block (e.g. its attention).
        masks: (n_global · B, N) bool, True where the student's global-view patch was replaced by
            the mask token (masked image modelling); None when nothing was masked.
    """

    global_: Features
    local: Features | None
    n_global: int
    n_local: int
    batch: MultiViewBatch
    backbone: Backbone | None = None
    masks: Tensor | None = None
    extra: dict[str, Features] = field(default_factory=dict)
    """Features of the extra image batches objectives asked for (:meth:`Objective.student_views`)."""


@dataclass
class ObjectiveOutput:
    """``loss``: scalar (unweighted); ``metrics``: named scalars to log (floats or 0-d tensors)."""

    loss: Tensor
    metrics: dict[str, Tensor | float] = field(default_factory=dict)


def resolve_levels(cfg: ObjectiveConfig, backbone: Backbone) -> list[int]:
    """Config levels -> 1-based block numbers of ``backbone`` (rescaled if ``levels_for_depth``)."""
    levels = list(cfg.levels)
    if cfg.levels_for_depth is not None:
        ref = cfg.levels_for_depth
        levels = [lv if lv < 0 else max(1, min(backbone.depth, round(lv * backbone.depth / ref))) for lv in levels]
    resolved = [backbone.resolve_level(lv) for lv in levels]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"levels {cfg.levels} map to repeated blocks {resolved} in a {backbone.depth}-block backbone")
    return resolved


class Objective(nn.Module):
    """Base class: a loss with its heads. Subclasses set ``name`` and ``config_class``."""

    name: ClassVar[str]
    config_class: ClassVar[type[ObjectiveConfig]]
    reads_local_views: ClassVar[bool] = False

    def __init__(self, cfg: ObjectiveConfig, backbone: Backbone) -> None:
        super().__init__()
        self.cfg = cfg
        self.levels = resolve_levels(cfg, backbone)

    def require_one_level(self, reads: str) -> int:
        """The single level of an objective that reads one (e.g. ``"its CLS token"``), else ConfigError."""
        if len(self.levels) != 1:
            raise ConfigError(f"objectives.{self.name} reads exactly one level ({reads}); give one in 'levels'")
        return self.levels[0]

    def student_levels(self) -> list[int]:
        return list(self.levels)

    def teacher_levels(self) -> list[int]:
        return list(self.levels)

    def teacher_head(self) -> nn.Module | None:
        """The student-side module whose EMA copy is this objective's teacher side (or None)."""
        return None

    def forward(
        self,
        student: ViewFeatures,
        teacher: ViewFeatures,
        teacher_head: nn.Module | None,
        state: StepState,
    ) -> ObjectiveOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def student_masks(
        self, n_views: int, batch_size: int, grid: tuple[int, int], state: StepState, device: torch.device
    ) -> tuple[Tensor, Tensor] | None:
        """Masks for the student's global views: ``((n_views · B, N) bool, mask token (C,))`` or None.

        At most one objective of a recipe masks; the engine runs the student's global views with
        these masks and hands them to every objective in ``ViewFeatures.masks``.
        """
        return None

    def check_setup(self, views: ViewsConfig, batch_size: int) -> None:
        """Raise ``ConfigError`` before training when the views or batch cannot work for this objective."""

    def student_views(self, batch: MultiViewBatch, state: StepState) -> dict[str, Tensor]:
        """Extra image batches ``name -> (n, 3, H, W)`` for the student backbone (e.g. montages).

        The engine runs each through the student at this objective's student levels and hands the
        features to :meth:`forward` in ``student.extra[name]``.
        """
        return {}

    def augment_student(self, images: Tensor, group: str, state: StepState) -> Tensor:
        """Student-only augmentation of a view group (``"global"`` or ``"local"``), (V·B, 3, H, W)."""
        return images

    def on_after_backward(self, state: StepState) -> None:
        """Hook after gradients exist, before the optimiser step (e.g. freeze a layer)."""

    def needs_dataset_pass(self, epoch: int, epochs: int) -> bool:
        """True if, before ``epoch``, this objective needs embeddings of the whole training set."""
        return False

    def embed(self, teacher: Features, teacher_head: nn.Module | None) -> Tensor:
        """(B, D) embeddings of eval-transformed images from teacher features (for a dataset pass)."""
        raise NotImplementedError

    def on_dataset_embeddings(self, local_emb: Tensor, local_idx: Tensor, n_total: int, epoch: int) -> dict[str, float]:
        """Receive this process's share of the dataset embeddings (E-step); returns metrics to log."""
        raise NotImplementedError
