"""The unit of extension of ``stratavit evaluate``: an :class:`Evaluation`, and what it is given.

An evaluation measures something about a frozen backbone, block by block. It declares

* ``name`` and its option ``sections`` (dataclasses, set as dotted overrides: ``knn.k=10``);
* :meth:`Evaluation.check`: pre-flight checks of its options, run before any feature is extracted;
* :meth:`Evaluation.run`: the measurement on one model (the pre-trained backbone, then the random
  init baseline), returning a typed :class:`Result` that writes its own part of ``results.json``;
* what it adds to the report (a Markdown section, headline columns, per-block panels, pictures)
  and to ``stratavit compare`` (table columns, per-block plots) -- each read back from
  ``results.json`` under the evaluation's own keys.

The built-in evaluations live in :mod:`stratavit.evaluation.evaluations`; a new one is one file and
one entry of :data:`stratavit.evaluation.evaluations.EVALUATIONS` (see ``docs/adding-an-evaluation.md``).
Pieces that appear among other evaluations' pieces carry an ``order`` (built-ins use 10, 20, ...;
the default 100 puts a new one after them).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from stratavit.config import Config
from stratavit.evaluation.features import BlockFeatures, extract_block_features
from stratavit.evaluation.options import Options
from stratavit.run_folder import EvalFolder, RunFolder

__all__ = [
    "Column",
    "ComparePlot",
    "Context",
    "Evaluation",
    "Figure",
    "HeadlineColumn",
    "Panel",
    "Result",
    "cache_name",
]


def cache_name(*parts: Any) -> str:
    """A short stable folder name for a cache keyed by ``parts``."""
    return hashlib.sha1(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


class Result:
    """What :meth:`Evaluation.run` returns: a typed result that writes its part of ``results.json``."""

    def entries(self) -> dict[str, Any]:
        """Top-level entries of ``results.json`` (e.g. ``{"dense": {...}}``), in order."""
        raise NotImplementedError

    def baseline_entries(self) -> dict[str, Any]:
        """Entries under ``baselines.random_init`` when this result is the random-init backbone's."""
        return self.entries()


@dataclass
class Context:
    """What an evaluation's :meth:`~Evaluation.run` is given besides the model.

    ``train`` / ``test``: the labelled sets as given (``train_ds`` / ``test_ds``: read at ``size``).
    ``train_size``: the run's training resolution (what ``size`` defaults to).
    ``model_label`` / ``model_tag``: which model is being evaluated (``"teacher"``, ``"random init"``)
    and a cache key of its weights. ``shared`` is one dict for the whole evaluation (data read once
    and used for both models); ``timings`` collects ``"<model label> <what>"`` seconds for ``meta``;
    ``warnings`` the one-line warnings of the whole evaluation (:meth:`warn`), shared too.
    """

    run: RunFolder
    out: EvalFolder
    train: str
    test: str
    cfg: Config
    options: Options
    size: int
    train_ds: Dataset
    test_ds: Dataset
    data_key: tuple
    train_size: int = 0
    model_label: str = ""
    model_tag: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    shared: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def warn(self, text: str) -> None:
        """Record a one-line warning for ``meta.warnings`` and the report, and print it now (once)."""
        if text not in self.warnings:
            self.warnings.append(text)
            print(f"warning: {text}", file=sys.stderr, flush=True)

    def for_model(self, label: str, tag: str) -> Context:
        """The same context for another model (``timings`` and ``shared`` stay shared)."""
        return replace(self, model_label=label, model_tag=tag)

    @contextmanager
    def timed(self, what: str) -> Iterator[None]:
        """Record the seconds of the block as ``timings["<model label> <what>"]``."""
        t0 = time.time()
        yield
        self.timings[f"{self.model_label} {what}"] = round(time.time() - t0, 1)

    def features(self, model: nn.Module) -> tuple[BlockFeatures, BlockFeatures]:
        """Pooled CLS / mean-patch features of every block, train and test split, of this context's model.

        Extracted once per model (cached on disk under ``OUT/cache``, keyed by the weights, the
        data and the resolution) and shared by every evaluation that asks.
        """
        key = ("features", self.model_tag)
        if key not in self.shared:
            o = self.options
            with self.timed("features"):
                self.shared[key] = tuple(
                    extract_block_features(
                        model, ds, batch_size=o.batch_size, num_workers=o.num_workers,
                        desc=f"{self.model_label} features ({split})",
                        cache_dir=self.out.cache / cache_name(self.model_tag, split, *self.data_key),
                    )
                    for ds, split in ((self.train_ds, "train"), (self.test_ds, "test"))
                )
        return self.shared[key]


@dataclass(frozen=True)
class HeadlineColumn:
    """A column of the report's headline table: ``read(results)`` for the model, ``read_baseline(entry)``
    for a baseline entry (``results["baselines"][name]``). ``always``: shown even without a value."""

    label: str
    read: Callable[[Mapping[str, Any]], Any]
    read_baseline: Callable[[Mapping[str, Any]], Any]
    always: bool = False


@dataclass(frozen=True)
class Panel:
    """A per-block panel of the report's ``layer_panels.png``: ``(curve label or None for the global
    feature's name, results part holding ``layers`` or None for the top level, value key)`` curves."""

    title: str
    ylabel: str
    curves: tuple[tuple[str | None, str | None, str], ...]
    order: float = 100


@dataclass(frozen=True)
class Figure:
    """A picture of the report: its caption, the PNG, and where it goes among the others."""

    caption: str
    png: Path
    order: float = 100


@dataclass(frozen=True)
class Column:
    """A column of ``stratavit compare``'s table, read from one run's ``results.json``.

    Args:
        name: the CSV column.
        read: ``results -> value`` (None when the run lacks it).
        group: ``"metric"`` (after the recipe), ``"baseline"`` (after the metrics) or ``"setting"``
            (last): where the column goes in ``compare.csv``.
        header: the ``compare.md`` header (None: CSV only); ``cell(row)`` the Markdown cell (default
            the value).
        best: ``(readable name, higher is better)`` to rank the runs in the "best run" sentence.
        bar: legend name of a bar in the headline chart.
        must_agree: ``(what, short name)``: warn when runs differ in this setting.
        basis: ``results -> {setting name: value}``: what the number depends on besides the model
            (data, classes, size, protocol). ``compare`` flags the column's cells where two runs'
            bases differ (a value of None is unknown and never differs); see
            :mod:`stratavit.evaluation.comparability` for the built-in bases.
    """

    name: str
    read: Callable[[Mapping[str, Any]], Any]
    group: str = "metric"
    header: str | None = None
    cell: Callable[[Mapping[str, Any]], Any] | None = None
    best: tuple[str, bool] | None = None
    bar: str | None = None
    must_agree: tuple[str, str] | None = None
    basis: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None


@dataclass(frozen=True)
class ComparePlot:
    """An overlaid per-block plot of ``stratavit compare``: ``(legend suffix, results path to the
    per-block list, value key)`` curves, the first solid, the others dashed. ``column``: the
    :class:`Column` whose comparability flag the plot's title and caption carry."""

    kind: str
    png: str
    caption: str
    title: str
    ylabel: str
    curves: tuple[tuple[str, tuple[str, ...], str], ...]
    order: float = 100
    column: str | None = None


class Evaluation:
    """Base class of an evaluation; override what yours needs (see the module docstring)."""

    name: str = ""
    sections: Mapping[str, type] = {}
    """Option sections (dataclasses with defaults) this evaluation reads, by override prefix."""
    panels: tuple[Panel, ...] = ()
    compare_plots: tuple[ComparePlot, ...] = ()

    def enabled(self, options: Options) -> bool:
        """Whether to run it with these options (default: always)."""
        return True

    def check(self, model: nn.Module, size: int, cfg: Config, options: Options) -> Any:
        """Pre-flight checks before any feature is extracted; raise EvaluationError. Returns a plan for :meth:`run`."""
        return None

    def run(self, model: nn.Module, ctx: Context, plan: Any) -> Result:
        """Measure ``model`` (at the evaluation size); per-block results."""
        raise NotImplementedError

    def extra_baselines(self, ctx: Context) -> dict[str, Any]:
        """Baselines besides the random-init backbone (e.g. raw pixels), by name."""
        return {}

    def figures(self, model: nn.Module, ctx: Context, result: Result, out_dir: Path) -> list[Figure]:
        """The report's pictures of this evaluation (only with visuals on)."""
        return []

    def headline(self) -> list[HeadlineColumn]:
        """Columns of the report's headline table."""
        return []

    def report_section(self, results: Mapping[str, Any], out_dir: Path) -> str | None:
        """The report's Markdown section of this evaluation (None when ``results`` lacks it)."""
        return None

    def summary(self, results: Mapping[str, Any]) -> dict[str, float]:
        """The numbers ``stratavit evaluate`` prints on its last lines."""
        return {}

    def settings_line(self, results: Mapping[str, Any]) -> str | None:
        """One line of what the measurement used (images, size, steps ...), printed by ``stratavit
        evaluate`` and shown in the report (None: nothing to say)."""
        return None

    def columns(self) -> list[Column]:
        """Columns of ``stratavit compare``'s table."""
        return []
