"""A new evaluation is one class and one registry entry: it shows up in results.json, the report and compare.

The example ("mean CLS norm per block") is the one docs/adding-an-evaluation.md walks through.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import TINY
from torch import nn

from stratavit.cli import main
from stratavit.engine.train import pretrain
from stratavit.evaluation.compare import compare_runs
from stratavit.evaluation.evaluations import EVALUATIONS, register
from stratavit.evaluation.protocol import (
    Column,
    Context,
    Evaluation,
    HeadlineColumn,
    Result,
)
from stratavit.evaluation.run import evaluate_run
from stratavit.evaluation.tables import dig, md_table, number


# 1. its options (a section of dotted overrides: mean_norm.decimals=2)
@dataclass
class MeanNormOptions:
    decimals: int = 4


# 2. its typed result, which writes its own part of results.json
@dataclass
class MeanNormBlock:
    block: int
    norm: float


@dataclass
class MeanNormResult(Result):
    layers: list[MeanNormBlock]

    def entries(self) -> dict[str, Any]:
        return {"mean_norm": {"last": self.layers[-1].norm, "layers": [vars(b) for b in self.layers]}}


# 3. the evaluation: run it, show it in the report, add a column to compare
class MeanClsNorm(Evaluation):
    name = "mean_norm"
    sections = {"mean_norm": MeanNormOptions}

    def run(self, model: nn.Module, ctx: Context, plan: Any) -> MeanNormResult:
        _, test = ctx.features(model)  # the pooled features every evaluation shares (cached)
        digits = ctx.options.mean_norm.decimals
        return MeanNormResult([MeanNormBlock(i + 1, round(float(cls.norm(dim=1).mean()), digits))
                               for i, cls in enumerate(test.cls)])

    def headline(self) -> list[HeadlineColumn]:
        return [HeadlineColumn("mean CLS norm", lambda r: dig(r, "mean_norm", "last"),
                               lambda b: dig(b, "mean_norm", "last"))]

    def report_section(self, results: Mapping[str, Any], out_dir: Path) -> str | None:
        rows = dig(results, "mean_norm", "layers")
        if not rows:
            return None
        return "## Mean CLS norm\n\n" + md_table(["block", "norm"], [[r["block"], r["norm"]] for r in rows])

    def columns(self) -> list[Column]:
        return [Column("mean_cls_norm", lambda r: number(dig(r, "mean_norm", "last")), header="mean CLS norm")]


@pytest.fixture
def registered() -> Iterator[None]:
    saved = list(EVALUATIONS)
    register(MeanClsNorm())  # 4. one list entry
    yield
    EVALUATIONS[:] = saved


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, cifar_train: Path) -> Path:
    small = ["objectives.infonce.proj_hidden_dim=64", "objectives.infonce.pred_hidden_dim=64",
             "objectives.infonce.proj_dim=32", "train.max_steps=2"]
    return pretrain("mocov3", str(cifar_train), tmp_path_factory.mktemp("runs") / "run", [*TINY, *small])


def test_a_registered_evaluation_reaches_results_report_and_compare(
    registered: None, tiny_run: Path, cifar_train: Path, cifar_test: Path, tmp_path: Path
) -> None:
    results = evaluate_run(
        tiny_run, str(cifar_train), str(cifar_test), tiny_run / "eval-ext", train_limit=40, test_limit=20,
        linear_epochs=2, correspondence_images=0, visuals=False, mean_norm={"decimals": 3},
    )
    saved = json.loads((tiny_run / "eval-ext" / "results.json").read_text())
    assert saved == results and list(saved)[-2:] == ["mean_norm", "meta"]  # after the built-ins, before meta
    layers = saved["mean_norm"]["layers"]
    assert [r["block"] for r in layers] == [1, 2] and all(r["norm"] > 0 for r in layers)
    assert saved["mean_norm"]["last"] == layers[-1]["norm"]
    report = (tiny_run / "eval-ext" / "report.md").read_text()
    assert "## Mean CLS norm" in report and "| mean CLS norm |" in report
    assert report.index("## Per-block evaluation") < report.index("## Mean CLS norm") < report.index("## Training loss")

    out = compare_runs([tiny_run], tmp_path / "cmp", eval_subdir="eval-ext")
    assert "mean_cls_norm" in out["columns"] and out["rows"][0]["mean_cls_norm"] == layers[-1]["norm"]
    with (tmp_path / "cmp" / "compare.csv").open() as fh:
        assert float(next(csv.DictReader(fh))["mean_cls_norm"]) == layers[-1]["norm"]
    assert "mean CLS norm" in (tmp_path / "cmp" / "compare.md").read_text()


def test_its_options_are_dotted_overrides(
    registered: None, tiny_run: Path, cifar_train: Path, cifar_test: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    common = ["evaluate", str(tiny_run), "--train", str(cifar_train), "--test", str(cifar_test), "--train-limit", "40",
              "--test-limit", "20", "--linear-epochs", "2", "--correspondence", "0", "--no-visuals"]
    assert main([*common, "--out", str(tmp_path / "e"), "mean_norm.decimals=1", "knn.k=5"]) == 0
    saved = json.loads((tmp_path / "e" / "results.json").read_text())
    assert saved["knn"]["k"] == 5 and all(r["norm"] == round(r["norm"], 1) for r in saved["mean_norm"]["layers"])
    assert main([*common, "--out", str(tmp_path / "bad"), "mean_norm.digits=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown config key 'mean_norm.digits'" in err and "decimals" in err
