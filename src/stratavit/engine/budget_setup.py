"""Set a ``train.budget`` run up before training: calibrate, plan, compress the recipe, or keep a resumed plan.

A fresh run: the first process measures the run's costs (:func:`~stratavit.engine.calibrate.measure_costs`),
plans (:func:`~stratavit.engine.budget.plan_budget`), rebuilds the config with the compressed
schedules (:func:`~stratavit.engine.budget.compressed_overrides`) and writes the plan to
``RUN_DIR/budget.json``; other processes of a multi-process run wait for that file and take the
same plan, so every process trains the same steps. ``config.yaml`` then holds the compressed
config (what really ran). A continued run keeps the plan it was started with (from the checkpoint,
or ``budget.json``) and the time already spent counts against the budget.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from torch.utils.data import DataLoader

from stratavit.config import Config, ConfigError, to_dict
from stratavit.engine.budget import BudgetPlan, compressed_overrides, parse_duration, plan_budget, predicted_seconds
from stratavit.engine.calibrate import measure_costs
from stratavit.engine.callbacks.budget import BudgetWatch
from stratavit.recipe import resolve_config
from stratavit.run_folder import RunFolder, read_json, write_json

BUDGET_FILE = "budget.json"
_WAIT_S = 1800.0


@dataclass
class Budgeted:
    """A budget run's config (compressed), module (built from it) and the callback that watches the plan."""

    cfg: Config
    module: Any
    watch: BudgetWatch


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def _recipe_steps(cfg: Config, steps_per_epoch: int) -> int:
    steps = cfg.train.epochs * steps_per_epoch
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps is not None else steps


def _device(cfg: Config) -> torch.device:
    gpu = cfg.train.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if gpu else torch.device("cpu")


def _wait_for_plan(path: Path, since: float) -> BudgetPlan:
    """The plan the first process writes (a process other than the first, at a fresh start)."""
    deadline = time.monotonic() + _WAIT_S
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_mtime >= since - 5:
            return BudgetPlan.from_dict(read_json(path))
        time.sleep(1.0)
    raise ConfigError(f"train.budget: the first process wrote no plan to {path} in {_WAIT_S:.0f} s; start the run again")


def setup_budget(
    cfg: Config, run: RunFolder, module: Any, loader: DataLoader, resuming: bool, started: float,
    build: Callable[[Config], Any], precision: str,
) -> Budgeted | None:
    """The budget run's pieces, or None without ``train.budget``.

    Args:
        cfg, module, loader: as built for the run (the module is rebuilt from the compressed config).
        resuming: the run continues from a checkpoint (its plan is kept, nothing is measured).
        started: ``time.time()`` when this process started (start-up counts against the budget).
        build: makes the module of a config (seeded here, as the run seeds).
        precision: the run's precision (the calibration trains in it).
    """
    if cfg.train.budget is None:
        return None
    budget_s = parse_duration(cfg.train.budget)
    path = run.root / BUDGET_FILE
    if resuming:
        if not path.exists():
            raise ConfigError(f"{run.root} has train.budget set but no {BUDGET_FILE}; it was not started with a budget: "
                              "continue it without train.budget, or start a new run")
        plan = BudgetPlan.from_dict(read_json(path))  # the checkpoint's own copy replaces it on load
        # the checkpoint's plan and the budget time spent up to it replace these when it loads
        return Budgeted(cfg, module, BudgetWatch(plan, path, cfg.train.budget_tolerance, 0.0, started))
    if _rank() == 0:
        try:
            steps_per_epoch = max(1, len(loader))
        except TypeError:  # a stream of unknown length
            raise ConfigError("train.budget needs to know the epoch's length, and this data streams without one; "
                              "set train.max_steps and train.max_time_s instead") from None
        costs = measure_costs(module, loader, _device(cfg), precision, run.root)
        plan = plan_budget(budget_s, time.time() - started, costs, steps_per_epoch, _recipe_steps(cfg, steps_per_epoch))
        write_json(path, plan.to_dict())
    else:
        plan = _wait_for_plan(path, started)
    compressed = resolve_config(to_dict(cfg), compressed_overrides(cfg, plan))
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    module = build(compressed)
    if _rank() == 0:
        plan.notes = pass_notes(module, plan, int(compressed.train.epochs))
        write_json(path, plan.to_dict())
    return Budgeted(compressed, module, BudgetWatch(plan, path, cfg.train.budget_tolerance, 0.0, started))


def _duration(seconds: float) -> str:
    """``125`` -> ``"3m"`` (whole minutes, rounded up; seconds under a minute as ``"45s"``)."""
    return f"{math.ceil(seconds)}s" if seconds < 60 else f"{math.ceil(seconds / 60)}m"


def pass_notes(module: Any, plan: BudgetPlan, epochs: int) -> list[str]:
    """One line per objective that needs a dataset pass (ProtoNCE's E-step) but gets none in the plan's
    ``epochs``: its warm-up outlasts the budget, so that level never trains as the method says. The line
    names the budget from which the first pass comes and the override that moves it to the first epoch."""
    from stratavit.engine.callbacks.dataset_pass import dataset_pass_objectives

    notes = []
    for name, obj in dataset_pass_objectives(module).items():
        if any(obj.needs_dataset_pass(e, epochs) for e in range(epochs)):
            continue
        longer = ""
        for more in range(epochs + 1, epochs + 200):  # the shortest plan whose epochs include a pass
            if any(obj.needs_dataset_pass(e, more) for e in range(more)):
                steps = (more - 1) * plan.steps_per_epoch + 1
                need = plan.started_s + predicted_seconds(steps, plan.steps_per_epoch, plan.costs)
                longer = f"give train.budget={_duration(need)} or more (about {more} epochs), or "
                break
        notes.append(
            f"train.budget: {name}'s first dataset pass (E-step) comes after its warm-up, and the plan has "
            f"{epochs} epoch(s): it never runs, so {name} trains without its prototypes (instance loss only); "
            f"{longer}set objectives.{name}.warmup_epochs=0 (the first E-step then clusters the untrained "
            "network's features)"
        )
    return notes
