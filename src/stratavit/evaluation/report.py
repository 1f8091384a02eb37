"""The Markdown report of an evaluation (``report.md``, and ``report.html`` beside it).

Its parts, headline first: the title, a one-paragraph summary (what was evaluated, on what, at
which size, and the last block's numbers), the warnings (``meta.warnings``: size other than the
training resolution, meaningless classes, an unmoved teacher ...), the headline table (columns
from every evaluation's ``headline``); then each evaluation's own section
(``Evaluation.report_section``, in the order of ``EVALUATIONS``), the pictures, the training loss
and the training health (:mod:`stratavit.evaluation.training_health`), and last the ``meta``
list (settings and provenance).

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


def _data_text(meta: Mapping[str, Any], split: str) -> str:
    text = f"`{meta[split]}`" if meta.get(split) is not None else "?"
    if meta.get(f"{split}_images") is not None:
        text += f" ({meta[f'{split}_images']} images)"
    return text


def _summary(results: Mapping[str, Any]) -> str | None:
    """The one-paragraph summary under the title: what was evaluated, on what, at which size, the numbers."""
    meta = results.get("meta")
    if not isinstance(meta, Mapping) or not meta:
        return None
    steps = dig(meta, "training", "global_step")
    who = f"The {meta.get('weights', 'teacher')} backbone of `{meta.get('run_dir', '?')}`"
    details = [f"recipe {meta['recipe']}"] if meta.get("recipe") else []
    if steps is not None:
        details.append(f"{steps} training steps")
    text = who + (f" ({', '.join(details)})" if details else "")
    size, trained = meta.get("img_size"), meta.get("train_img_size")
    if size is not None:
        text += f", evaluated at {size} px" + (
            " (its training resolution)" if size == trained else f" (trained at {trained} px)" if trained else "")
    if meta.get("train") is not None or meta.get("test") is not None:
        classes = f", {meta['classes']} classes" if meta.get("classes") is not None else ""
        text += f" on train {_data_text(meta, 'train')} → test {_data_text(meta, 'test')}{classes}"
    columns = [c for e in EVALUATIONS for c in e.headline()]
    numbers = [f"{c.label.replace(' (%)', '')} {fmt(c.read(results))} %" for c in columns if c.read(results) is not None]
    if numbers:
        text += ". Last block: " + ", ".join(numbers)
    rand = dig(results, "baselines", "random_init")
    if isinstance(rand, Mapping) and columns and columns[0].read_baseline(rand) is not None:
        text += f" (random init: {fmt(columns[0].read_baseline(rand))} %)"
    return text + "."


def _warnings(results: Mapping[str, Any]) -> str | None:
    warnings = dig(results, "meta", "warnings")
    if not warnings:
        return None
    return "\n\n".join(f"> **Warning:** {w}" for w in warnings)


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
        extra_md: Markdown appended verbatim after the sections (before the settings).
        figures: ``(caption, png)`` pictures shown in a "Pictures" section (paths made relative).
        html: also write a self-contained ``report.html`` (images embedded).

    Returns:
        Path of ``report.md``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"# {title}"]
    for text in (_summary(results), _warnings(results)):
        if text:
            parts.append(text)
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

    meta = results.get("meta")
    if isinstance(meta, Mapping) and meta:
        shown = {k: v for k, v in meta.items() if k != "warnings"}
        parts.append("## Settings and provenance\n\n" + "\n".join(_meta_lines(shown)))

    folder = EvalFolder(out_dir)
    folder.report_md.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    if html:
        write_html(folder.report_md, folder.report_html)
    return folder.report_md
