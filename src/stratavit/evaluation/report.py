"""The Markdown report of an evaluation (``report.md``, and ``report.html`` beside it).

Expected ``results`` layout (all accuracies in percent)::

    {
        "knn": {"top1": float},
        "linear": {"top1": float},
        "layers": [{"block": 1, "knn_top1": float, ...}, ...],   # block is 1-based
        "baselines": {                                            # optional
            "random_init": {"knn_top1": float, "layers": [...]},  # "layers" optional
            "raw_pixels": {"knn_top1": float},
        },
        "meta": {"recipe": ..., "run_dir": ..., ...},             # optional
    }
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stratavit.evaluation.block_plots import plot_layer_curve
from stratavit.evaluation.md_html import write_html
from stratavit.evaluation.tables import dig, fmt, md_table
from stratavit.evaluation.training_health import (
    LOSS_PNG,
    collapse_summary,
    collapse_thresholds,
    plot_collapse_curve,
    plot_loss_curve,
    training_health,
)

__all__ = [
    "baseline_label",
    "collapse_summary",
    "collapse_thresholds",
    "plot_collapse_curve",
    "plot_loss_curve",
    "plot_layer_curve",
    "write_report",
]

LAYER_PNG = "layer_curve.png"

_BASELINE_NAMES = {"random_init": "random init", "raw_pixels": "raw pixels"}


def baseline_label(name: str) -> str:
    return _BASELINE_NAMES.get(name, name.replace("_", " "))


# --------------------------------------------------------------------------- #
# markdown
# --------------------------------------------------------------------------- #
def _headline(results: Mapping[str, Any]) -> str:
    extra = [
        (part, key, label)
        for part, key, label in (("dense", "miou", "dense mIoU (%)"), ("correspondence", "top1", "correspondence (%)"))
        if dig(results, part, key) is not None
    ]
    rows = [
        ["pre-trained backbone (last block)", dig(results, "knn", "top1"), dig(results, "linear", "top1")]
        + [dig(results, part, key) for part, key, _ in extra]
    ]
    for name, base in (dig(results, "baselines") or {}).items():
        if not isinstance(base, Mapping):
            continue
        knn = base.get("knn_top1", dig(base, "knn", "top1"))
        lin = base.get("linear_top1", dig(base, "linear", "top1"))
        suffix = " (last block)" if name == "random_init" else ""
        rows.append([baseline_label(name) + suffix, knn, lin] + [dig(base, part, key) for part, key, _ in extra])
    return md_table(["model", "kNN top-1 (%)", "linear top-1 (%)", *(label for *_, label in extra)], rows)


def _layer_table(results: Mapping[str, Any]) -> str | None:
    layers = results.get("layers") or []
    if not layers:
        return None
    keys: list[str] = []
    for row in layers:
        for k in row:
            if k != "block" and k not in keys:
                keys.append(k)
    header = ["block", *keys]
    ref_cols: list[tuple[str, dict[int, Mapping[str, Any]]]] = []
    for name, base in (dig(results, "baselines") or {}).items():
        base_layers = dig(base, "layers")
        if base_layers:
            by_block = {int(r["block"]): r for r in base_layers if "block" in r}
            for k in keys:
                if any(k in r for r in by_block.values()):
                    header.append(f"{baseline_label(name)} {k}")
                    ref_cols.append((k, by_block))
    rows = []
    for row in sorted(layers, key=lambda r: int(r.get("block", 0))):
        block = int(row.get("block", 0))
        cells: list[Any] = [block, *(row.get(k) for k in keys)]
        cells += [by_block.get(block, {}).get(k) for k, by_block in ref_cols]
        rows.append(cells)
    return md_table(header, rows)


def _meta_lines(meta: Mapping[str, Any], indent: str = "") -> list[str]:
    """Markdown bullet list of a (possibly nested) mapping; nested mappings become sub-lists."""
    lines = []
    for k, v in meta.items():
        if isinstance(v, Mapping):
            lines.append(f"{indent}- **{k}**:")
            lines.extend(_meta_lines(v, indent + "  "))
        else:
            lines.append(f"{indent}- **{k}**: {fmt(v)}")
    return lines


def _block_section(
    results: Mapping[str, Any], part: str, columns: Sequence[tuple[str, str]], intro: str
) -> str | None:
    """Markdown table of ``results[part]["layers"]`` (and the random-init baseline's, if any)."""
    rows_by_block = {int(r["block"]): r for r in dig(results, part, "layers") or [] if "block" in r}
    if not rows_by_block:
        return None
    base = {int(r["block"]): r for r in dig(results, "baselines", "random_init", part, "layers") or []}
    header = ["block", *(label for _, label in columns)]
    if base:
        header += [f"random init {label}" for _, label in columns]
    rows = []
    for block, row in sorted(rows_by_block.items()):
        cells: list[Any] = [block, *(row.get(key) for key, _ in columns)]
        if base:
            cells += [base.get(block, {}).get(key) for key, _ in columns]
        rows.append(cells)
    return intro + "\n\n" + md_table(header, rows)


def write_report(
    out_dir: Path,
    results: dict,
    *,
    metrics_csv: Path | None = None,
    title: str = "stratavit evaluation",
    extra_md: str = "",
    figures: Sequence[tuple[str, Path]] = (),
    html: bool = False,
) -> Path:
    """Write ``out_dir/report.md`` (plus ``loss_curve.png`` / ``layer_curve.png``).

    Args:
        out_dir: created if needed; PNGs are written next to the report and
            linked relatively.
        results: see the module docstring.
        metrics_csv: training metrics CSV for the loss plot (skipped if
            ``None``, missing, or without loss values) and the "Training health"
            section (collapse indicators, ``environment.json`` beside the CSV;
            skipped when neither is there).
        title: H1 title of the report.
        extra_md: Markdown appended verbatim at the end.
        figures: ``(caption, png)`` pictures shown in a "Pictures" section (paths made relative).
        html: also write a self-contained ``report.html`` (images embedded).

    Returns:
        Path of ``report.md``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}"]

    meta = results.get("meta")
    if isinstance(meta, Mapping) and meta:
        parts.append("\n".join(_meta_lines(meta)))

    parts.append("## Headline\n\n" + _headline(results))

    layer_table = _layer_table(results)
    if layer_table is not None:
        parts.append("## Per-block evaluation\n\n" + layer_table)
        baselines = results.get("baselines") or {}
        lines: dict[str, float] = {}
        curves: dict[str, list[dict]] = {}
        for name, base in baselines.items():
            value = dig(base, "knn_top1")
            label = baseline_label(name)
            if value is not None:
                lines[label + (" (last block)" if name == "random_init" else "")] = float(value)
            if dig(base, "layers"):
                curves[f"{label} (per block)"] = list(base["layers"])
        png = plot_layer_curve(
            list(results["layers"]),
            out_dir / LAYER_PNG,
            key="knn_top1",
            baselines=lines or None,
            title="kNN top-1 per transformer block",
            extra_curves=curves or None,
        )
        parts.append(f"![kNN top-1 per block]({os.path.relpath(png, out_dir)})")

    dense = _block_section(
        results, "dense", [("miou", "mIoU (%)"), ("pixel_acc", "pixel acc. (%)")],
        "## Dense probe\n\nA linear segmentation head on frozen patch tokens (upsampled logits, "
        f"cross-entropy), {fmt(dig(results, 'dense', 'num_classes'))} classes, "
        f"input {fmt(dig(results, 'dense', 'size'))} px, evaluated at the masks' own resolution.",
    )
    if dense is not None:
        parts.append(dense)
    corr = _block_section(
        results, "correspondence", [("top1", "top-1 (%)"), ("exact", "exact (%)"), ("chance", "chance (%)")],
        "## Correspondence\n\nTwo random crops of each of "
        f"{fmt(dig(results, 'correspondence', 'pairs'))} held-out images: is the nearest patch (cosine) "
        "of the other view within one patch of the true location? *exact*: the very patch; *chance*: a "
        "random guess.",
    )
    if corr is not None:
        parts.append(corr)

    if figures:
        pics = [f"**{caption}**\n\n![{caption}]({os.path.relpath(png, out_dir)})" for caption, png in figures]
        parts.append("## Pictures\n\n" + "\n\n".join(pics))

    if metrics_csv is not None:
        png = plot_loss_curve(Path(metrics_csv), out_dir / LOSS_PNG)
        if png is not None:
            parts.append(f"## Training loss\n\n![training loss]({os.path.relpath(png, out_dir)})")
        else:
            parts.append("## Training loss\n\n_No loss values found in the metrics CSV._")
        health = training_health(Path(metrics_csv), out_dir)
        if health is not None:
            parts.append(health)

    if extra_md:
        parts.append(extra_md.strip())

    report = out_dir / "report.md"
    report.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    if html:
        write_html(report, out_dir / "report.html")
    return report
