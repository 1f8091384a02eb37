"""``compare``: one table (CSV + Markdown) and overlaid plots across pre-training runs.

Each run folder is read, never written:

* ``RUN/config.yaml``: the resolved config (its top-level ``recipe`` names the run),
* ``RUN/run.json``: training summary written by :func:`stratavit.train.pretrain` (optional),
* ``RUN/metrics.csv``: training metrics, for the overlaid loss curves (optional),
* ``RUN/<eval_subdir>/results.json``: evaluation written by :func:`stratavit.evaluate.evaluate_run`
  (required). Any part of it may be missing (older runs); missing values stay empty in the CSV
  and show as "–" in the Markdown.

:func:`compare_runs` writes ``OUT/compare.csv``, ``OUT/compare.md`` and ``OUT/compare_*.png``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from stratavit.evaluation.errors import EvaluationError
from stratavit.evaluation.metrics_csv import read_metrics
from stratavit.evaluation.plotting import Curve, draw_block_curves, new_figure, save_figure
from stratavit.evaluation.tables import dig, fmt, md_escape, md_table, to_float

__all__ = ["COLUMNS", "compare_runs"]

log = logging.getLogger(__name__)

CSV_NAME = "compare.csv"
MD_NAME = "compare.md"

# Stable column order of compare.csv (and of the rows returned by compare_runs).
COLUMNS: tuple[str, ...] = (
    "label",
    "run_dir",
    "recipe",
    "knn_top1",
    "linear_top1",
    "best_block_knn",
    "best_block_knn_top1",
    "dense_miou",
    "dense_pixel_acc",
    "correspondence_top1",
    "random_init_knn_top1",
    "raw_pixels_knn_top1",
    "images_per_s",
    "wall_time_s",
    "steps",
    "epochs",
    "eval_train",
    "eval_test",
    "eval_train_images",
    "eval_test_images",
    "knn_k",
)

# File names of the plots, by kind.
PLOTS: dict[str, str] = {
    "knn_layers": "compare_knn_layers.png",
    "linear_layers": "compare_linear_layers.png",
    "correspondence": "compare_correspondence.png",
    "dense": "compare_dense_miou.png",
    "headline": "compare_headline.png",
    "loss": "compare_loss.png",
    "throughput": "compare_throughput.png",
}

# (column, readable name, higher is better) for the "best run per metric" sentence.
_BEST_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("knn_top1", "kNN top-1", True),
    ("linear_top1", "linear top-1", True),
    ("best_block_knn_top1", "best-block kNN top-1", True),
    ("dense_miou", "dense mIoU", True),
    ("dense_pixel_acc", "dense pixel accuracy", True),
    ("correspondence_top1", "correspondence top-1", True),
    ("images_per_s", "throughput (img/s)", True),
    ("wall_time_s", "wall time (shortest)", False),
)

# Bars of the headline chart: (column, legend name).
_HEADLINE_BARS: tuple[tuple[str, str], ...] = (
    ("knn_top1", "kNN top-1 (%)"),
    ("linear_top1", "linear top-1 (%)"),
    ("dense_miou", "dense mIoU (%)"),
    ("correspondence_top1", "correspondence top-1 (%)"),
)


# --------------------------------------------------------------------------- #
# reading a run folder
# --------------------------------------------------------------------------- #
def _num(value: Any) -> float | None:
    """A finite float from a JSON/YAML value, else ``None`` (bools and strings of junk included)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return to_float(value)
    return None


def _int(value: Any) -> int | None:
    v = _num(value)
    return int(v) if v is not None and v == int(v) else None


def _layers(rows: Any, key: str) -> list[tuple[int, float]]:
    """Sorted ``(block, value)`` pairs of a per-block list, skipping entries without ``key``."""
    if not isinstance(rows, list):
        return []
    pts: dict[int, float] = {}
    for row in rows:
        if not isinstance(row, Mapping):
            continue
        block, value = _int(row.get("block")), _num(row.get(key))
        if block is not None and value is not None:
            pts[block] = value
    return sorted(pts.items())


def _read_config_recipe(run_dir: Path) -> str | None:
    path = run_dir / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise EvaluationError(f"{path} is not valid YAML: {e}") from None
    except OSError as e:
        raise EvaluationError(f"cannot read {path}: {e}") from None
    if not isinstance(data, Mapping):
        raise EvaluationError(f"{path} is not a YAML mapping; is {run_dir} a stratavit run folder?")
    recipe = data.get("recipe")
    return str(recipe) if recipe not in (None, "") else None


def _read_results(run_dir: Path, eval_subdir: str) -> dict[str, Any]:
    path = run_dir / eval_subdir / "results.json"
    if not path.is_file():
        out_hint = "" if eval_subdir == "eval" else f" --out {run_dir / eval_subdir}"
        raise EvaluationError(
            f"{run_dir} has no evaluation ({path} not found); run "
            f"`stratavit evaluate {run_dir} --train … --test …{out_hint}` first"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvaluationError(
            f"{path} is not readable JSON ({e}); re-run `stratavit evaluate {run_dir} --train … --test …`"
        ) from None
    if not isinstance(data, dict):
        raise EvaluationError(f"{path} does not hold a JSON object; re-run `stratavit evaluate {run_dir} …`")
    return data


def _read_run_json(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "run.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        log.warning("ignoring %s: not readable JSON (%s)", path, e)
        return None
    return data if isinstance(data, dict) else None


def _read_loss(metrics_csv: Path) -> tuple[list[float], list[float]]:
    """Total loss against step (sparse rows skipped); empty lists when there is none."""
    return read_metrics(metrics_csv, warn=True).series("loss")


class _Run:
    """Everything compare needs from one run folder."""

    def __init__(self, run_dir: Path, eval_subdir: str) -> None:
        self.dir = run_dir
        if not run_dir.is_dir() or not (run_dir / "config.yaml").is_file():
            raise EvaluationError(
                f"{run_dir} is not a stratavit run folder (no config.yaml); "
                "pass the --out folder of `stratavit pretrain`"
            )
        self.config_recipe = _read_config_recipe(run_dir)
        self.results = _read_results(run_dir, eval_subdir)
        self.summary = _read_run_json(run_dir)
        self.loss = _read_loss(run_dir / "metrics.csv")

    @property
    def meta(self) -> Mapping[str, Any]:
        meta = self.results.get("meta")
        return meta if isinstance(meta, Mapping) else {}

    @property
    def recipe(self) -> str | None:
        for value in (
            self.config_recipe,
            dig(self.summary, "recipe"),
            self.meta.get("recipe"),
        ):
            if value not in (None, ""):
                return str(value)
        return None

    def training(self, *keys: str) -> Any:
        """A run.json value (first of ``keys`` present), falling back to the copy in results meta."""
        for source in (self.summary, self.meta.get("training")):
            for key in keys:
                value = dig(source, key)
                if value is not None:
                    return value
        return None

    def row(self, label: str) -> dict[str, Any]:
        r = self.results
        knn_layers = _layers(r.get("layers"), "knn_top1")
        best_block, best_value = None, None
        for block, value in knn_layers:
            if best_value is None or value > best_value:
                best_block, best_value = block, value
        dense_miou = _num(dig(r, "dense", "miou"))
        dense_acc = _num(dig(r, "dense", "pixel_acc"))
        corr = _num(dig(r, "correspondence", "top1"))
        meta = self.meta
        row: dict[str, Any] = {
            "label": label,
            "run_dir": str(self.dir),
            "recipe": self.recipe,
            "knn_top1": _num(dig(r, "knn", "top1")),
            "linear_top1": _num(dig(r, "linear", "top1")),
            "best_block_knn": best_block,
            "best_block_knn_top1": best_value,
            "dense_miou": dense_miou,
            "dense_pixel_acc": dense_acc,
            "correspondence_top1": corr,
            "random_init_knn_top1": _num(dig(r, "baselines", "random_init", "knn_top1")),
            "raw_pixels_knn_top1": _num(dig(r, "baselines", "raw_pixels", "knn_top1")),
            "images_per_s": _num(self.training("images_per_s")),
            "wall_time_s": _num(self.training("wall_time_s")),
            "steps": _int(self.training("global_step", "steps")),
            "epochs": _int(self.training("epochs_completed", "epochs")),
            "eval_train": None if meta.get("train") is None else str(meta["train"]),
            "eval_test": None if meta.get("test") is None else str(meta["test"]),
            "eval_train_images": _int(meta.get("train_images")),
            "eval_test_images": _int(meta.get("test_images")),
            "knn_k": _int(dig(r, "knn", "k")),
        }
        assert tuple(row) == COLUMNS
        return row


# --------------------------------------------------------------------------- #
# labels, data check, best runs
# --------------------------------------------------------------------------- #
def _default_labels(runs: Sequence[_Run]) -> list[str]:
    """Recipe names; runs sharing one get their folder name (then parent/folder, then #i) added."""
    base = [run.recipe or run.dir.name for run in runs]
    labels = list(base)

    def clashes(ls: list[str]) -> set[int]:
        return {i for i, lab in enumerate(ls) if ls.count(lab) > 1}

    for widen in (
        lambda run, b: f"{b} ({run.dir.name})",
        lambda run, b: f"{b} ({run.dir.parent.name}/{run.dir.name})",
    ):
        dup = clashes(labels)
        if not dup:
            return labels
        for i in dup:
            labels[i] = widen(runs[i], base[i])
    seen: dict[str, int] = {}
    for i, lab in enumerate(labels):
        if labels.count(lab) > 1:
            seen[lab] = seen.get(lab, 0) + 1
            labels[i] = f"{lab} #{seen[lab]}"
    return labels


def _data_signature(row: Mapping[str, Any]) -> tuple[Any, ...]:
    return (row["eval_train"], row["eval_test"], row["eval_train_images"], row["eval_test_images"])


def _describe_data(row: Mapping[str, Any]) -> str:
    train, test = row["eval_train"], row["eval_test"]
    if train is None and test is None:
        return "unknown"
    text = f"train `{train if train is not None else '?'}`"
    if row["eval_train_images"] is not None:
        text += f" ({row['eval_train_images']} images)"
    text += f", test `{test if test is not None else '?'}`"
    if row["eval_test_images"] is not None:
        text += f" ({row['eval_test_images']} images)"
    return text


def _data_warnings(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Markdown warnings when the runs were not evaluated on the same data (or k)."""
    warnings: list[str] = []
    known = [r for r in rows if r["eval_train"] is not None or r["eval_test"] is not None]
    unknown = [r for r in rows if r["eval_train"] is None and r["eval_test"] is None]
    groups: dict[tuple[Any, ...], list[str]] = {}
    for r in known:
        groups.setdefault(_data_signature(r), []).append(r["label"])
    if len(groups) > 1:
        lines = [
            "**Warning: these runs were evaluated on different data, so their numbers are not comparable.**"
        ]
        for r in known:
            lines.append(f"- {md_escape(r['label'])}: {_describe_data(r)}")
        warnings.append("\n".join(lines))
    if unknown and len(rows) > 1:
        names = ", ".join(md_escape(r["label"]) for r in unknown)
        warnings.append(
            f"**Warning:** the evaluation data of {names} is not recorded (no `meta.train`/`meta.test` in "
            "results.json), so it cannot be checked that the numbers are comparable."
        )
    ks = {r["knn_k"] for r in rows if r["knn_k"] is not None}
    if len(ks) > 1:
        warnings.append(
            "**Warning:** the kNN numbers use different k ("
            + ", ".join(f"{md_escape(r['label'])}: k={r['knn_k']}" for r in rows if r["knn_k"] is not None)
            + ")."
        )
    return warnings


def _best_runs(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[str], float]]:
    """``(metric name, labels of the best runs (ties), value)`` for every metric some run has."""
    out = []
    for col, name, higher in _BEST_METRICS:
        values = [(r["label"], r[col]) for r in rows if r[col] is not None]
        if not values:
            continue
        best = (max if higher else min)(v for _, v in values)
        out.append((name, [lab for lab, v in values if v == best], best))
    return out


def _best_sentence(rows: Sequence[Mapping[str, Any]]) -> str:
    best = _best_runs(rows)
    if not best:
        return "No run has evaluation metrics to rank."
    parts = []
    for name, labels, value in best:
        who = " and ".join(f"**{md_escape(lab)}**" for lab in labels)
        parts.append(f"{name}: {who} ({fmt(value)})")
    return "Best run per metric: " + "; ".join(parts) + "."


# --------------------------------------------------------------------------- #
# plots
# --------------------------------------------------------------------------- #
def _color(i: int) -> str:
    return f"C{i % 10}"


def _plot_per_block(
    runs: Sequence[_Run],
    labels: Sequence[str],
    out_png: Path,
    curves: Sequence[tuple[str, tuple[str, ...], str]],
    title: str,
    ylabel: str,
) -> Path | None:
    """Overlaid per-block curves, one colour per run.

    ``curves``: ``(legend suffix, key path to the per-block list, value key)``; the first is drawn
    solid, the others dashed/dotted in the same colour.
    """
    styles = ("-", "--", ":", "-.")
    drawn = []
    for i, (run, label) in enumerate(zip(runs, labels)):
        for j, (suffix, path, key) in enumerate(curves):
            pts = _layers(dig(run.results, *path), key)
            if pts:
                drawn.append(Curve(
                    f"{label}{suffix}", [p[0] for p in pts], [p[1] for p in pts], linestyle=styles[j % len(styles)],
                    marker="o" if j == 0 else "s", color=_color(i), linewidth=1.8 if j == 0 else 1.2, markersize=4,
                ))
    if not drawn:
        return None
    fig = new_figure()
    draw_block_curves(fig.add_subplot(), drawn, xlabel="transformer block", ylabel=ylabel, title=title,
                      tick_label=str)
    return save_figure(fig, out_png)


def _plot_headline(rows: Sequence[Mapping[str, Any]], out_png: Path) -> Path | None:
    bars = [(col, name) for col, name in _HEADLINE_BARS if any(r[col] is not None for r in rows)]
    if not bars:
        return None
    n_runs, n_bars = len(rows), len(bars)
    width = 0.8 / n_bars
    fig = new_figure((max(6.0, 1.2 + 1.4 * n_runs), 4.2))
    ax = fig.add_subplot()
    for j, (col, name) in enumerate(bars):
        xs = [i + (j - (n_bars - 1) / 2) * width for i in range(n_runs)]
        heights = [r[col] if r[col] is not None else 0.0 for r in rows]
        container = ax.bar(xs, heights, width=width * 0.95, color=_color(j), label=name)
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


def _plot_loss(runs: Sequence[_Run], labels: Sequence[str], out_png: Path) -> Path | None:
    if not any(run.loss[0] for run in runs):
        return None
    fig = new_figure()
    ax = fig.add_subplot()
    for i, (run, label) in enumerate(zip(runs, labels)):
        xs, ys = run.loss
        if xs:
            ax.plot(xs, ys, color=_color(i), linewidth=1.4, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (total)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    ax.set_title("training loss (total)")
    return save_figure(fig, out_png)


def _plot_throughput(rows: Sequence[Mapping[str, Any]], out_png: Path) -> Path | None:
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
        container = ax.bar(range(n_runs), heights, color=[_color(i) for i in range(n_runs)])
        ax.bar_label(
            container, labels=[fmt(r[col]) if r[col] is not None else "–" for r in rows],
            fontsize="x-small", padding=1,
        )
        ax.set_xticks(range(n_runs), [r["label"] for r in rows], rotation=20 if n_runs > 3 else 0)
        ax.set_ylabel(name)
        ax.grid(True, axis="y", alpha=0.3)
        ax.set_title(name)
    return save_figure(fig, out_png)


# --------------------------------------------------------------------------- #
# outputs
# --------------------------------------------------------------------------- #
def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_csv_cell(row[c]) for c in COLUMNS])
    return path


def _md_rows(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    header = [
        "run", "recipe", "kNN top-1 (%)", "linear top-1 (%)", "best block kNN (%)", "dense mIoU (%)",
        "dense pixel acc (%)", "correspondence top-1 (%)", "img/s", "wall time (s)", "steps", "epochs",
        "eval data (train → test)",
    ]
    table = []
    for r in rows:
        best = None
        if r["best_block_knn"] is not None:
            best = f"block {r['best_block_knn']} ({fmt(r['best_block_knn_top1'])})"
        data = None
        if r["eval_train"] is not None or r["eval_test"] is not None:
            data = f"{r['eval_train'] or '?'} → {r['eval_test'] or '?'}"
        table.append([
            md_escape(r["label"]),
            None if r["recipe"] is None else md_escape(r["recipe"]),
            r["knn_top1"], r["linear_top1"], best, r["dense_miou"], r["dense_pixel_acc"],
            r["correspondence_top1"], r["images_per_s"], r["wall_time_s"], r["steps"], r["epochs"],
            None if data is None else md_escape(data),
        ])
    return header, table


def _write_markdown(
    out_dir: Path,
    rows: Sequence[Mapping[str, Any]],
    plots: Mapping[str, Path],
    warnings: Sequence[str],
    title: str,
    eval_subdir: str,
) -> Path:
    parts = [f"# {title}"]
    parts.append(
        f"{len(rows)} run{'s' if len(rows) != 1 else ''} compared (evaluation read from "
        f"`RUN/{eval_subdir}/results.json`; accuracies in %; \"–\" = not measured). "
        f"The same numbers are in [{CSV_NAME}]({CSV_NAME})."
    )
    parts.extend(warnings)
    header, table = _md_rows(rows)
    parts.append("## Results\n\n" + md_table(header, table))
    parts.append(_best_sentence(rows))
    parts.append(
        "## Runs\n\n" + "\n".join(f"- **{md_escape(r['label'])}**: `{r['run_dir']}`" for r in rows)
    )
    captions = {
        "headline": "Headline metrics",
        "knn_layers": "kNN top-1 per block",
        "linear_layers": "Linear probe top-1 per block",
        "correspondence": "Correspondence top-1 per block",
        "dense": "Dense mIoU per block",
        "loss": "Training loss (total; the losses of different recipes are on different scales)",
        "throughput": "Throughput and wall time",
    }
    if plots:
        lines = ["## Plots"]
        for kind in captions:
            if kind in plots:
                rel = Path(os.path.relpath(plots[kind], out_dir)).as_posix()
                lines.append(f"### {captions[kind]}\n\n![{captions[kind]}]({rel})")
        parts.append("\n\n".join(lines))
    path = out_dir / MD_NAME
    path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return path


def compare_runs(
    run_dirs: Sequence[Path],
    out_dir: Path,
    *,
    labels: Sequence[str] | None = None,
    eval_subdir: str = "eval",
    title: str = "stratavit: run comparison",
) -> dict[str, Any]:
    """Compare evaluated pre-training runs in one table and overlaid plots.

    Args:
        run_dirs: run folders (``stratavit pretrain --out``), each evaluated
            (``stratavit evaluate RUN_DIR ...``), in the order of the table.
        out_dir: created if needed; receives ``compare.csv``, ``compare.md`` and
            ``compare_*.png`` (the Markdown links the PNGs relatively).
        labels: one name per run (must be distinct). Default: the recipe name,
            with the folder name added where runs share a recipe.
        eval_subdir: where inside each run the evaluation lives
            (``RUN/<eval_subdir>/results.json``).
        title: H1 title of the Markdown.

    Returns:
        ``{"columns": [...], "rows": [{column: value or None}, ...], "csv": Path,
        "markdown": Path, "plots": {kind: Path}, "warnings": [markdown text, ...]}``.

    Raises:
        EvaluationError: no run given, a run given twice, a folder that is not a run
            (no ``config.yaml``), a run without readable ``results.json``, or bad ``labels``.
    """
    run_paths = [Path(p) for p in run_dirs]
    if not run_paths:
        raise EvaluationError("compare needs at least one run folder")
    seen: dict[Path, Path] = {}
    for p in run_paths:
        key = p.resolve()
        if key in seen:
            raise EvaluationError(f"run folder given twice: {seen[key]} and {p}; pass each run once")
        seen[key] = p
    if labels is not None:
        labels = [str(lab) for lab in labels]
        if len(labels) != len(run_paths):
            raise EvaluationError(f"{len(labels)} labels for {len(run_paths)} runs; pass one label per run")
        dup = sorted({lab for lab in labels if labels.count(lab) > 1})
        if dup:
            raise EvaluationError(f"duplicate labels: {', '.join(dup)}; each run needs its own label")
        if any(not lab.strip() for lab in labels):
            raise EvaluationError("labels must not be empty")

    runs = [_Run(p, eval_subdir) for p in run_paths]
    names = list(labels) if labels is not None else _default_labels(runs)
    rows = [run.row(name) for run, name in zip(runs, names)]

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = _write_csv(rows, out_dir / CSV_NAME)

    plots: dict[str, Path] = {}

    def add(kind: str, png: Path | None) -> None:
        if png is not None:
            plots[kind] = png

    add("headline", _plot_headline(rows, out_dir / PLOTS["headline"]))
    add("knn_layers", _plot_per_block(
        runs, names, out_dir / PLOTS["knn_layers"],
        [("", ("layers",), "knn_top1"), (" (patch tokens)", ("layers",), "knn_top1_patch")],
        "kNN top-1 per transformer block", "kNN top-1 (%)",
    ))
    add("linear_layers", _plot_per_block(
        runs, names, out_dir / PLOTS["linear_layers"],
        [("", ("layers",), "linear_top1"), (" (patch tokens)", ("layers",), "linear_top1_patch")],
        "linear probe top-1 per transformer block", "linear top-1 (%)",
    ))
    add("correspondence", _plot_per_block(
        runs, names, out_dir / PLOTS["correspondence"],
        [("", ("correspondence", "layers"), "top1")],
        "correspondence top-1 per transformer block", "correspondence top-1 (%)",
    ))
    add("dense", _plot_per_block(
        runs, names, out_dir / PLOTS["dense"],
        [("", ("dense", "layers"), "miou")],
        "dense mIoU per transformer block", "mIoU (%)",
    ))
    add("loss", _plot_loss(runs, names, out_dir / PLOTS["loss"]))
    add("throughput", _plot_throughput(rows, out_dir / PLOTS["throughput"]))

    warnings = _data_warnings(rows)
    md_path = _write_markdown(out_dir, rows, plots, warnings, title, eval_subdir)
    return {
        "columns": list(COLUMNS),
        "rows": rows,
        "csv": csv_path,
        "markdown": md_path,
        "plots": plots,
        "warnings": warnings,
    }
