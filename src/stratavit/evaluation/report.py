"""Plots and a Markdown report for an evaluation run.

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

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

__all__ = ["collapse_summary", "collapse_thresholds", "plot_collapse_curve", "plot_loss_curve", "plot_layer_curve", "write_report"]

LOSS_PNG = "loss_curve.png"
LAYER_PNG = "layer_curve.png"
COLLAPSE_PNG = "collapse_curve.png"

_BASELINE_NAMES = {"random_init": "random init", "raw_pixels": "raw pixels"}


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _to_float(cell: str | None) -> float | None:
    if cell is None or cell.strip() == "":
        return None
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _new_figure(figsize: tuple[float, float] = (7.0, 4.0)) -> Figure:
    # A bare Figure (no pyplot) renders with Agg and never touches a GUI backend
    # or pyplot's global figure registry, so this is safe headless and in threads.
    return Figure(figsize=figsize, layout="constrained")


def _save(fig: Figure, out_png: Path) -> Path:
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    return out_png


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _get(d: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, Mapping) or key not in d:
            return None
        d = d[key]
    return d


def _baseline_label(name: str) -> str:
    return _BASELINE_NAMES.get(name, name.replace("_", " "))


def _read_metrics(metrics_csv: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Columns and rows of a metrics CSV; ``([], [])`` when it is missing or unreadable."""
    try:
        with Path(metrics_csv).open(newline="") as fh:
            reader = csv.DictReader(fh)
            return list(reader.fieldnames or []), list(reader)
    except (OSError, csv.Error, UnicodeDecodeError):
        return [], []


def _series(rows: list[dict[str, str]], columns: list[str], col: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows where ``col`` holds a finite number (the row index without ``step``)."""
    xs, ys = [], []
    for i, row in enumerate(rows):
        y = _to_float(row.get(col))
        if y is None:
            continue
        x = _to_float(row.get("step")) if "step" in columns else float(i)
        if x is None:
            continue
        xs.append(x)
        ys.append(y)
    return xs, ys


# --------------------------------------------------------------------------- #
# plots
# --------------------------------------------------------------------------- #
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
    columns, rows = _read_metrics(metrics_csv)

    loss_cols = [c for c in columns if c == "loss" or c.startswith("loss/")]
    lr_col = "lr" if "lr" in columns else next((c for c in columns if c.startswith("lr-")), None)

    def series(col: str) -> tuple[list[float], list[float]]:
        return _series(rows, columns, col)

    curves = {c: series(c) for c in loss_cols}
    curves = {c: xy for c, xy in curves.items() if xy[0]}
    if not curves:
        return None

    fig = _new_figure()
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
    return _save(fig, out_png)


def plot_layer_curve(
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

    def points(rows: list[dict]) -> tuple[list[int], list[float]]:
        pts = sorted(
            (int(r["block"]), float(r[key])) for r in rows if r.get(key) is not None and "block" in r
        )
        return [p[0] for p in pts], [p[1] for p in pts]

    fig = _new_figure()
    ax = fig.add_subplot()
    xs, ys = points(layers)
    ax.plot(xs, ys, marker="o", color="tab:blue", linewidth=1.8, label=f"pre-trained ({key})")
    all_x = set(xs)
    for i, (label, rows) in enumerate((extra_curves or {}).items()):
        ex, ey = points(rows)
        all_x.update(ex)
        ax.plot(ex, ey, marker="s", linestyle="--", color=f"C{i + 3}", linewidth=1.2, label=label)
    for i, (label, value) in enumerate((baselines or {}).items()):
        ax.axhline(
            float(value), linestyle="--", linewidth=1.0, color=f"C{i + 1}", label=f"{label}: {value:.1f}"
        )
    ticks = sorted(all_x)
    ax.set_xticks(ticks, [f"block {t}" for t in ticks], rotation=45 if len(ticks) > 6 else 0)
    ax.set_xlabel("transformer block")
    ax.set_ylabel(f"{key} (%)" if not key.endswith("top1") else "top-1 accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    ax.set_title(title)
    return _save(fig, out_png)


def collapse_summary(metrics_csv: Path) -> dict[str, Any] | None:
    """The collapse monitor's values in a run's ``metrics.csv`` (see :mod:`stratavit.collapse`).

    Returns ``None`` when the CSV is missing or has no ``collapse/rankme`` value (runs trained
    before the monitor existed, or with ``train.collapse_monitor=false``); otherwise ``checks``
    (number of logged checks), ``alerts`` (checks below a threshold, ``collapse/alert`` = 1),
    ``first_alert_step``, ``min_rankme`` / ``max_rank`` (min(N, D) of that check),
    ``min_std_norm``, ``last_step``, ``last_rankme`` and ``last_std_norm``.
    """
    columns, rows = _read_metrics(metrics_csv)
    steps, ranks = _series(rows, columns, "collapse/rankme")
    if not ranks:
        return None
    _, fracs = _series(rows, columns, "collapse/rankme_frac")
    _, stds = _series(rows, columns, "collapse/std_norm")
    alert_steps = [x for x, y in zip(*_series(rows, columns, "collapse/alert")) if y > 0]
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

    The defaults of :mod:`stratavit.collapse` when the config has no such keys; ``None`` when there
    is no readable config.
    """
    import yaml

    from stratavit.engine.callbacks.collapse import RANK_FRACTION, STD_THRESHOLD

    try:
        train = (yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}).get("train") or {}
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
    :class:`~stratavit.collapse.CollapseMonitor`) the monitor's thresholds are drawn dashed.

    Returns:
        ``out_png``, or ``None`` when the CSV is missing or holds no ``collapse/rankme`` value.
    """
    columns, rows = _read_metrics(metrics_csv)
    rank_x, rank_y = _series(rows, columns, "collapse/rankme")
    if not rank_x:
        return None
    by_step = {k: dict(zip(*_series(rows, columns, k))) for k in
               ("collapse/rankme_frac", "collapse/std", "collapse/std_norm", "collapse/alert")}
    alerts = {x for x, y in by_step["collapse/alert"].items() if y > 0}
    fig = _new_figure((10.0, 3.8))
    ax_rank, ax_std = fig.subplots(1, 2)
    if thresholds is not None:
        from stratavit.engine.callbacks.collapse import RANK_FLOOR

        rank_fraction, std_threshold = thresholds
        limits = [lambda m: max(rank_fraction * m, RANK_FLOOR), lambda m: std_threshold * m]
    panels = [
        (ax_rank, (rank_x, rank_y), "collapse/rankme_frac", "RankMe (effective rank)", "max rank min(N, D)"),
        (ax_std, _series(rows, columns, "collapse/std"), "collapse/std_norm",
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
    return _save(fig, out_png)


def _environment_line(run_dir: Path) -> str | None:
    """One Markdown line on what the run was trained with, from ``run_dir/environment.json``."""
    from stratavit.provenance import read_environment

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


def _training_health(metrics_csv: Path, out_dir: Path) -> str | None:
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


# --------------------------------------------------------------------------- #
# markdown
# --------------------------------------------------------------------------- #
def _headline(results: Mapping[str, Any]) -> str:
    extra = [
        (part, key, label)
        for part, key, label in (("dense", "miou", "dense mIoU (%)"), ("correspondence", "top1", "correspondence (%)"))
        if _get(results, part, key) is not None
    ]
    rows = [
        ["pre-trained backbone (last block)", _get(results, "knn", "top1"), _get(results, "linear", "top1")]
        + [_get(results, part, key) for part, key, _ in extra]
    ]
    for name, base in (_get(results, "baselines") or {}).items():
        if not isinstance(base, Mapping):
            continue
        knn = base.get("knn_top1", _get(base, "knn", "top1"))
        lin = base.get("linear_top1", _get(base, "linear", "top1"))
        suffix = " (last block)" if name == "random_init" else ""
        rows.append([_baseline_label(name) + suffix, knn, lin] + [_get(base, part, key) for part, key, _ in extra])
    return _md_table(["model", "kNN top-1 (%)", "linear top-1 (%)", *(label for *_, label in extra)], rows)


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
    for name, base in (_get(results, "baselines") or {}).items():
        base_layers = _get(base, "layers")
        if base_layers:
            by_block = {int(r["block"]): r for r in base_layers if "block" in r}
            for k in keys:
                if any(k in r for r in by_block.values()):
                    header.append(f"{_baseline_label(name)} {k}")
                    ref_cols.append((k, by_block))
    rows = []
    for row in sorted(layers, key=lambda r: int(r.get("block", 0))):
        block = int(row.get("block", 0))
        cells: list[Any] = [block, *(row.get(k) for k in keys)]
        cells += [by_block.get(block, {}).get(k) for k, by_block in ref_cols]
        rows.append(cells)
    return _md_table(header, rows)


def _meta_lines(meta: Mapping[str, Any], indent: str = "") -> list[str]:
    """Markdown bullet list of a (possibly nested) mapping; nested mappings become sub-lists."""
    lines = []
    for k, v in meta.items():
        if isinstance(v, Mapping):
            lines.append(f"{indent}- **{k}**:")
            lines.extend(_meta_lines(v, indent + "  "))
        else:
            lines.append(f"{indent}- **{k}**: {_fmt(v)}")
    return lines


def _block_section(
    results: Mapping[str, Any], part: str, columns: Sequence[tuple[str, str]], intro: str
) -> str | None:
    """Markdown table of ``results[part]["layers"]`` (and the random-init baseline's, if any)."""
    rows_by_block = {int(r["block"]): r for r in _get(results, part, "layers") or [] if "block" in r}
    if not rows_by_block:
        return None
    base = {int(r["block"]): r for r in _get(results, "baselines", "random_init", part, "layers") or []}
    header = ["block", *(label for _, label in columns)]
    if base:
        header += [f"random init {label}" for _, label in columns]
    rows = []
    for block, row in sorted(rows_by_block.items()):
        cells: list[Any] = [block, *(row.get(key) for key, _ in columns)]
        if base:
            cells += [base.get(block, {}).get(key) for key, _ in columns]
        rows.append(cells)
    return intro + "\n\n" + _md_table(header, rows)


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
            value = _get(base, "knn_top1")
            label = _baseline_label(name)
            if value is not None:
                lines[label + (" (last block)" if name == "random_init" else "")] = float(value)
            if _get(base, "layers"):
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
        f"cross-entropy), {_fmt(_get(results, 'dense', 'num_classes'))} classes, "
        f"input {_fmt(_get(results, 'dense', 'size'))} px, evaluated at the masks' own resolution.",
    )
    if dense is not None:
        parts.append(dense)
    corr = _block_section(
        results, "correspondence", [("top1", "top-1 (%)"), ("exact", "exact (%)"), ("chance", "chance (%)")],
        "## Correspondence\n\nTwo random crops of each of "
        f"{_fmt(_get(results, 'correspondence', 'pairs'))} held-out images: is the nearest patch (cosine) "
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
        health = _training_health(Path(metrics_csv), out_dir)
        if health is not None:
            parts.append(health)

    if extra_md:
        parts.append(extra_md.strip())

    report = out_dir / "report.md"
    report.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    if html:
        from stratavit.evaluation.visuals import write_html

        write_html(report, out_dir / "report.html")
    return report
