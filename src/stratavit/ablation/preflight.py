"""Everything an ablation can check before its first run starts, so a mistake costs seconds, not a
run's budget: every recipe's config with the plan's overrides (unknown keys, wrong values, the
budget key), the evaluation options, and the data: the training set and the labelled evaluation
sets exist and hold images, the dense probe's folders have the ``images/`` + ``masks/`` layout."""

from __future__ import annotations

from pathlib import Path

from stratavit.ablation.errors import AblationError
from stratavit.ablation.plan import Plan
from stratavit.config import ConfigError
from stratavit.data.datasets import NAMED_DATASETS, SAMPLE_NAME, build_dataset, segmentation_root
from stratavit.data.errors import DataError
from stratavit.evaluation.errors import EvaluationError
from stratavit.evaluation.evaluations import option_sections
from stratavit.evaluation.options import Options, build_options
from stratavit.evaluation.segmentation_data import SegmentationFolder
from stratavit.recipe import resolve_config

__all__ = ["preflight"]


def _check_images(flag: str, spec: str) -> None:
    """A folder (or shard folder) that exists and holds images; named sets are left to their loader."""
    if spec.partition(":")[0] in (*NAMED_DATASETS, SAMPLE_NAME) and not Path(spec).exists():
        return
    try:
        build_dataset(spec)
    except DataError as e:
        raise AblationError(f"{flag}: {e}") from None


def _check_dense(flag: str, spec: str | None) -> None:
    if spec is None:
        return
    try:
        SegmentationFolder(segmentation_root(spec), size=16)
    except (DataError, EvaluationError) as e:
        raise AblationError(f"{flag}: {e}") from None


def preflight(plan: Plan) -> Options:
    """Check ``plan`` before any run; returns the evaluation options every run gets.

    Raises:
        ConfigError / AblationError: one line saying what is wrong and what to do.
    """
    for recipe in plan.recipes:
        try:
            resolve_config(recipe, plan.train_overrides(plan.seeds[0]))
        except ConfigError as e:
            raise AblationError(str(e) if recipe in str(e) else f"recipe {recipe}: {e}") from None
    options = build_options(option_sections(), plan.eval_options)
    _check_images("--data", plan.data)
    _check_images("--eval-train", plan.eval_train)
    _check_images("--eval-test", plan.eval_test)
    _check_dense("--dense-train", options.dense.train)
    _check_dense("--dense-val", options.dense.val)
    return options
