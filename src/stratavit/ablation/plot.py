"""``ablation.png``: per-metric means with their 95 % interval bars, recipes side by side.

One panel per metric family: per-block families (kNN / linear on CLS and patches, dense,
correspondence) as lines over the blocks with interval bars, recipes slightly offset; the others
(throughput, steps, wall time) as grouped bars.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stratavit.ablation.report import Row

__all__ = ["plot_ablation"]

_COLUMNS = 3


def _families(rows: list[Row]) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {}
    for row in rows:
        out.setdefault(row.metric.family, []).append(row)
    return out


def _point(row: Row, recipe: str) -> tuple[float, float]:
    e = row.estimates[recipe]
    return (math.nan if e.mean is None else e.mean), (0.0 if e.half_width is None else e.half_width)


def plot_ablation(path: Path, rows: list[Row], recipes: list[str]) -> Path:
    """Write the figure of ``rows`` (from :func:`stratavit.ablation.report.analyse`) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = _families(rows)
    ncols = min(_COLUMNS, len(families))
    nrows = math.ceil(len(families) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    width = 0.8 / max(1, len(recipes))
    for ax, (family, members) in zip(axes.flat, families.items()):
        per_block = all(r.metric.block is not None for r in members) and len(members) > 1
        for i, recipe in enumerate(recipes):
            means, halves = zip(*(_point(r, recipe) for r in members))
            if per_block:
                xs = [r.metric.block + (i - (len(recipes) - 1) / 2) * 0.08 for r in members]  # type: ignore[operator]
                ax.errorbar(xs, means, yerr=halves, marker="o", capsize=3, label=recipe)
            else:
                xs = [j + (i - (len(recipes) - 1) / 2) * width for j in range(len(members))]
                ax.bar(xs, means, width=width, yerr=halves, capsize=3, label=recipe)
        if per_block:
            ax.set_xlabel("block")
            ax.set_xticks([r.metric.block for r in members])
        elif len(members) == 1:  # one bar per recipe: name them
            ax.set_xticks([(i - (len(recipes) - 1) / 2) * width for i in range(len(recipes))])
            ax.set_xticklabels(recipes, fontsize=8)
        else:
            ax.set_xticks(range(len(members)))
            ax.set_xticklabels([f"block {r.metric.block}" for r in members])
        ax.set_title(members[0].metric.family_label, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(families):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("mean over seeds, bars: 95 % t interval", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
