"""The Markdown report of an evaluation (``report.md``, and ``report.html`` beside it).

Its parts: the ``meta`` list, the headline table (columns from every evaluation's ``headline``),
each evaluation's own section (``Evaluation.report_section``, in the order of ``EVALUATIONS``), the
pictures, the training loss and the training health (:mod:`stratavit.evaluation.training_health`).

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

from stratavit.evaluation.block_plots import plot_block_curve
from stratavit.evaluation.evaluations import EVALUATIONS
from stratavit.evaluation.evaluations.classification import baseline_label
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
from stratavit.run_folder import EvalFolder

__all__ = [
    "baseline_label",
    "collapse_summary",
    "collapse_thresholds",
    "plot_collapse_curve",
    "plot_loss_curve",
    "plot_block_curve",
    "write_report",
]

# --------------------------------------------------------------------------- #
# markdown
# --------------------------------------------------------------------------- #
def _headline(results: Mapping[str, Any]) -> str:
    columns = [c for e in EVALUATIONS for c in e.headline()]
    columns = [c for c in columns if c.always or c.read(results) is not None]
    rows = [["pre-trained backbone (last block)", *(c.read(results) for c in columns)]]
    for name, base in (dig(results, "baselines") or {}).items():
        if not isinstance(base, Mapping):
            continue
        suffix = " (last block)" if name == "random_init" else ""
        rows.append([baseline_label(name) + suffix, *(c.read_baseline(base) for c in columns)])
    return md_table(["model", *(c.label for c in columns)], rows)


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

    for evaluation in EVALUATIONS:
        section = evaluation.report_section(results, out_dir)
        if section is not None:
            parts.append(section)

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

    folder = EvalFolder(out_dir)
    folder.report_md.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    if html:
        write_html(folder.report_md, folder.report_html)
    return folder.report_md
