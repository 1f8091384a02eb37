"""Plotting helpers shared by every picture of the evaluation: figures, PNGs, per-block curves.

Figures are bare :class:`matplotlib.figure.Figure` objects (no pyplot, so drawing is safe headless
and in threads). :func:`draw_block_curves` draws the per-block curves of the report's layer curve,
its per-block panels and compare's overlaid plots.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

__all__ = ["Curve", "HLine", "as_cpu_float", "block_series", "draw_block_curves", "finite", "new_figure", "save_figure"]


def new_figure(figsize: tuple[float, float] = (7.0, 4.0)) -> Figure:
    """A bare Figure with constrained layout (renders with Agg, never touches a GUI backend)."""
    return Figure(figsize=figsize, layout="constrained")


def save_figure(fig: Figure, out_png: Path) -> Path:
    """Write ``fig`` to ``out_png`` at 120 dpi (folders created); returns the path."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    return out_png


def finite(v: Any) -> float | None:
    """``float(v)`` when it is a finite number, else ``None``."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def block_series(rows: Any, key: str) -> tuple[list[int], list[float]]:
    """``([block, ...], [value, ...])`` of ``rows`` (``[{"block": i, key: v}, ...]``), sorted by block.

    Rows without ``block`` or without a finite ``key`` are skipped; a block listed twice keeps its
    last value.
    """
    if not isinstance(rows, Sequence) or isinstance(rows, str):
        return [], []
    pts: dict[int, float] = {}
    for r in rows:
        if not isinstance(r, Mapping) or "block" not in r:
            continue
        b, v = finite(r.get("block")), finite(r.get(key))
        if b is not None and v is not None and b == int(b):
            pts[int(b)] = v
    ordered = sorted(pts.items())
    return [p[0] for p in ordered], [p[1] for p in ordered]


@dataclass(frozen=True)
class Curve:
    """One per-block curve: ``xs`` blocks, ``ys`` values, and how it is drawn."""

    label: str
    xs: Sequence[int]
    ys: Sequence[float]
    linestyle: str = "-"
    marker: str = "o"
    color: str | None = None
    linewidth: float = 1.8
    markersize: float | None = None


@dataclass(frozen=True)
class HLine:
    """A horizontal reference line (a baseline's score), labelled ``"label: value"``."""

    label: str
    value: float
    color: str = "tab:gray"
    linestyle: str = "--"
    linewidth: float = 1.0


def draw_block_curves(
    ax: Axes,
    curves: Sequence[Curve],
    hlines: Sequence[HLine] = (),
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    title_size: str | None = None,
    legend_size: str = "small",
    tick_label: Callable[[int], str] | None = None,
    tick_rotation: float = 0,
    max_ticks: int | None = None,
) -> None:
    """Draw per-block ``curves`` and reference ``hlines`` on ``ax``, ticks on the blocks.

    ``tick_label`` names a tick (default: the number); ``max_ticks`` thins the ticks to at most
    about that many.
    """
    blocks: set[int] = set()
    for c in curves:
        ax.plot(c.xs, c.ys, linestyle=c.linestyle, marker=c.marker, color=c.color, linewidth=c.linewidth,
                markersize=c.markersize, label=c.label)
        blocks.update(c.xs)
    for h in hlines:
        ax.axhline(h.value, linestyle=h.linestyle, linewidth=h.linewidth, color=h.color,
                   label=f"{h.label}: {h.value:.1f}")
    ticks = sorted(blocks)
    if max_ticks:
        ticks = ticks[:: max(1, math.ceil(len(ticks) / max_ticks))]
    if tick_label is None:
        ax.set_xticks(ticks)
    else:
        ax.set_xticks(ticks, [tick_label(t) for t in ticks], rotation=tick_rotation)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=legend_size)
    if title_size is None:
        ax.set_title(title)
    else:
        ax.set_title(title, fontsize=title_size)


def as_cpu_float(x: Any) -> Tensor:
    """``x`` (tensor, array, list) as a detached float32 CPU tensor."""
    return torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float32)
