"""Evaluation options: dotted overrides over the CLI flags, validated with one-line errors."""

from __future__ import annotations

import pytest

from stratavit.config import ConfigError
from stratavit.evaluation.errors import EvaluationError
from stratavit.evaluation.evaluations import option_sections
from stratavit.evaluation.options import build_options, parse_overrides


def _options(*overrides: str, base: dict | None = None):
    return build_options(option_sections(), parse_overrides(list(overrides), base))


def test_defaults_are_the_flags_defaults():
    o = _options()
    assert (o.batch_size, o.resize, o.which, o.baselines, o.visuals, o.seed) == (256, "center_crop", "teacher",
                                                                                 False, True, 0)
    assert (o.knn.k, o.knn.temperature, o.linear.epochs, o.correspondence.images) == (20, 0.07, 100, 200)
    assert o.dense.train is None and o.dense.blocks is None


def test_overrides_set_sections_and_win_over_flags():
    flags = {"batch_size": 64, "linear": {"epochs": 5}, "dense": {"train": "a", "val": "b", "blocks": [1]}}
    o = _options("linear.epochs=50", "dense.blocks=[2,4]", "knn.k=10", "img_size=48", base=flags)
    assert (o.linear.epochs, o.dense.blocks, o.knn.k, o.img_size, o.batch_size) == (50, [2, 4], 10, 48, 64)
    assert (o.dense.train, o.dense.val) == ("a", "b")
    assert _options("dense.train=x", "dense.val=y", "dense.blocks=-1").dense.blocks == [-1]
    assert _options().to_dict()["knn"] == {"k": 20, "temperature": 0.07, "concat_last": [2, 4]}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("knn.kk=3", "unknown config key 'knn.kk'. Did you mean 'k'? Allowed here: concat_last, k, temperature"),
        ("foo=1", "unknown evaluation option 'foo'. Allowed: baselines, batch_size"),
        ("knn=3", "'knn' is a section"),
        ("knn.k=abc", "knn.k: expected an integer"),
        ("resize=crop", "not allowed; choose one of ['center_crop', 'stretch']"),
        ("knn.k.x=1", "evaluation options are 'key=value' or 'section.key=value'"),
    ],
)
def test_bad_overrides_fail_in_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        _options(override)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_dense_probe_needs_both_folders():
    with pytest.raises(EvaluationError, match="--dense-val"):
        _options("dense.train=x")
