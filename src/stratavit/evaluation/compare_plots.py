"""The plots of ``stratavit compare``: overlaid per-block curves, headline bars, loss, throughput."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stratavit.evaluation.plotting import (
    Curve,
    block_series,
    draw_block_curves,
    new_figure,
    save_figure,
)
from stratavit.evaluation.tables import dig, fmt

__all__ = ["color", "plot_headline", "plot_loss", "plot_per_block", "plot_throughput"]


def color(i: int) -> str:
    return f"C{i % 10}"


def plot_per_block(
    runs: Sequence[Any],
    labels: Sequence[str],
    out_png: Path,
    curves: Sequence[tuple[str, tuple[str, ...], str]],
    title: str,
    ylabel: str,
) -> Path | None:
    """Overlaid per-block curves, one colour per run (``runs``: objects with ``results``).

    ``curves``: ``(legend suffix, key path to the per-block list, value key)``; the first is drawn
    solid, the others dashed/dotted in the same colour.
    """
    styles = ("-", "--", ":", "-.")
    drawn = []
    for i, (run, label) in enumerate(zip(runs, labels)):
        for j, (suffix, path, key) in enumerate(curves):
            xs, ys = block_series(dig(run.results, *path), key)
            if xs:
                drawn.append(Curve(
                    f"{label}{suffix}", xs, ys, linestyle=styles[j % len(styles)],
                    marker="o" if j == 0 else "s", color=color(i), linewidth=1.8 if j == 0 else 1.2, markersize=4,
                ))
    if not drawn:
        return None
    fig = new_figure()
    draw_block_curves(fig.add_subplot(), drawn, xlabel="transformer block", ylabel=ylabel, title=title,
                      tick_label=str)
    return save_figure(fig, out_png)


def plot_headline(rows: Sequence[Mapping[str, Any]], bars: Sequence[tuple[str, str]], out_png: Path) -> Path | None:
    """Grouped bars of the ``bars`` columns ``(column, legend name)`` per run (those some run has)."""
    bars = [(col, name) for col, name in bars if any(r[col] is not None for r in rows)]
    if not bars:
        return None
    n_runs, n_bars = len(rows), len(bars)
    width = 0.8 / n_bars
    fig = new_figure((max(6.0, 1.2 + 1.4 * n_runs), 4.2))
    ax = fig.add_subplot()
    for j, (col, name) in enumerate(bars):
        xs = [i + (j - (n_bars - 1) / 2) * width for i in range(n_runs)]
        heights = [r[col] if r[col] is not None else 0.0 for r in rows]
        container = ax.bar(xs, heights, width=width * 0.95, color=color(j), label=name)
        ax.bar_label(
            container, labels=[fmt(r[col]) if r[col] is not None else "–" for r in rows],
            fontsize="x-small", padding=1,
        )
    ax.set_xticks(range(n_runs), [r["label"] for r in rows], rotation=20 if n_runs > 3 else 0)
    top = max((r[col] for r in rows for col, _ in bars if r[col] is not None), default=0.0)
    ax.set_ylim(0.0, max(1.0, top * 1.12))
    ax.set_ylabel("%")
    ax.grid(True, axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=min(n_bars, 2), fontsize="small")
    ax.set_title("headline metrics per run")
    return save_figure(fig, out_png)


def plot_loss(runs: Sequence[Any], labels: Sequence[str], out_png: Path) -> Path | None:
    if not any(run.loss[0] for run in runs):
        return None
    fig = new_figure()
    ax = fig.add_subplot()
    for i, (run, label) in enumerate(zip(runs, labels)):
        xs, ys = run.loss
        if xs:
            ax.plot(xs, ys, color=color(i), linewidth=1.4, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (total)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    ax.set_title("training loss (total)")
    return save_figure(fig, out_png)


def plot_throughput(rows: Sequence[Mapping[str, Any]], out_png: Path) -> Path | None:
    panels = [
        (col, name) for col, name in (("images_per_s", "images / s"), ("wall_time_s", "wall time (s)"))
        if any(r[col] is not None for r in rows)
    ]
    if not panels:
        return None
    n_runs = len(rows)
    fig = new_figure((max(6.0, 2.0 + 1.6 * n_runs * len(panels)), 4.0))
    for k, (col, name) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        heights = [r[col] if r[col] is not None else 0.0 for r in rows]
        container = ax.bar(range(n_runs), heights, color=[color(i) for i in range(n_runs)])
        ax.bar_label(
            container, labels=[fmt(r[col]) if r[col] is not None else "–" for r in rows],
            fontsize="x-small", padding=1,
        )
        ax.set_xticks(range(n_runs), [r["label"] for r in rows], rotation=20 if n_runs > 3 else 0)
        ax.set_ylabel(name)
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_title(name)
    return save_figure(fig, out_png)
