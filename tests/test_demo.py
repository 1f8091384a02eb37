"""`stratavit demo` as a user calls it, with training and evaluation stubbed: what it asks for and prints.

The real demo runs end to end in `make demo` (and its numbers are in README.md); here only the wiring.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import stratavit.engine.train as train_mod
import stratavit.evaluation.run as run_mod
from stratavit.cli import main
from stratavit.demo import DEMO_DETECTION, DEMO_RETRIEVAL


def _results(detection: bool) -> dict[str, Any]:
    part = {"dense": {"miou": 67.0}, "retrieval": {"miou": 66.0}, "correspondence": {"top1": 50.0}}
    res: dict[str, Any] = {"knn": {"top1": 33.0}, "linear": {"top1": 37.0}, **part, "meta": {}}
    rand: dict[str, Any] = {"knn_top1": 28.0, "linear_top1": 32.0, **part}
    if detection:
        res["detection"] = {"ap": 50.7}
        rand["detection"] = {"ap": 50.3}
    res["baselines"] = {"random_init": rand, "raw_pixels": {"knn_top1": 39.1, "linear_top1": 34.1}}
    return res


@pytest.mark.parametrize("flag", [False, True])
def test_demo_passes_its_evaluations_and_prints_them(tmp_path, monkeypatch, capsys, flag):
    calls: dict[str, Any] = {}

    def fake_pretrain(recipe: str, data: str, out: Path, overrides: list[str]) -> Path:
        (Path(out) / "eval").mkdir(parents=True, exist_ok=True)
        calls["overrides"] = overrides
        return Path(out)

    def fake_evaluate(out: Path, **kwargs: Any) -> dict[str, Any]:
        calls["evaluate"] = kwargs
        return _results("detection" in kwargs)

    monkeypatch.setattr(train_mod, "pretrain", fake_pretrain)
    monkeypatch.setattr(run_mod, "evaluate_run", fake_evaluate)
    argv = ["demo", "--out", str(tmp_path / "demo"), *(["--detection"] if flag else [])]
    assert main(argv) == 0
    kwargs = calls["evaluate"]
    assert kwargs["retrieval"] == DEMO_RETRIEVAL and kwargs["dense_size"] == 64 and kwargs["baselines"] is True
    assert ("detection" in kwargs) == flag and (not flag or kwargs["detection"] == DEMO_DETECTION)
    out = capsys.readouterr().out
    assert "retrieval mIoU %" in out and "report.html" in out
    assert ("detection AP %" in out) == flag
    if flag:
        assert "50.70" in out and "50.30" in out
