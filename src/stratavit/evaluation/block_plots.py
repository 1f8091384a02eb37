"""The report's per-block pictures: the kNN layer curve and the per-block panels.

Both read an evaluation's ``results`` (the ``results.json`` layout) and draw with
:func:`stratavit.evaluation.plotting.draw_block_curves`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stratavit.evaluation.plotting import (
    Curve,
    HLine,
    block_series,
    draw_block_curves,
    finite,
    new_figure,
    save_figure,
)
from stratavit.evaluation.tables import dig

__all__ = ["PANELS", "plot_block_curve", "plot_block_panels"]


def plot_block_curve(
    layers: list[dict],
    out_png: Path,
    *,
    key: str = "knn_top1",
    baselines: dict[str, float] | None = None,
    title: str = "accuracy per transformer block",
    extra_curves: dict[str, list[dict]] | None = None,
) -> Path:
    """Plot a per-block accuracy curve.

    Args:
        layers: ``[{"block": i (1-based), key: accuracy %, ...}, ...]``; entries
            without ``key`` are skipped.
        out_png: where to write the figure.
        key: which per-layer metric to plot.
        baselines: ``{label: accuracy %}`` drawn as horizontal dashed lines.
        title: figure title.
        extra_curves: ``{label: layers}`` further per-block curves in the same
            format (e.g. the randomly initialised backbone), drawn dashed.

    Returns:
        ``out_png``.
    """
    curves = [Curve(f"pre-trained ({key})", *block_series(layers, key), color="tab:blue")]
    for i, (label, rows) in enumerate((extra_curves or {}).items()):
        curves.append(Curve(label, *block_series(rows, key), linestyle="--", marker="s", color=f"C{i + 3}",
                            linewidth=1.2))
    hlines = [HLine(label, float(value), color=f"C{i + 1}") for i, (label, value) in enumerate((baselines or {}).items())]
    fig = new_figure()
    ticks = {x for c in curves for x in c.xs}
    draw_block_curves(
        fig.add_subplot(), curves, hlines, xlabel="transformer block",
        ylabel=f"{key} (%)" if not key.endswith("top1") else "top-1 accuracy (%)", title=title,
        tick_label=lambda t: f"block {t}", tick_rotation=45 if len(ticks) > 6 else 0,
    )
    return save_figure(fig, out_png)


# (title, y label, [(curve label or None for the global label, part of results or None, key), ...])
PANELS: list[tuple[str, str, list[tuple[str | None, str | None, str]]]] = [
    ("kNN top-1", "top-1 (%)", [(None, None, "knn_top1"), ("mean patch", None, "knn_top1_patch")]),
    ("linear top-1", "top-1 (%)", [(None, None, "linear_top1"), ("mean patch", None, "linear_top1_patch")]),
    ("correspondence top-1", "top-1 (%)", [("patch NN", "correspondence", "top1")]),
    ("dense mIoU", "mIoU (%)", [("mIoU", "dense", "miou")]),
]
"""The panels of :func:`plot_block_panels`; an evaluation adds its own (see ``Evaluation.panels``)."""


def _layers_of(results: Any, part: str | None) -> Any:
    return results.get("layers") if part is None else dig(results, part, "layers")


def plot_block_panels(
    results: Mapping[str, Any],
    out_png: Path,
    *,
    unit: str = "transformer block",
    global_label: str = "CLS",
    panels: list[tuple[str, str, list[tuple[str | None, str | None, str]]]] | None = None,
) -> Path | None:
    """Up to four panels (more with ``panels``) of per-block scores from an evaluation ``results`` dict.

    ``unit`` names the x axis and ``global_label`` the ``knn_top1`` / ``linear_top1`` curves (a CNN:
    ``"CNN stage"`` and ``"global avg pool"``).

    Panels (each drawn only when it has data): kNN top-1 (CLS ``knn_top1`` and mean-patch
    ``knn_top1_patch`` of ``results["layers"]``), linear top-1 (``linear_top1``,
    ``linear_top1_patch``), correspondence top-1 (``results["correspondence"]["layers"]``) and
    dense mIoU (``results["dense"]["layers"]``). The randomly initialised backbone's per-block
    curves (``results["baselines"]["random_init"]``, same layout) are dashed; the raw-pixel kNN
    score is a dotted line on the kNN panel.

    Returns:
        ``out_png``, or ``None`` when there is nothing to plot.
    """
    if not isinstance(results, Mapping):
        return None
    rnd = dig(results, "baselines", "random_init") or {}
    drawn_panels = []
    for title, ylabel, specs in PANELS if panels is None else panels:
        curves = []
        for i, (label, part, key) in enumerate(specs):
            label = global_label if label is None else label
            xs, ys = block_series(_layers_of(results, part), key)
            if xs:
                curves.append(Curve(label, xs, ys, color=f"C{i}", linewidth=1.6, markersize=3.5))
            bx, by = block_series(_layers_of(rnd, part), key)
            if bx:
                curves.append(Curve(f"{label}, random init", bx, by, linestyle="--", marker="s", color=f"C{i}",
                                    linewidth=1.0, markersize=3.5))
        if not any(c.linestyle == "-" for c in curves):
            continue  # no curve of the model itself (a baseline alone is not worth a panel)
        raw = finite(dig(results, "baselines", "raw_pixels", "knn_top1")) if title == "kNN top-1" else None
        hlines = [HLine("raw pixels", raw, linestyle=":")] if raw is not None else []
        drawn_panels.append((title, ylabel, curves, hlines))
    if not drawn_panels:
        return None
    n = len(drawn_panels)
    nrows, ncols = (2, 2) if n == 4 else (2, 3) if n > 4 else (1, n)
    fig = new_figure((3.6 * ncols, 3.0 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (title, ylabel, curves, hlines) in zip(axes, drawn_panels):
        draw_block_curves(ax, curves, hlines, xlabel=unit, ylabel=ylabel, title=title, title_size="medium",
                          legend_size="x-small", max_ticks=12)
    for ax in axes[n:]:
        ax.set_axis_off()
    return save_figure(fig, out_png)
