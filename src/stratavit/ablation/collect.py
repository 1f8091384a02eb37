"""Which runs of an ablation are done, and the numbers they hold: ``{metric: {recipe: {seed: value}}}``."""

from __future__ import annotations

from pathlib import Path

from stratavit.ablation.folder import AblationFolder
from stratavit.ablation.metrics import run_metrics
from stratavit.ablation.plan import Plan, run_label
from stratavit.run_folder import EvalFolder, RunFolder, read_json

__all__ = ["Values", "collect", "is_evaluated", "is_trained", "run_notes"]

Values = dict[str, dict[str, dict[int, float]]]
"""``{metric key: {recipe label: {seed: value}}}``, metrics in report order."""


def is_trained(run_dir: Path) -> bool:
    """The run finished: ``pretrain`` wrote its summary and the backbone."""
    run = RunFolder(run_dir)
    return run.summary.exists() and run.backbone.exists()


def is_evaluated(run_dir: Path, fingerprint: str) -> bool:
    """The run's ``eval/results.json`` is the plan's evaluation (``fingerprint``) of its current backbone."""
    run = RunFolder(run_dir)
    results = EvalFolder(run.eval_dir).results
    if not results.exists() or not run.backbone.exists():
        return False
    try:
        mark = (read_json(results).get("meta") or {}).get("ablation") or {}
    except ValueError:  # cut short by a kill
        return False
    return mark.get("plan") == fingerprint and results.stat().st_mtime_ns >= run.backbone.stat().st_mtime_ns


def collect(folder: AblationFolder, plan: Plan) -> Values:
    """The metrics of every finished run of ``plan`` in ``folder``: training numbers from each trained
    run's ``run.json``, evaluation numbers from each run evaluated under this plan."""
    fingerprint = plan.fingerprint()
    values: Values = {}
    for recipe in plan.recipes:
        for seed in plan.seeds:
            run_dir = folder.run_dir(recipe, seed)
            if not is_trained(run_dir):
                continue
            results = read_json(EvalFolder(RunFolder(run_dir).eval_dir).results) if is_evaluated(run_dir, fingerprint) else None
            for key, value in run_metrics(results, RunFolder(run_dir).read_summary()).items():
                values.setdefault(key, {}).setdefault(run_label(recipe), {})[seed] = value
    evaluation = {k: v for k, v in values.items() if not k.startswith("train.")}
    return {**evaluation, **{k: v for k, v in values.items() if k.startswith("train.")}}


def run_notes(folder: AblationFolder, plan: Plan) -> dict[str, list[str]]:
    """``{note: ["recipe/seed0", ...]}``: what the trained runs' budget plans flagged (``run.json``
    ``budget.notes``, e.g. an E-step the budget never reached), with the runs each note applies to."""
    notes: dict[str, list[str]] = {}
    for recipe in plan.recipes:
        for seed in plan.seeds:
            run_dir = folder.run_dir(recipe, seed)
            if not is_trained(run_dir):
                continue
            summary = RunFolder(run_dir).read_summary() or {}
            for note in (summary.get("budget") or {}).get("notes") or []:
                notes.setdefault(str(note), []).append(f"{run_label(recipe)}/seed{seed}")
    return notes
