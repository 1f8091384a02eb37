"""``stratavit ablate``: every recipe × seed trained under the same budget, evaluated the same way, reported.

:func:`ablate` checks the whole plan before anything runs (:mod:`stratavit.ablation.preflight`),
records it in ``ABL/ablation_plan.json`` (:mod:`stratavit.ablation.folder`), then works through the
runs in order, one line per run started and finished with the elapsed time and an ETA:

* a run is **trained** when its folder holds ``run.json`` and ``backbone.safetensors``; otherwise
  :func:`~stratavit.engine.train.pretrain` runs into it, continuing from ``checkpoints/last.ckpt``
  when a killed attempt left one;
* a run is **evaluated** when its ``eval/results.json`` carries this plan's fingerprint and is newer
  than the backbone; otherwise :func:`~stratavit.evaluation.run.evaluate` runs with the plan's options.

A run that fails is recorded (one line in the state file and the report, the traceback in
``RUN/ablate_error.txt``) and the others go on; re-running the same command retries it.
Finally :func:`stratavit.ablation.report.write_report` writes the table, CSV, JSON and plot.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from stratavit.ablation.backbone import shared_backbone_overrides
from stratavit.ablation.collect import collect, is_evaluated, is_trained, run_notes
from stratavit.ablation.errors import AblationError
from stratavit.ablation.folder import State, open_state
from stratavit.ablation.plan import Plan, run_label
from stratavit.ablation.preflight import preflight
from stratavit.ablation.report import Report, write_report
from stratavit.backbones.errors import ExportError
from stratavit.config import ConfigError
from stratavit.data.errors import DataError
from stratavit.engine.nonfinite import NonFiniteLossError
from stratavit.engine.train import pretrain
from stratavit.evaluation.errors import EvaluationError
from stratavit.evaluation.options import Options
from stratavit.evaluation.run import evaluate
from stratavit.run_folder import RunFolder

__all__ = ["ERROR_FILE", "ablate"]

ERROR_FILE = "ablate_error.txt"


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


@dataclass
class _Progress:
    """One line per run started / finished: ``[2/6] mcvt seed 1: ...  (elapsed 3:10, ETA 6:20)``."""

    total: int
    todo: int
    echo: Callable[[str], None]
    started: float = 0.0
    worked: float = 0.0
    done: int = 0

    def line(self, index: int, recipe: str, seed: int, text: str) -> None:
        elapsed = time.time() - self.started
        eta = _clock(self.worked / self.done * (self.todo - self.done)) if self.done else "–"
        self.echo(f"[{index}/{self.total}] {run_label(recipe)} seed {seed}: {text}  (elapsed {_clock(elapsed)}, ETA {eta})")


_USER_ERRORS = (ConfigError, DataError, EvaluationError, ExportError, NonFiniteLossError, FileNotFoundError)


def _one_line(error: BaseException) -> str:
    """The error's first line; prefixed by its type unless it is one of stratavit's own messages."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text if isinstance(error, _USER_ERRORS) and text else f"{type(error).__name__}: {text}".rstrip(": ")


def _train(plan: Plan, recipe: str, seed: int, run_dir: Path) -> float:
    began = time.time()
    pretrain(recipe, plan.data, run_dir, plan.train_overrides(seed))
    return round(time.time() - began, 1)


def _evaluate(plan: Plan, options: Options, recipe: str, seed: int, run_dir: Path) -> float:
    began = time.time()
    meta = {"ablation": {"plan": plan.fingerprint(), "recipe": recipe, "seed": seed}}
    evaluate(run_dir, plan.eval_train, plan.eval_test, None, options, meta=meta)
    return round(time.time() - began, 1)


def _run_one(state: State, options: Options, recipe: str, seed: int, index: int, progress: _Progress) -> None:
    """Train (or continue) and evaluate one run; a failure is recorded, printed and not raised."""
    plan, key = state.plan, f"{run_label(recipe)}/seed{seed}"
    run_dir = state.folder.run_dir(recipe, seed)
    stage, began = "training", time.time()
    try:
        if not is_trained(run_dir):
            resumed = RunFolder(run_dir).checkpoint.exists()
            progress.line(index, recipe, seed, f"{'continuing' if resumed else 'training'} ({plan.budget_label})")
            seconds = _train(plan, recipe, seed, run_dir)
            state.record(key, status="trained", train_s=seconds, steps=RunFolder(run_dir).read_summary().get("global_step"))
        stage = "evaluation"
        progress.line(index, recipe, seed, "evaluating")
        state.record(key, eval_s=_evaluate(plan, options, recipe, seed, run_dir))
        state.record(key, status="evaluated", error=None, stage=None)
        (run_dir / ERROR_FILE).unlink(missing_ok=True)
        progress.done += 1
        progress.worked += time.time() - began
        progress.line(index, recipe, seed, f"done in {_clock(time.time() - began)}")
    except Exception as e:  # one run's failure must not stop the others
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / ERROR_FILE).write_text(traceback.format_exc())
        state.record(key, status="failed", stage=stage, error=_one_line(e))
        progress.done += 1
        progress.worked += time.time() - began
        progress.line(index, recipe, seed, f"failed in {stage}: {_one_line(e)} (traceback: {run_dir / ERROR_FILE})")


def ablate(
    plan: Plan, out: str | Path, *, base: str | None = None, overwrite: bool = False,
    echo: Callable[[str], None] = print,
) -> Report:
    """Run (or continue) the ablation ``plan`` in ``out`` and write its report; returns the report.

    ``base``: the recipe the others are compared with (default: the last recipe of the plan).
    """
    plan.check()
    base = base if base is not None else plan.recipes[-1]
    if base not in plan.recipes:
        raise AblationError(f"--base {base}: not one of the recipes ({', '.join(plan.recipes)}); name one of them")
    shared, line = shared_backbone_overrides(plan, base)
    if shared:  # small images: the base's preset backbone for every recipe (levels compared, not backbones)
        plan = dataclasses.replace(plan, overrides=[*plan.overrides, *shared])
        echo(line)
    options = preflight(plan)
    state = open_state(Path(out), plan, overwrite)
    fingerprint = plan.fingerprint()
    grid = [(r, s) for r in plan.recipes for s in plan.seeds]
    pending = [not (is_trained(state.folder.run_dir(r, s)) and is_evaluated(state.folder.run_dir(r, s), fingerprint))
               for r, s in grid]
    progress = _Progress(len(grid), sum(pending), echo, started=time.time())
    echo(f"ablation: {', '.join(map(run_label, plan.recipes))} × seeds {', '.join(map(str, plan.seeds))} at "
         f"{plan.budget_label}, base {run_label(base)}; {sum(pending)} of {len(grid)} runs to do, in {out}")
    for index, ((recipe, seed), todo) in enumerate(zip(grid, pending), start=1):
        if todo:
            _run_one(state, options, recipe, seed, index, progress)
            continue
        progress.line(index, recipe, seed, "trained and evaluated earlier, skipped")
        key = f"{run_label(recipe)}/seed{seed}"
        if state.runs.get(key, {}).get("status") != "evaluated":  # e.g. finished by a run of an older version
            state.record(key, status="evaluated", error=None, stage=None)
    values = collect(state.folder, plan)
    return write_report(state.folder, plan, base, values, state.runs, run_notes(state.folder, plan))

