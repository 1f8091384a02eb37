"""What every objective shares: its config fields, the step state and the features it reads.

An objective owns its heads, declares the levels it reads from the student and the teacher, and
returns its loss with named metrics. It never runs the backbone: the engine runs one student
forward per view group and one teacher forward over the global views, collecting every level any
objective asked for, and hands the same :class:`ViewFeatures` to all objectives.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from stratavit.backbones.features import FeatureBackbone, Features, resolve_level
from stratavit.config import ConfigError, ViewsConfig
from stratavit.data.views import MultiViewBatch

log = logging.getLogger(__name__)


@dataclass
class ObjectiveConfig:
    """Fields every objective has."""

    weight: float = 1.0
    """Weight of this objective's loss in the total."""
    levels: list[int] = field(default_factory=lambda: [-1])
    """Backbone levels read (1-based block numbers; -1 = last block)."""
    levels_for_depth: int | None = None
    """If set, ``levels`` are given for a backbone of this depth and are rescaled proportionally
    to the actual depth (e.g. taps [4, 8] of 12 become [2, 4] of 6; on shallow backbones repeated
    blocks are spread apart, see :func:`resolve_levels`)."""


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

    def epoch_for(self, epochs: float) -> float:
        """The epoch to hold against a schedule length written in epochs: the whole epoch when
        ``epochs`` is a whole number (the authors' per-epoch schedules, unchanged), the fractional
        ``step / steps_per_epoch`` when it is a fraction (a recipe ``train.budget`` compressed)."""
        return self.epoch if float(epochs).is_integer() else self.epoch_float


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
    backbone: FeatureBackbone | None = None
    masks: Tensor | None = None
    extra: dict[str, Features] = field(default_factory=dict)
    """Features of the extra image batches objectives asked for (:meth:`AddsStudentViews.student_views`)."""
    layouts: dict[str, Any] = field(default_factory=dict)
    """What came with each extra image batch (:attr:`StudentViews.layout`, e.g. a montage's tiles),
    by the same name: the step's own record of how to read ``extra`` back."""


@dataclass
class ObjectiveOutput:
    """``loss``: scalar (unweighted); ``metrics``: named scalars to log (floats or 0-d tensors)."""

    loss: Tensor
    metrics: dict[str, Tensor | float] = field(default_factory=dict)


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _spread(positions: list[int], depth: int) -> list[int]:
    """Strictly increasing blocks in 1..depth, each as close to ``positions`` (ascending, possibly
    repeating) as the order allows: a forward pass lifts each to at least previous + 1, a backward
    pass lowers each to at most next − 1 (the last at most ``depth``). Needs len <= depth."""
    out = list(positions)
    for i in range(1, len(out)):
        out[i] = max(out[i], out[i - 1] + 1)
    out[-1] = min(out[-1], depth)
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1] - 1)
    return out


def resolve_levels(cfg: ObjectiveConfig, backbone: FeatureBackbone, name: str = "objective") -> list[int]:
    """Config levels -> distinct 1-based block numbers of ``backbone``, in the config's order.

    Without ``levels_for_depth`` the levels are blocks of ``backbone`` (negative: from the end);
    they must be distinct. With ``levels_for_depth = R`` they are blocks of an R-block reference
    backbone (distinct there) and are mapped to the actual depth D:

    1. proportionally: ``lv -> clamp(floor(lv · D / R + 1/2), 1, D)`` (negative levels count from
       the end of the actual backbone, -1 = block D);
    2. if that repeats a block (shallow backbones) and there are enough blocks, the taps, taken in
       their order in the reference backbone, are spread to distinct blocks: each at least the
       previous + 1, then each at most the next − 1 with the deepest at most D (e.g. [4, 8] of 12
       -> [1, 1] -> [1, 2] on depth 2; [11, 12] of 12 -> [4, 4] -> [3, 4] on depth 4).

    A mapping that differs from the reference is logged at INFO. Raises ``ConfigError`` (naming
    ``objectives.<name>``) for repeated levels, or for more taps than the backbone has blocks, with
    overrides that work.
    """
    levels = list(cfg.levels)
    key = f"objectives.{name}"
    depth = backbone.depth
    if not levels:
        raise ConfigError(f"{key}.levels is empty; give at least one block (e.g. [-1], the last)")
    if cfg.levels_for_depth is None:
        resolved = [backbone.resolve_level(lv) for lv in levels]
        if len(set(resolved)) != len(resolved):
            raise ConfigError(
                f"{key}.levels={levels} repeat blocks ({resolved} of a {depth}-block backbone); give each block once"
            )
        return resolved
    ref = cfg.levels_for_depth
    if ref < 1:
        raise ConfigError(f"{key}.levels_for_depth must be >= 1 (or null), got {ref}")
    at_ref = [resolve_level(lv, ref, f"block reference backbone ({key}.levels_for_depth={ref})") for lv in levels]
    if len(set(at_ref)) != len(at_ref):
        raise ConfigError(
            f"{key}.levels={levels} repeat blocks ({at_ref}) of the {ref}-block reference backbone "
            f"({key}.levels_for_depth); give each block once"
        )
    if len(levels) > depth:
        keep = sorted(range(len(levels)), key=lambda i: at_ref[i])[:depth]
        fix = [f"{key}.levels={list(range(1, depth + 1))}", f"{key}.levels_for_depth=null"]
        weights = getattr(cfg, "level_weights", None)
        if isinstance(weights, list) and len(weights) == len(levels):
            fix.append(f"{key}.level_weights={[float(weights[i]) for i in keep]}")
        raise ConfigError(
            f"{key}.levels={levels} (taps of a {ref}-block backbone, {key}.levels_for_depth={ref}) need "
            f"{len(levels)} distinct blocks, but the backbone has {depth} (backbone.depth={depth}); "
            f"set {' '.join(fix)}, or backbone.depth={len(levels)} (or more)"
        )
    proportional = [
        backbone.resolve_level(lv) if lv < 0 else max(1, min(depth, _half_up(lv * depth / ref))) for lv in levels
    ]
    resolved = list(proportional)
    if len(set(proportional)) != len(proportional):
        order = sorted(range(len(levels)), key=lambda i: at_ref[i])
        for i, b in zip(order, _spread([proportional[i] for i in order], depth)):
            resolved[i] = b
    if resolved != at_ref or depth != ref:
        how = f" (proportionally {proportional}, spread to distinct blocks)" if resolved != proportional else ""
        log.info(
            "%s: levels %s of a %d-block backbone -> blocks %s of %d%s", key, levels, ref, resolved, depth, how
        )
    return resolved


class Objective(nn.Module):
    """Base class: a loss with its heads. Subclasses set ``name`` and ``config_class``.

    What an objective can do beyond its loss is declared by the methods it defines, each a small
    protocol below that the engine checks with ``isinstance`` when it is built: :class:`MasksStudent`,
    :class:`AugmentsStudent`, :class:`AddsStudentViews`, :class:`AdjustsGradients`,
    :class:`NeedsDatasetPass`. The base class defines none of them.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[ObjectiveConfig]]
    reads_local_views: ClassVar[bool] = False

    def __init__(self, cfg: ObjectiveConfig, backbone: FeatureBackbone) -> None:
        super().__init__()
        self.cfg = cfg
        self.levels = resolve_levels(cfg, backbone, self.name)

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

    def check_setup(self, views: ViewsConfig, batch_size: int) -> None:
        """Raise ``ConfigError`` before training when the views or batch cannot work for this objective."""

    def check_data(self, n_images: int) -> None:
        """Called once before training with the training set's size (after ``data.limit``), where it
        is known (not for streamed shards): raise ``ConfigError`` if this objective cannot work on
        that many images, or resolve settings that depend on it (e.g. k-means granularities)."""


# ------------------------------------------------------------------------------ capabilities
# An objective has a capability when it defines the protocol's methods; the engine finds them with
# ``isinstance(objective, Protocol)`` once, when it is built, and calls them at fixed points of the
# step (engine/module.py) or of the epoch (engine/callbacks/dataset_pass.py).


@dataclass
class StudentViews:
    """An extra image batch for the student (:meth:`AddsStudentViews.student_views`).

    ``images``: (n, 3, H, W). ``layout``: whatever the objective needs to read the features of
    these images back (e.g. which tile of which canvas came from which sample); the engine hands it
    to :meth:`Objective.forward` in ``student.layouts[name]``, so nothing is kept between the calls.
    """

    images: Tensor
    layout: Any = None


@runtime_checkable
class MasksStudent(Protocol):
    """Masks the student's global views (masked image modelling). At most one per recipe."""

    def student_masks(
        self, n_views: int, batch_size: int, grid: tuple[int, int], state: StepState, device: torch.device
    ) -> tuple[Tensor, Tensor] | None:
        """``((n_views · B, N) bool, mask token (C,))`` or None (nothing masked this step).

        The engine runs the student's global views with these masks and hands them to every
        objective in ``ViewFeatures.masks``.
        """
        ...


@runtime_checkable
class AugmentsStudent(Protocol):
    """Augments the student's input only (the teacher sees the plain views)."""

    def augment_student(self, images: Tensor, group: str, state: StepState) -> Tensor:
        """Student-only augmentation of a view group (``"global"`` or ``"local"``), (V·B, 3, H, W)."""
        ...


@runtime_checkable
class AddsStudentViews(Protocol):
    """Has extra image batches run through the student (e.g. MCL's montages)."""

    def student_views(self, batch: MultiViewBatch, state: StepState) -> dict[str, StudentViews]:
        """Extra image batches by name. The engine runs each through the student at this
        objective's student levels; :meth:`Objective.forward` finds the features in
        ``student.extra[name]`` and the layout in ``student.layouts[name]``."""
        ...


@runtime_checkable
class AdjustsGradients(Protocol):
    """Changes gradients after backward, before clipping and the optimiser step (e.g. freezes a layer)."""

    def on_after_backward(self, state: StepState) -> None: ...


@runtime_checkable
class NeedsDatasetPass(Protocol):
    """Needs teacher embeddings of the whole training set before some epochs (e.g. ProtoNCE's k-means)."""

    def needs_dataset_pass(self, epoch: int, epochs: int) -> bool:
        """True if, before ``epoch``, this objective needs embeddings of the whole training set."""
        ...

    def embed(self, teacher: Features, teacher_head: nn.Module | None) -> Tensor:
        """(B, D) embeddings of eval-transformed images from teacher features."""
        ...

    def on_dataset_embeddings(self, local_emb: Tensor, local_idx: Tensor, n_total: int, epoch: int) -> dict[str, float]:
        """Receive this process's share of the dataset embeddings (E-step); returns metrics to log."""
        ...
