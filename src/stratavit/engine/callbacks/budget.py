"""``train.budget`` while training: watch the pace, re-plan when it drifts, keep the plan in the checkpoint.

The plan (:class:`~stratavit.engine.budget.BudgetPlan`) was made before training from measured
costs. Every ``check_every`` steps the first process compares the pace so far (seconds per step,
the planned per-epoch costs taken out) with the plan; if the projected end misses the budget by
more than ``tolerance`` (a fraction of it), it re-plans the number of steps
(:func:`~stratavit.engine.budget.replan`), all processes take that decision (a broadcast), and the
trainer's step limit and the module's step schedules (lr, weight decay, EMA momentum) are rebuilt
over the new total. The plan with its re-plans is saved in every checkpoint, so a resumed run
keeps it, and written to ``RUN_DIR/budget.json`` for the reader.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning as L

from stratavit.engine.budget import BudgetPlan, replan
from stratavit.run_folder import write_json

BUDGET_PLAN = "budget_plan"
"""Checkpoint key of the plan (a dict, :meth:`BudgetPlan.to_dict`)."""


def _dataset_pass_seconds(trainer: L.Trainer) -> float:
    """Seconds this process spent in dataset passes so far (the callback that runs them counts them)."""
    return float(sum(getattr(cb, "seconds", 0.0) for cb in trainer.callbacks  # type: ignore[attr-defined]
                     if getattr(cb, "provides_dataset_pass", False)))


class BudgetWatch(L.Callback):
    """Keeps a run inside its budget (see the module docstring).

    Args:
        plan: the plan made before training (a resumed run's comes from its checkpoint instead).
        path: where the plan is written for the reader (``RUN_DIR/budget.json``).
        tolerance: re-plan when the projected end misses the budget by more than this fraction.
        spent_before_s: seconds of the budget the earlier sessions of a continued run used.
        started: ``time.time()`` when this process started (its start-up and calibration count).
    """

    def __init__(
        self, plan: BudgetPlan, path: Path, tolerance: float = 0.05, spent_before_s: float = 0.0,
        started: float | None = None,
    ) -> None:
        self.plan = plan
        self.path = Path(path)
        self.tolerance = tolerance
        self.spent_before_s = spent_before_s
        self.started = time.time() if started is None else started
        self.check_every = max(5, plan.max_steps // 25)
        self._fit_start = time.monotonic()
        self._start_step = 0

    def elapsed_s(self) -> float:
        """Seconds of the budget used so far (earlier sessions, then this process since it started)."""
        return self.spent_before_s + (time.time() - self.started)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(trainer, pl_module)  # the checkpoint's plan (restored before this hook) or the new one

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the pace is measured from here: a continued run's step counter is restored only after on_fit_start
        self._fit_start = time.monotonic()
        self._start_step = int(trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        done = step - self._start_step
        if done < self.check_every or done % self.check_every or step >= self.plan.max_steps:
            return
        new = None
        if trainer.is_global_zero:
            spent = time.monotonic() - self._fit_start
            epochs = math.ceil(step / self.plan.steps_per_epoch) - self._start_step // self.plan.steps_per_epoch
            costs = self.plan.costs
            # the epochs' saves as planned, the dataset passes as measured (an objective's warm-up has none)
            other = epochs * (costs.epoch_s - costs.pass_s) + _dataset_pass_seconds(trainer)
            step_s = max(spent - other, 1e-6) / done
            new = replan(self.plan, step, self.elapsed_s(), step_s, self.tolerance)
        new = trainer.strategy.broadcast(new, src=0)
        if new is not None:
            self.plan = new
            self._apply(trainer, pl_module)

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Make the trainer stop after ``plan.max_steps`` and lay the step schedules over them."""
        n = self.plan.max_steps
        trainer.fit_loop.epoch_loop.max_steps = n
        trainer.fit_loop.max_epochs = max(int(trainer.fit_loop.max_epochs or 0), math.ceil(n / self.plan.steps_per_epoch))
        if hasattr(pl_module, "set_total_steps"):
            pl_module.set_total_steps(n)
        for cb in trainer.callbacks:  # type: ignore[attr-defined]  # e.g. LogEndSteps, which logs the last step
            if cb is not self and hasattr(cb, "planned_steps") and getattr(cb, "planned_steps", None) is not None:
                cb.planned_steps = n
        if trainer.is_global_zero:
            write_json(self.path, self.plan.to_dict())

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[BUDGET_PLAN] = {**self.plan.to_dict(), "elapsed_s": self.elapsed_s()}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """A continued run keeps the plan and counts the budget time that led to the checkpoint (time
        spent after it, lost to a crash, is not counted: those steps are redone)."""
        if BUDGET_PLAN in checkpoint:
            saved = dict(checkpoint[BUDGET_PLAN])
            self.spent_before_s = float(saved.pop("elapsed_s", self.spent_before_s))
            self.plan = BudgetPlan.from_dict(saved)
