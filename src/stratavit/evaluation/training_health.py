"""Training health, read from a run folder: the loss curve, the collapse indicators, the environment.

What the evaluation report shows about how the backbone was trained: ``metrics.csv`` (loss,
learning rate, the collapse monitor's values, see :mod:`stratavit.engine.callbacks.collapse`), ``config.yaml``
(the monitor's thresholds) and ``environment.json`` (see :mod:`stratavit.provenance`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from stratavit.engine.callbacks.collapse import RANK_FLOOR, RANK_FRACTION, STD_THRESHOLD
from stratavit.evaluation.metrics_csv import read_metrics
from stratavit.evaluation.plotting import new_figure, save_figure
from stratavit.provenance import read_environment
from stratavit.run_folder import RunFolder

__all__ = ["collapse_summary", "collapse_thresholds", "plot_collapse_curve", "plot_loss_curve", "training_health"]

LOSS_PNG = "loss_curve.png"
COLLAPSE_PNG = "collapse_curve.png"


def plot_loss_curve(metrics_csv: Path, out_png: Path) -> Path | None:
    """Plot the training loss (and each ``loss/<name>`` term) against step.

    Args:
        metrics_csv: Lightning-style CSV with columns ``step``, ``epoch``,
            ``loss``, optional ``loss/<name>`` and ``lr`` (or ``lr-*``). Rows
            may be sparse: empty cells are skipped per column.
        out_png: where to write the figure.

    Returns:
        ``out_png``, or ``None`` when the CSV is missing or holds no loss value.
    """
    metrics_csv = Path(metrics_csv)
    if not metrics_csv.is_file():
        return None
    table = read_metrics(metrics_csv)
    columns = table.columns

    loss_cols = [c for c in columns if c == "loss" or c.startswith("loss/")]
    lr_col = "lr" if "lr" in columns else next((c for c in columns if c.startswith("lr-")), None)

    series = table.series
    curves = {c: series(c) for c in loss_cols}
    curves = {c: xy for c, xy in curves.items() if xy[0]}
    if not curves:
        return None

    fig = new_figure()
    ax = fig.add_subplot()
    for col, (xs, ys) in curves.items():
        if col == "loss":
            ax.plot(xs, ys, color="black", linewidth=1.6, label="loss (total)", zorder=3)
        else:
            ax.plot(xs, ys, linewidth=1.0, alpha=0.85, label=col)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()

    if lr_col is not None:
        lr_x, lr_y = series(lr_col)
        if lr_x:
            ax2 = ax.twinx()
            ax2.plot(lr_x, lr_y, color="tab:gray", linestyle=":", linewidth=1.0, label=lr_col)
            ax2.set_ylabel("learning rate")
            ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right", fontsize="small")
    ax.set_title("training loss")
    return save_figure(fig, out_png)


def collapse_summary(metrics_csv: Path) -> dict[str, Any] | None:
    """The collapse monitor's values in a run's ``metrics.csv`` (see :mod:`stratavit.engine.callbacks.collapse`).

    Returns ``None`` when the CSV is missing or has no ``collapse/rankme`` value (runs trained
    before the monitor existed, or with ``train.collapse_monitor=false``); otherwise ``checks``
    (number of logged checks), ``alerts`` (checks below a threshold, ``collapse/alert`` = 1),
    ``first_alert_step``, ``min_rankme`` / ``max_rank`` (min(N, D) of that check),
    ``min_std_norm``, ``last_step``, ``last_rankme`` and ``last_std_norm``.
    """
    series = read_metrics(metrics_csv).series
    steps, ranks = series("collapse/rankme")
    if not ranks:
        return None
    _, fracs = series("collapse/rankme_frac")
    _, stds = series("collapse/std_norm")
    alert_steps = [x for x, y in zip(*series("collapse/alert")) if y > 0]
    i_min = min(range(len(ranks)), key=ranks.__getitem__)
    max_rank = ranks[i_min] / fracs[i_min] if len(fracs) == len(ranks) and fracs[i_min] > 0 else None
    return {
        "checks": len(ranks),
        "alerts": len(alert_steps),
        "first_alert_step": int(alert_steps[0]) if alert_steps else None,
        "min_rankme": ranks[i_min],
        "max_rank": round(max_rank) if max_rank is not None else None,
        "min_std_norm": min(stds) if stds else None,
        "last_step": int(steps[-1]),
        "last_rankme": ranks[-1],
        "last_std_norm": stds[-1] if stds else None,
    }


def collapse_thresholds(run_dir: Path) -> tuple[float, float] | None:
    """``(train.collapse_rank_fraction, train.collapse_std_threshold)`` from ``run_dir/config.yaml``.

    The defaults of :mod:`stratavit.engine.callbacks.collapse` when the config has no such keys; ``None`` when there
    is no readable config.
    """
    try:
        train = (yaml.safe_load(RunFolder(Path(run_dir)).config.read_text()) or {}).get("train") or {}
        return (float(train.get("collapse_rank_fraction", RANK_FRACTION)),
                float(train.get("collapse_std_threshold", STD_THRESHOLD)))
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
        return None


def plot_collapse_curve(
    metrics_csv: Path, out_png: Path, thresholds: tuple[float, float] | None = None
) -> Path | None:
    """Plot the collapse indicators ``collapse/rankme`` and ``collapse/std`` against step.

    Left: RankMe with its maximum min(N, D) dotted; right: the per-dim std of the L2-normalised
    embeddings with the isotropic value 1/√D dotted. Checks the monitor flagged (``collapse/alert``)
    are marked with red crosses; with ``thresholds`` = ``(rank fraction, std × √D threshold)`` (see
    :class:`~stratavit.engine.callbacks.collapse.CollapseMonitor`) the monitor's thresholds are drawn dashed.

    Returns:
        ``out_png``, or ``None`` when the CSV is missing or holds no ``collapse/rankme`` value.
    """
    series = read_metrics(metrics_csv).series
    rank_x, rank_y = series("collapse/rankme")
    if not rank_x:
        return None
    by_step = {k: dict(zip(*series(k))) for k in
               ("collapse/rankme_frac", "collapse/std", "collapse/std_norm", "collapse/alert")}
    alerts = {x for x, y in by_step["collapse/alert"].items() if y > 0}
    fig = new_figure((10.0, 3.8))
    ax_rank, ax_std = fig.subplots(1, 2)
    if thresholds is not None:
        rank_fraction, std_threshold = thresholds
        limits = [lambda m: max(rank_fraction * m, RANK_FLOOR), lambda m: std_threshold * m]
    panels = [
        (ax_rank, (rank_x, rank_y), "collapse/rankme_frac", "RankMe (effective rank)", "max rank min(N, D)"),
        (ax_std, series("collapse/std"), "collapse/std_norm",
         "per-dim std of L2-normalised embeddings", "isotropic 1/√D"),
    ]
    for i, (ax, (xs, ys), norm_key, title, ref_label) in enumerate(panels):
        ax.plot(xs, ys, color="tab:blue", linewidth=1.5, marker="." if len(xs) < 50 else None)
        # the reference (max rank, 1/√D) is value / normalised value of the same check
        refs = [y / by_step[norm_key][x] for x, y in zip(xs, ys) if by_step[norm_key].get(x)]
        if refs:
            ax.axhline(refs[-1], color="tab:gray", linestyle=":", linewidth=1.0, label=f"{ref_label}: {refs[-1]:.3g}")
            if thresholds is not None:
                limit = limits[i](refs[-1])
                ax.axhline(limit, color="tab:red", linestyle="--", linewidth=1.0, label=f"warns below {limit:.3g}")
        flagged = [(x, y) for x, y in zip(xs, ys) if x in alerts]
        if flagged:
            ax.plot(*zip(*flagged), "x", color="tab:red", label="below the monitor's threshold")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("step")
        ax.set_title(title, fontsize="medium")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize="small")
    fig.suptitle("collapse indicators of the teacher's CLS embeddings")
    return save_figure(fig, out_png)


def _environment_line(run_dir: Path) -> str | None:
    """One Markdown line on what the run was trained with, from ``run_dir/environment.json``."""
    sessions = read_environment(run_dir)
    if not sessions:
        return None
    env = sessions[0]
    sv = env.get("stratavit") or {}
    commit = sv.get("commit")
    source = f"stratavit {sv.get('version', '?')}"
    if commit:
        source += f" (commit `{str(commit)[:10]}`{', uncommitted changes' if sv.get('dirty') else ''})"
    packages = ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items() if v)
    cuda = env.get("cuda") or {}
    devices = ", ".join(cuda.get("devices") or []) or "CPU"
    resumes = f"; resumed {len(sessions) - 1} time(s)" if len(sessions) > 1 else ""
    return (
        f"Trained with {source}, Python {(env.get('python') or {}).get('version', '?')}, {packages}; "
        f"{env.get('world_size', '?')} process(es) on {env.get('hostname', '?')} ({devices}); "
        f"seed {env.get('seed')}{resumes}. Details: `environment.json` in the run folder."
    )


def training_health(metrics_csv: Path, out_dir: Path) -> str | None:
    """The "Training health" section: collapse indicators (plot + warning) and the environment."""

    def _fmt3(value: float | None) -> str:
        return "–" if value is None else f"{value:.3f}"

    parts = []
    summary = collapse_summary(metrics_csv)
    if summary is not None:
        if summary["alerts"]:
            max_rank = f" of at most {summary['max_rank']}" if summary["max_rank"] is not None else ""
            parts.append(
                f"> **Warning: possible collapse.** The collapse monitor's thresholds were crossed at "
                f"{summary['alerts']} of {summary['checks']} logged checks (first at step "
                f"{summary['first_alert_step']}); lowest RankMe {summary['min_rankme']:.2f}{max_rank}, lowest "
                f"per-dim std × √D {_fmt3(summary['min_std_norm'])}. The training log has the advice; consider "
                "these features suspect."
            )
        else:
            parts.append(
                f"No sign of collapse: the monitor's thresholds were never crossed in {summary['checks']} logged checks "
                f"(last RankMe {summary['last_rankme']:.2f}, per-dim std × √D {_fmt3(summary['last_std_norm'])} at "
                f"step {summary['last_step']})."
            )
        png = plot_collapse_curve(metrics_csv, out_dir / COLLAPSE_PNG, collapse_thresholds(Path(metrics_csv).parent))
        if png is not None:
            parts.append(f"![collapse indicators]({os.path.relpath(png, out_dir)})")
    env = _environment_line(Path(metrics_csv).parent)
    if env is not None:
        parts.append(env)
    return "## Training health\n\n" + "\n\n".join(parts) if parts else None
