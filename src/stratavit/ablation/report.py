"""The ablation's outputs: ``ablation.md`` (one table, rows metrics, columns recipes, cells
``mean ± half-width`` and the verdict vs the base, one headline sentence per recipe),
``ablation.csv`` (long form: recipe, seed, metric, value), ``ablation.json`` and ``ablation.png``."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stratavit.ablation.collect import Values
from stratavit.ablation.folder import AblationFolder
from stratavit.ablation.metrics import EVALUATION, Metric, metric
from stratavit.ablation.plan import Plan, run_label
from stratavit.ablation.plot import plot_ablation
from stratavit.ablation.stats import IDENTICAL, LEVEL, Comparison, Estimate, compare, estimate, t_factor
from stratavit.evaluation.tables import md_escape, md_table
from stratavit.run_folder import write_json

__all__ = ["RULE", "Report", "Row", "analyse", "headline", "write_report"]

RULE = (
    "Each cell is the mean over seeds ± the half-width of its 95 % Student t interval (t quantile with n − 1 "
    "degrees of freedom; n = seeds with a value). A recipe is **better** (**worse**) than the base on a metric "
    "when the 95 % interval of its difference to the base lies above (below) 0, else **inconclusive**: a "
    "paired comparison (t interval of the per-seed differences) when both have values for the same seeds, "
    "else Welch's interval; with 1 seed every verdict is *inconclusive (1 seed)*. Every evaluation metric is "
    "higher-is-better; training rows (throughput, steps, wall time) say *higher* / *lower* and do not count "
    "in the headline. Each verdict is its own 95 % test: across many metrics, about 1 in 20 verdicts on "
    "metrics where the recipes do not differ comes out better or worse by chance."
)


@dataclass
class Row:
    """One metric: each recipe's estimate, values by seed, and its comparison with the base."""

    metric: Metric
    values: dict[str, dict[int, float]]
    estimates: dict[str, Estimate]
    comparisons: dict[str, Comparison]


@dataclass
class Report:
    """What :func:`write_report` wrote: the paths, the headline sentences, and the runs that failed."""

    md: Path
    csv: Path
    json: Path
    png: Path | None
    headlines: list[str]
    failed: list[str] = field(default_factory=list)


def analyse(values: Values, recipes: list[str], base: str, level: float = LEVEL) -> list[Row]:
    """Estimates and comparisons with ``base`` (a recipe label) for every metric of ``values``."""
    rows = []
    for key, by_recipe in values.items():
        m = metric(key)
        per = {r: by_recipe.get(r, {}) for r in recipes}
        words = ("better", "worse") if m.group == EVALUATION else ("higher", "lower")
        rows.append(Row(
            m, per, {r: estimate([v for _, v in sorted(per[r].items())], level) for r in recipes},
            {r: compare(per[r], per[base], higher_is_better=m.higher_is_better, level=level, words=words)
             for r in recipes if r != base},
        ))
    return rows


def headline(rows: list[Row], recipe: str, base: str, plan: Plan) -> str:
    """``mcvt vs mocov3 at 10 min × 3 seeds: better on 2 metrics, worse on 1, inconclusive on 9``."""
    verdicts = [row.comparisons[recipe].verdict for row in rows if row.metric.group == EVALUATION]
    better, worse = verdicts.count("better"), verdicts.count("worse")
    unsure = sum(v.startswith("inconclusive") for v in verdicts)
    missing = len(verdicts) - better - worse - unsure
    seeds = f"{len(plan.seeds)} seed{'s' if len(plan.seeds) != 1 else ''}"
    text = (f"{recipe} vs {base} at {plan.budget_label} × {seeds}: better on {better} metric{'s' if better != 1 else ''}, "
            f"worse on {worse}, inconclusive on {unsure}")
    if len(plan.seeds) == 1 and verdicts:
        text += " (1 seed: no interval)"
    return text + (f", no data on {missing}" if missing else "")


def _num(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _cell(row: Row, recipe: str, base: str, planned: int) -> str:
    e = row.estimates[recipe]
    if e.mean is None:
        return "–"
    text = _num(e.mean) + (f" ± {_num(e.half_width)}" if e.half_width is not None else "")
    if e.n < planned:
        text += f" (n={e.n})"
    if recipe != base:
        c = row.comparisons[recipe]
        diff = f" (Δ {c.diff:+.2f}" + (f" ± {c.half_width:.2f}" if c.half_width is not None else "") + ")" \
            if c.diff is not None and c.verdict != IDENTICAL else ""
        text += f" · **{c.verdict}**{diff}" if c.verdict in ("better", "worse") else f" · {c.verdict}{diff}"
    return text


def _few_seeds(n: int) -> list[str]:
    if n >= 3:
        return []
    why = "no interval and no verdict" if n == 1 else f"the t factor is {t_factor(n):.1f}, so only large differences are decisive"
    return ["", f"*With {n} seed{'s' if n != 1 else ''} {why}; 3 to 5 seeds are the usual minimum.*"]


def _markdown(plan: Plan, base: str, rows: list[Row], headlines: list[str], runs: Mapping[str, Any],
              notes: Mapping[str, list[str]] | None = None) -> str:
    labels = [run_label(r) for r in plan.recipes]
    how = f"`--budget {plan.budget}` (equal wall time)" if plan.budget is not None else \
        f"`--steps {plan.steps}` (equal optimiser steps)"
    lines = [
        f"# Equal-budget ablation: {', '.join(labels)}", "",
        f"Each recipe trained with {how} × seeds {', '.join(map(str, plan.seeds))} on `{plan.data}`"
        + (f" with `{' '.join(plan.overrides)}`" if plan.overrides else "")
        + f"; every run evaluated the same way on `{plan.eval_train}` / `{plan.eval_test}`. Base: **{base}**.", "",
        *[f"**{h}.**  " for h in headlines], *_few_seeds(len(plan.seeds)), "",
        md_table(["metric", *[f"{r} (base)" if r == base else r for r in labels]],
                 [[md_escape(row.metric.label), *[md_escape(_cell(row, r, base, len(plan.seeds))) for r in labels]]
                  for row in rows]) if rows else "No run has finished yet.",
        *(["", "![per-metric means with 95 % intervals](ablation.png)"] if rows else []), "", f"*Rule.* {RULE}",
    ]
    if notes:
        lines += ["", "## What the budget did not fit", "",
                  "The runs' own plans flagged these; read the rows of these recipes with them in mind.", ""]
        lines += [f"- {md_escape(note)} ({', '.join(who)})" for note, who in notes.items()]
    failed = {k: v for k, v in runs.items() if v.get("status") == "failed"}
    if failed:
        lines += ["", "## Failed runs", "", "Re-run the same command to retry them.", ""]
        lines += [f"- `{k}` failed in {v.get('stage')}: {md_escape(v.get('error'))}" for k, v in sorted(failed.items())]
    return "\n".join(lines) + "\n"


def _json(plan: Plan, base: str, rows: list[Row], headlines: list[str], runs: Mapping[str, Any],
          notes: Mapping[str, list[str]] | None = None) -> dict[str, Any]:
    def est(e: Estimate, vals: Mapping[int, float]) -> dict[str, Any]:
        return {"n": e.n, "mean": e.mean, "sd": e.sd, "half_width": e.half_width, "low": e.low, "high": e.high,
                "values": {str(s): v for s, v in sorted(vals.items())}}

    def cmp(c: Comparison) -> dict[str, Any]:
        return {"verdict": c.verdict, "test": c.test, "diff": c.diff, "half_width": c.half_width,
                "low": c.low, "high": c.high, "df": c.df}

    return {
        "plan": plan.to_dict(), "base": base, "level": LEVEL, "rule": RULE.replace("**", "").replace("*", ""),
        "headlines": headlines,
        "metrics": [{"metric": row.metric.key, "label": row.metric.label, "group": row.metric.group,
                     "higher_is_better": row.metric.higher_is_better,
                     "recipes": {r: est(row.estimates[r], row.values[r]) for r in row.estimates},
                     "vs_base": {r: cmp(c) for r, c in row.comparisons.items()}} for row in rows],
        "runs": dict(runs),
        "notes": dict(notes or {}),
    }


def write_report(folder: AblationFolder, plan: Plan, base: str, values: Values, runs: Mapping[str, Any],
                 notes: Mapping[str, list[str]] | None = None) -> Report:
    """Write ``ablation.{md,csv,json,png}`` into ``folder`` from the collected ``values`` (``notes``: what
    the runs' budget plans flagged, :func:`~stratavit.ablation.collect.run_notes`)."""
    labels, base_label = [run_label(r) for r in plan.recipes], run_label(base)
    rows = analyse(values, labels, base_label)
    headlines = [headline(rows, r, base_label, plan) for r in labels if r != base_label]
    with folder.output("csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["recipe", "seed", "metric", "value"])
        for row in rows:
            for recipe in labels:
                for seed, value in sorted(row.values[recipe].items()):
                    w.writerow([recipe, seed, row.metric.key, value])
    write_json(folder.output("json"), _json(plan, base_label, rows, headlines, runs, notes))
    png = plot_ablation(folder.output("png"), rows, labels) if rows else None
    folder.output("md").write_text(_markdown(plan, base_label, rows, headlines, runs, notes))
    failed = sorted(k for k, v in runs.items() if v.get("status") == "failed")
    return Report(folder.output("md"), folder.output("csv"), folder.output("json"), png, headlines, failed)
