"""``compare``: one table (CSV + Markdown) and overlaid plots across pre-training runs.

Each run folder is read, never written:

* ``RUN/config.yaml``: the resolved config (its top-level ``recipe`` names the run),
* ``RUN/run.json``: training summary written by :func:`stratavit.engine.train.pretrain` (optional),
* ``RUN/metrics.csv``: training metrics, for the overlaid loss curves (optional),
* ``RUN/<eval_subdir>/results.json``: evaluation written by :func:`stratavit.evaluation.run.evaluate_run`
  (required). Any part of it may be missing (older runs); missing values stay empty in the CSV
  and show as "–" in the Markdown.

:func:`compare_runs` writes ``OUT/compare.csv``, ``OUT/compare.md`` and ``OUT/compare_*.png``.
Numbers measured on different data, classes, sizes or protocols are flagged, never refused
(:mod:`stratavit.evaluation.compare_flags`): a marker on the cell and a footnote in the Markdown,
the ``not_comparable`` column of the CSV, a line in the returned ``flags`` and the plots' titles.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from stratavit.evaluation.compare_flags import Flags, flag_columns, run_warnings
from stratavit.evaluation.compare_plots import (
    plot_headline,
    plot_loss,
    plot_per_block,
    plot_throughput,
)
from stratavit.evaluation.errors import EvaluationError
from stratavit.evaluation.evaluations import EVALUATIONS
from stratavit.evaluation.metrics_csv import read_metrics
from stratavit.evaluation.protocol import Column, ComparePlot
from stratavit.evaluation.tables import dig, fmt, integer, md_escape, md_table, number
from stratavit.run_folder import EvalFolder, RunFolder

__all__ = ["COLUMNS", "PLOTS", "column_names", "compare_runs", "evaluation_columns", "plot_names"]

log = logging.getLogger(__name__)

CSV_NAME = "compare.csv"
MD_NAME = "compare.md"

IDENTITY_COLUMNS = ("label", "run_dir", "recipe")
RUN_COLUMNS = ("images_per_s", "wall_time_s", "steps", "epochs")  # from run.json
DATA_COLUMNS = ("eval_train", "eval_test", "eval_train_images", "eval_test_images")  # from results meta
FLAG_COLUMN = "not_comparable"  # which of the row's numbers are flagged, and why
_RUN_BEST = (("images_per_s", "throughput (img/s)", True), ("wall_time_s", "wall time (shortest)", False))
_OWN_PLOTS = {"headline": "compare_headline.png", "loss": "compare_loss.png", "throughput": "compare_throughput.png"}


def evaluation_columns() -> list[Column]:
    """The registered evaluations' columns, grouped: metrics, baselines, settings."""
    cols = [c for e in EVALUATIONS for c in e.columns()]
    return [c for group in ("metric", "baseline", "setting") for c in cols if c.group == group]


def column_names() -> tuple[str, ...]:
    """Column order of compare.csv (and of the rows returned by compare_runs)."""
    cols = evaluation_columns()

    def names(group: str) -> list[str]:
        return [c.name for c in cols if c.group == group]

    return (*IDENTITY_COLUMNS, *names("metric"), *names("baseline"), *RUN_COLUMNS, *DATA_COLUMNS, *names("setting"),
            FLAG_COLUMN)


def per_block_plots() -> list[ComparePlot]:
    """The registered evaluations' overlaid per-block plots, in their order."""
    return sorted((p for e in EVALUATIONS for p in e.compare_plots), key=lambda p: p.order)


def plot_names() -> dict[str, str]:
    """File names of the plots, by kind."""
    return {**{p.kind: p.png for p in per_block_plots()}, **_OWN_PLOTS}


COLUMNS: tuple[str, ...] = column_names()
"""The columns with the built-in evaluations (:func:`compare_runs` asks the registry again)."""
PLOTS: dict[str, str] = plot_names()
"""The plots with the built-in evaluations, by kind."""


# --------------------------------------------------------------------------- #
# reading a run folder
# --------------------------------------------------------------------------- #
def _read_config_recipe(run_dir: Path) -> str | None:
    path = RunFolder(run_dir).config
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
    path = EvalFolder(run_dir / eval_subdir).results
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
    path = RunFolder(run_dir).summary
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
        if not run_dir.is_dir() or not RunFolder(run_dir).config.is_file():
            raise EvaluationError(
                f"{run_dir} is not a stratavit run folder (no config.yaml); "
                "pass the --out folder of `stratavit pretrain`"
            )
        self.config_recipe = _read_config_recipe(run_dir)
        self.results = _read_results(run_dir, eval_subdir)
        self.summary = _read_run_json(run_dir)
        self.loss = _read_loss(RunFolder(run_dir).metrics)

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

    def row(self, label: str, columns: Sequence[Column], names: Sequence[str]) -> dict[str, Any]:
        meta = self.meta
        values: dict[str, Any] = {"label": label, "run_dir": str(self.dir), "recipe": self.recipe}
        values.update({c.name: c.read(self.results) for c in columns})
        values.update({
            "images_per_s": number(self.training("images_per_s")),
            "wall_time_s": number(self.training("wall_time_s")),
            "steps": integer(self.training("global_step", "steps")),
            "epochs": integer(self.training("epochs_completed", "epochs")),
            "eval_train": None if meta.get("train") is None else str(meta["train"]),
            "eval_test": None if meta.get("test") is None else str(meta["test"]),
            "eval_train_images": integer(meta.get("train_images")),
            "eval_test_images": integer(meta.get("test_images")),
            FLAG_COLUMN: None,
        })
        return {name: values[name] for name in names}


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


def _data_warnings(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> list[str]:
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
    for col in columns:
        if col.must_agree is None:
            continue
        what, short = col.must_agree
        given = [r for r in rows if r[col.name] is not None]
        if len({r[col.name] for r in given}) > 1:
            warnings.append(
                f"**Warning:** {what} ("
                + ", ".join(f"{md_escape(r['label'])}: {short}={r[col.name]}" for r in given)
                + ")."
            )
    return warnings


def _best_runs(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], flags: Flags
) -> list[tuple[str, list[str], float]]:
    """``(metric name (with its not-comparable marker), labels of the best runs (ties), value)`` for every
    metric some run has."""
    metrics = [(c.name, c.best[0] + (f" {flags.markers[c.name]}" if c.name in flags.markers else ""), c.best[1])
               for c in columns if c.best is not None and c.group == "metric"]
    out = []
    for col, name, higher in [*metrics, *_RUN_BEST]:
        values = [(r["label"], r[col]) for r in rows if r[col] is not None]
        if not values:
            continue
        best = (max if higher else min)(v for _, v in values)
        out.append((name, [lab for lab, v in values if v == best], best))
    return out


def _best_sentence(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], flags: Flags) -> str:
    best = _best_runs(rows, columns, flags)
    if not best:
        return "No run has evaluation metrics to rank."
    parts = []
    for name, labels, value in best:
        who = " and ".join(f"**{md_escape(lab)}**" for lab in labels)
        parts.append(f"{name}: {who} ({fmt(value)})")
    return "Best run per metric: " + "; ".join(parts) + "."


# --------------------------------------------------------------------------- #
# outputs
# --------------------------------------------------------------------------- #
def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _write_csv(rows: Sequence[Mapping[str, Any]], names: Sequence[str], path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(names)
        for row in rows:
            writer.writerow([_csv_cell(row[c]) for c in names])
    return path


def _md_rows(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], flags: Flags
) -> tuple[list[str], list[list[Any]]]:
    shown = [c for c in columns if c.header is not None and c.group == "metric"]
    header = ["run", "recipe", *(c.header for c in shown), "img/s", "wall time (s)", "steps", "epochs",
              "eval data (train → test)"]
    table = []
    for r in rows:
        data = None
        if r["eval_train"] is not None or r["eval_test"] is not None:
            data = f"{r['eval_train'] or '?'} → {r['eval_test'] or '?'}"
        table.append([
            md_escape(r["label"]),
            None if r["recipe"] is None else md_escape(r["recipe"]),
            *(flags.cell(c.name, r[c.name], c.cell(r) if c.cell is not None else None) for c in shown),
            r["images_per_s"], r["wall_time_s"], r["steps"], r["epochs"],
            None if data is None else md_escape(data),
        ])
    return header, table  # type: ignore[return-value]


def _write_markdown(
    out_dir: Path,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[Column],
    plots: Mapping[str, Path],
    warnings: Sequence[str],
    title: str,
    eval_subdir: str,
    flags: Flags,
) -> Path:
    parts = [f"# {title}"]
    parts.append(
        f"{len(rows)} run{'s' if len(rows) != 1 else ''} compared (evaluation read from "
        f"`RUN/{eval_subdir}/results.json`; accuracies in %; \"–\" = not measured). "
        f"The same numbers are in [{CSV_NAME}]({CSV_NAME})."
    )
    parts.extend(warnings)
    header, table = _md_rows(rows, columns, flags)
    parts.append("## Results\n\n" + md_table(header, table))
    if flags.footnotes:
        parts.append("\n\n".join(note.markdown() for note in flags.footnotes))
    parts.append(_best_sentence(rows, columns, flags))
    parts.append(
        "## Runs\n\n" + "\n".join(f"- **{md_escape(r['label'])}**: `{r['run_dir']}`" for r in rows)
    )
    captions = {
        "headline": "Headline metrics",
        **{p.kind: p.caption for p in per_block_plots()},
        "loss": "Training loss (total; the losses of different recipes are on different scales)",
        "throughput": "Throughput and wall time",
    }
    marked = {p.kind: flags.markers[p.column] for p in per_block_plots() if p.column in flags.markers}
    if flags.markers:
        captions["headline"] += " (" + ", ".join(sorted(set(flags.markers.values()))) + ": not comparable, see above)"
    for kind, marker in marked.items():
        captions[kind] += f" ({marker}: not comparable, see above)"
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
        "markdown": Path, "plots": {kind: Path}, "warnings": [markdown text, ...],
        "flags": [one line per footnote of numbers that are not comparable, then per warning
        of a run's evaluation (``meta.warnings``), ...]}``.

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
    columns, names = evaluation_columns(), column_names()
    labels_ = list(labels) if labels is not None else _default_labels(runs)
    rows = [run.row(name, columns, names) for run, name in zip(runs, labels_)]
    flags = flag_columns([(lab, run.results) for lab, run in zip(labels_, runs)], rows, columns)
    for row in rows:
        row[FLAG_COLUMN] = flags.csv_note(row)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = _write_csv(rows, names, out_dir / CSV_NAME)
    files = plot_names()
    plots: dict[str, Path] = {}

    def add(kind: str, png: Path | None) -> None:
        if png is not None:
            plots[kind] = png

    bars = [(c.name, f"{c.bar} {flags.markers[c.name]}" if c.name in flags.markers else c.bar) for c in columns if c.bar]
    add("headline", plot_headline(rows, bars, out_dir / files["headline"]))  # type: ignore[arg-type]
    for spec in per_block_plots():
        plot_title = spec.title + (f" ({flags.markers[spec.column]}: not comparable)" if spec.column in flags.markers else "")
        add(spec.kind, plot_per_block(runs, labels_, out_dir / spec.png, spec.curves, plot_title, spec.ylabel))
    add("loss", plot_loss(runs, labels_, out_dir / files["loss"]))
    add("throughput", plot_throughput(rows, out_dir / files["throughput"]))

    flagged = run_warnings([(lab, run.results) for lab, run in zip(labels_, runs)])
    warnings = _data_warnings(rows, columns) + [f"**Warning ({md_escape(lab)}):** {md_escape(w)}" for lab, w in flagged]
    md_path = _write_markdown(out_dir, rows, columns, plots, warnings, title, eval_subdir, flags)
    return {
        "columns": list(names),
        "rows": rows,
        "csv": csv_path,
        "markdown": md_path,
        "plots": plots,
        "warnings": warnings,
        "flags": [note.line() for note in flags.footnotes] + [f"{lab}: {w}" for lab, w in flagged],
    }
