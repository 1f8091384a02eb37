"""What every objective shares: its config fields, the step state and the features it reads.

An objective owns its heads, declares the levels it reads from the student and the teacher, and
returns its loss with named metrics. It never runs the backbone: the engine runs one student
forward per view group and one teacher forward over the global views, collecting every level any
objective asked for, and hands the same :class:`ViewFeatures` to all objectives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor, nn

from stratavit.backbone import Backbone, Features
from stratavit.views import MultiViewBatch


@dataclass
class ObjectiveConfig:
    """Fields every objective has."""

    weight: float = 1.0
    """Weight of this objective's loss in the total."""
    levels: list[int] = field(default_factory=lambda: [-1])
    """Backbone levels read (1-based block numbers; -1 = last block)."""


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
    """

    global_: Features
    local: Features | None
    n_global: int
    n_local: int
    batch: MultiViewBatch


@dataclass
class ObjectiveOutput:
    """``loss``: scalar (unweighted); ``metrics``: named scalars to log (floats or 0-d tensors)."""

    loss: Tensor
    metrics: dict[str, Tensor | float] = field(default_factory=dict)


class Objective(nn.Module):
    """Base class: a loss with its heads. Subclasses set ``name`` and ``config_class``."""

    name: ClassVar[str]
    config_class: ClassVar[type[ObjectiveConfig]]
    reads_local_views: ClassVar[bool] = False

    def __init__(self, cfg: ObjectiveConfig, backbone: Backbone) -> None:
        super().__init__()
        self.cfg = cfg
        self.levels = [backbone.resolve_level(lv) for lv in cfg.levels]

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

    def on_after_backward(self, state: StepState) -> None:
        """Hook after gradients exist, before the optimiser step (e.g. freeze a layer)."""
