"""``train.budget``: fit a whole recipe, every schedule included, into a wall-clock budget.

A recipe is written for ``train.epochs`` epochs. Given a budget (``15m``, ``2h``), the run measures
its own cost first (:mod:`stratavit.engine.calibrate`: seconds per optimiser step, and per epoch the
extra cost of a dataset pass (ProtoNCE's E-step) and a checkpoint) and plans the largest number of
steps ``N`` that ends inside the budget::

    fixed + N · step_s + ceil(N / S) · epoch_s  <=  budget − already spent

with ``S`` steps per epoch. The recipe is then *compressed* by ``f = N / (epochs · S)``: the run
stops after ``N`` steps (``train.max_steps``), so the step schedules (lr, weight decay, EMA
momentum) are laid over ``N`` steps, and every schedule written in epochs is multiplied by ``f``
(:func:`compressed_overrides`: ``optim.warmup_epochs`` and every objective field named
``*_epochs`` / ``*_epoch``: DINO's teacher-temperature warm-up and frozen last layer, iBOT's
``pred_start_epoch``, ProtoNCE's warm-up before the first E-step). A budget longer than the recipe
changes nothing: the recipe ends first.

While training, :class:`~stratavit.engine.callbacks.budget.BudgetWatch` compares the measured pace
with the plan; if the projected end drifts by more than ``train.budget_tolerance`` it re-plans
``N`` (:func:`replan`), and the step schedules are rebuilt over the new ``N``. The plan and its
re-plans travel in the checkpoint and are reported in ``run.json`` (planned vs actual time).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from stratavit.config import ConfigError, parse_duration

__all__ = ["BudgetPlan", "Costs", "compressed_overrides", "parse_duration", "plan_budget", "predicted_seconds", "replan"]

@dataclass
class Costs:
    """What the run measured of itself (seconds)."""

    step_s: float
    """One optimiser step (forward, backward, optimiser, EMA, its share of data loading)."""
    epoch_s: float = 0.0
    """Extra per epoch, paid when the epoch starts: the dataset pass of an objective that needs one, the
    epoch checkpoint (an upper bound: an objective's warm-up epochs have no pass)."""
    fixed_s: float = 0.0
    """Once, still to come: the final checkpoint and export."""
    pass_s: float = 0.0
    """The dataset pass's share of ``epoch_s`` (0 without one); the pace measured while training takes the
    passes' measured seconds out instead."""


@dataclass
class BudgetPlan:
    """A budget's plan: ``max_steps`` optimiser steps over ``epochs`` epochs, the recipe compressed by ``scale``."""

    budget_s: float
    costs: Costs
    steps_per_epoch: int
    recipe_steps: int
    max_steps: int
    epochs: int
    scale: float
    started_s: float = 0.0
    """Seconds of the budget already spent when this plan was made (start-up, calibration)."""
    replans: list[dict[str, float]] = field(default_factory=list)
    """``{"at_step", "elapsed_s", "step_s", "max_steps"}`` of every re-plan, in order."""
    notes: list[str] = field(default_factory=list)
    """What the reader must know about the plan, one line each (e.g. an E-step that never comes)."""

    @property
    def planned_s(self) -> float:
        """Seconds the plan expects the whole run to take (what ``run.json`` calls planned time)."""
        return predicted_seconds(self.max_steps, self.steps_per_epoch, self.costs) + self.started_s

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["planned_s"] = round(self.planned_s, 2)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BudgetPlan:
        d = {k: v for k, v in d.items() if k not in ("planned_s", "elapsed_s")}
        costs = dict(d["costs"])
        # a plan written before pass_s existed: its epoch_s held the pass and the save undivided; counting it
        # all as the pass keeps the pace from taking the measured passes out twice (the save is ~0.1 s)
        costs.setdefault("pass_s", costs.get("epoch_s", 0.0))
        return cls(**{**d, "costs": Costs(**costs), "replans": list(d.get("replans", [])),
                      "notes": list(d.get("notes", []))})


def predicted_seconds(steps: int, steps_per_epoch: int, costs: Costs, from_step: int = 0) -> float:
    """Seconds to run steps ``from_step .. steps − 1``, with an epoch cost at every epoch started on the way
    (epoch ``e`` starts before step ``e · S``; the epoch of a ``from_step`` inside it has started already)."""
    if steps <= from_step:
        return costs.fixed_s
    epochs = math.ceil(steps / steps_per_epoch) - math.ceil(from_step / steps_per_epoch)
    return (steps - from_step) * costs.step_s + epochs * costs.epoch_s + costs.fixed_s


def _fit_steps(available_s: float, steps_per_epoch: int, costs: Costs, cap: int, from_step: int = 0) -> int:
    """The most steps ``N`` (``from_step <= N <= cap``) whose remaining time fits ``available_s``."""
    per_step = costs.step_s + costs.epoch_s / steps_per_epoch
    n = from_step + max(0, int((available_s - costs.fixed_s - costs.epoch_s) / per_step))
    n = min(max(n, from_step), cap)
    while n < cap and predicted_seconds(n + 1, steps_per_epoch, costs, from_step) <= available_s:
        n += 1
    while n > from_step and predicted_seconds(n, steps_per_epoch, costs, from_step) > available_s:
        n -= 1
    return n


def plan_budget(budget_s: float, spent_s: float, costs: Costs, steps_per_epoch: int, recipe_steps: int) -> BudgetPlan:
    """The plan for a fresh run: ConfigError if not even one step fits.

    Args:
        budget_s: the whole budget. spent_s: already used (start-up, calibration).
        costs: measured costs. steps_per_epoch: optimiser steps per epoch (``S``).
        recipe_steps: the recipe's own length in steps (``epochs · S``, or its ``max_steps``).
    """
    steps_per_epoch = max(1, int(steps_per_epoch))
    n = _fit_steps(budget_s - spent_s, steps_per_epoch, costs, cap=recipe_steps)
    if n < 1:
        raise ConfigError(
            f"train.budget={budget_s:.0f} s leaves no time for a single step (start-up took {spent_s:.0f} s, "
            f"one step takes {costs.step_s:.1f} s); give a longer budget"
        )
    return BudgetPlan(budget_s, costs, steps_per_epoch, recipe_steps, n, math.ceil(n / steps_per_epoch),
                      n / recipe_steps, started_s=spent_s)


def replan(plan: BudgetPlan, step: int, elapsed_s: float, step_s: float, tolerance: float) -> BudgetPlan | None:
    """A new plan if, at ``step`` after ``elapsed_s`` seconds of the budget, the measured ``step_s``
    projects an end more than ``tolerance`` (a fraction of the budget) away from it; else None.

    Only the number of steps changes (the step schedules are rebuilt over it; epoch schedules stay).
    """
    costs = dataclasses.replace(plan.costs, step_s=step_s)
    projected = elapsed_s + predicted_seconds(plan.max_steps, plan.steps_per_epoch, costs, from_step=step)
    if abs(projected - plan.budget_s) <= tolerance * plan.budget_s:
        return None
    n = _fit_steps(plan.budget_s - elapsed_s, plan.steps_per_epoch, costs, cap=plan.recipe_steps, from_step=step)
    n = max(n, step + 1)
    if n == plan.max_steps:
        return None
    entry = {"at_step": step, "elapsed_s": round(elapsed_s, 2), "step_s": round(step_s, 4), "max_steps": n}
    return dataclasses.replace(plan, costs=costs, max_steps=n, replans=[*plan.replans, entry])


def _is_epoch_field(name: str) -> bool:
    return name.endswith(("_epochs", "_epoch")) and name != "epochs"


def compressed_overrides(cfg: Any, plan: BudgetPlan) -> list[str]:
    """``key=value`` overrides that compress ``cfg``'s recipe to ``plan``: the step count, the epochs it
    spans, and every schedule written in epochs multiplied by ``plan.scale``. A field typed ``float``
    (DINO's and iBOT's warm-ups and last-layer freeze) keeps the fraction, so a schedule that is 1 %
    of the recipe is 1 % of the budgeted run; a field typed ``int`` (an event that happens at epoch
    boundaries, e.g. ProtoNCE's warm-up before its per-epoch E-steps) is rounded, and one that was at
    least 1 stays at least 1 when the plan has more epochs than it."""
    out = [f"train.max_steps={plan.max_steps}", f"train.epochs={max(plan.epochs, 1)}"]
    if plan.scale >= 1.0:
        return out
    out.append(f"optim.warmup_epochs={cfg.optim.warmup_epochs * plan.scale:.6g}")
    for name, obj_cfg in sorted(cfg.objectives.items()):
        hints = typing.get_type_hints(type(obj_cfg))
        for f in dataclasses.fields(obj_cfg):
            value = getattr(obj_cfg, f.name)
            if not _is_epoch_field(f.name) or value is None or isinstance(value, bool):
                continue
            scaled: float | int = value * plan.scale
            if hints.get(f.name) is float:
                scaled = float(f"{scaled:.6g}")
            elif isinstance(value, int):
                scaled = int(round(scaled))
                if value >= 1 and plan.epochs > value:
                    scaled = max(scaled, 1)
            out.append(f"objectives.{name}.{f.name}={scaled}")
    return out
