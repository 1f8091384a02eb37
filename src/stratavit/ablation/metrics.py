"""The numbers an ablation compares, read from one run: its ``eval/results.json`` and ``run.json``.

Evaluation metrics are every **per-block** number of ``results.json``: the classification probes'
``layers`` (``knn_top1``, ``linear_top1`` on the CLS token, ``*_patch`` on the mean patch token)
and the ``layers`` of every other section (``dense``: ``miou``, ``pixel_acc``; ``correspondence``:
``top1``, ``exact``; a new evaluation's per-block numbers the same way). The headline entries
(``knn.top1``, ``dense.miou``, ...) repeat the last block and are not listed twice; ``chance``
(a reference, not a measurement), settings and the baselines are left out. Sections measured once
rather than per block (``detection``: ``ap``, ``ap50``, ``ap75``; ``knn_concat_best``: ``top1``) give
their numbers as they are. Every evaluation metric is higher-is-better.

Training metrics come from ``run.json``: throughput (images/s), optimiser steps done and wall
time; they are reported with ``higher`` / ``lower`` rather than judged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stratavit.evaluation.tables import number

__all__ = ["EVALUATION", "TRAINING", "Metric", "metric", "run_metrics"]

EVALUATION = "evaluation"
TRAINING = "training"
_NOT_METRICS = frozenset({"block", "chance", "available_patches", "loss_size"})
"""Per-block entries that are settings or references, not measurements."""
_SECTION_METRICS = {"detection": ("ap", "ap50", "ap75"), "knn_concat_best": ("top1",)}
"""Sections measured once, not per block: the numbers of each that are metrics."""
_SKIP_SECTIONS = frozenset({"meta", "baselines", "layers"})
_LABELS = {
    "knn_top1": "kNN top-1 CLS (%)",
    "knn_top1_patch": "kNN top-1 mean patch (%)",
    "linear_top1": "linear top-1 CLS (%)",
    "linear_top1_patch": "linear top-1 mean patch (%)",
    "dense.miou": "dense mIoU (%)",
    "dense.pixel_acc": "dense pixel acc. (%)",
    "correspondence.top1": "correspondence top-1 (%)",
    "correspondence.exact": "correspondence exact (%)",
    "retrieval.miou": "dense retrieval mIoU (%)",
    "retrieval.pixel_acc": "dense retrieval pixel acc. (%)",
    "detection.ap": "detection AP (%)",
    "detection.ap50": "detection AP50 (%)",
    "detection.ap75": "detection AP75 (%)",
    "knn_concat_best.top1": "kNN top-1, best multi-block CLS (%)",
    "train.images_per_s": "training throughput (images/s)",
    "train.steps": "training steps done",
    "train.wall_time_s": "training wall time (s)",
}
_TRAINING = (("train.images_per_s", "images_per_s"), ("train.steps", "global_step"), ("train.wall_time_s", "wall_time_s"))


@dataclass(frozen=True)
class Metric:
    """One compared number: ``key`` (``knn_top1.block2``), its ``family`` (``knn_top1``) and block."""

    key: str
    family: str
    block: int | None
    group: str = EVALUATION
    higher_is_better: bool = True

    @property
    def family_label(self) -> str:
        return _LABELS.get(self.family, self.family.replace(".", " "))

    @property
    def label(self) -> str:
        return self.family_label + (f", block {self.block}" if self.block is not None else "")


def metric(key: str) -> Metric:
    """The :class:`Metric` of a key written by :func:`run_metrics` (``dense.miou.block4``, ``train.steps``)."""
    family, _, last = key.rpartition(".")
    if family and last.startswith("block") and last[5:].isdigit():
        return Metric(key, family, int(last[5:]))
    return Metric(key, key, None, TRAINING if key.startswith("train.") else EVALUATION)


def _per_block(layers: Any, prefix: str, out: dict[str, float]) -> None:
    if not isinstance(layers, list):
        return
    for entry in layers:
        if not isinstance(entry, Mapping) or number(entry.get("block")) is None:
            continue
        block = int(entry["block"])
        for name, value in entry.items():
            if name not in _NOT_METRICS and number(value) is not None:
                out[f"{prefix}{name}.block{block}"] = float(value)


def _ordered(values: dict[str, float]) -> dict[str, float]:
    """Grouped by family (first-seen order), blocks ascending within a family."""
    families: dict[str, list[str]] = {}
    for key in values:
        families.setdefault(metric(key).family, []).append(key)
    return {k: values[k] for keys in families.values() for k in sorted(keys, key=lambda k: metric(k).block or 0)}


def run_metrics(results: Mapping[str, Any] | None, summary: Mapping[str, Any] | None) -> dict[str, float]:
    """``{metric key: value}`` of one run from its ``results.json`` and ``run.json`` (either may be None).

    Keys: ``knn_top1.block2`` (top-level ``layers``), ``dense.miou.block2`` (a section's ``layers``),
    ``train.images_per_s``, ``train.steps``, ``train.wall_time_s``.
    """
    out: dict[str, float] = {}
    if results:
        _per_block(results.get("layers"), "", out)
        for section, part in results.items():
            if section not in _SKIP_SECTIONS and isinstance(part, Mapping):
                _per_block(part.get("layers"), f"{section}.", out)
                for name in _SECTION_METRICS.get(section, ()):
                    if number(part.get(name)) is not None:
                        out[f"{section}.{name}"] = float(part[name])
    out = _ordered(out)
    for key, field in _TRAINING:
        value = number((summary or {}).get(field))
        if value is not None:
            out[key] = value
    return out
