"""The report's detection picture: predicted boxes (score above a threshold) against the true boxes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.patches import Rectangle

from stratavit.evaluation.plotting import as_cpu_float, new_figure, save_figure

__all__ = ["plot_detections"]


def plot_detections(examples: Sequence[dict[str, Any]], categories: Sequence[str], out_png: Path, *,
                    threshold: float) -> Path:
    """One panel per example: the image, true boxes (green, solid) and predictions with score >= ``threshold``
    (red, dashed, "name score").

    Args:
        examples: dicts with ``image`` ``(3, S, S)`` in ``[0, 1]``, ``truth`` ``(K, 4)`` and ``boxes`` ``(D, 4)``
            (x0, y0, x1, y1 in the image's pixels), ``scores`` ``(D,)``, ``labels`` ``(D,)`` and ``truth_labels``
            ``(K,)`` (1-based indices into ``categories``).
    """
    n = max(1, len(examples))
    fig = new_figure((2.6 * n, 2.9))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, ex in zip(axes, examples):
        ax.imshow(as_cpu_float(ex["image"]).permute(1, 2, 0).clamp(0, 1).numpy())
        for (x0, y0, x1, y1) in ex["truth"].tolist():
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.8))
        shown = 0
        for (x0, y0, x1, y1), s, c in zip(ex["boxes"].tolist(), ex["scores"].tolist(), ex["labels"].tolist()):
            if s < threshold:
                continue
            shown += 1
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=1.4,
                                   linestyle="--"))
            name = categories[int(c) - 1] if 0 < int(c) <= len(categories) else str(c)
            ax.text(x0, y0, f"{name} {s:.2f}", color="white", fontsize=6, va="bottom",
                    bbox={"facecolor": "red", "alpha": 0.6, "pad": 0.5, "linewidth": 0})
        ax.set_title(f"{len(ex['truth'])} true, {shown} predicted", fontsize="small")
        ax.axis("off")
    for ax in axes[len(examples):]:
        ax.axis("off")
    return save_figure(fig, out_png)
