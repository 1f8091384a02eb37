"""`stratavit ablate` as a user calls it.

The fast tests replace training and evaluation by fakes that write what they write (run.json,
backbone.safetensors, eval/results.json), so the orchestration (the grid, resume, failures, a changed
plan, bad input) is checked in seconds; the slow test runs the real thing on tiny settings.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import TINY
from PIL import Image

import stratavit.ablation.run as ablation_run
from stratavit.ablation.metrics import metric, run_metrics
from stratavit.ablation.plan import Plan, budget_words, build_plan
from stratavit.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A tiny labelled ImageFolder: 2 classes × 4 images of 32 px."""
    root = tmp_path_factory.mktemp("images")
    for c, colour in enumerate(((200, 30, 30), (30, 30, 200))):
        (root / f"class{c}").mkdir()
        for i in range(4):
            Image.new("RGB", (32, 32), tuple(v + 5 * i for v in colour)).save(root / f"class{c}" / f"{i}.png")
    return root


def _score(recipe: str, seed: int, block: int) -> dict[str, float]:
    """Fake per-block numbers: mcvt beats mocov3 on kNN by 5 + 0.5·seed on every seed (paired: better),
    linear differs by +1, -5, +5 (inconclusive), correspondence is the same (identical)."""
    knn = 30.0 + 3 * seed + block + (5 + 0.5 * seed if recipe == "mcvt" else 0.0)
    linear = 40.0 + ((1, -1, 3, 0) if recipe == "mcvt" else (0, 4, -2, 0))[seed]
    return {"knn_top1": knn, "linear_top1": linear}


class Fakes:
    """Stand-ins for pretrain and evaluate that record their calls; ``fail``: (recipe, seed) to raise on."""

    def __init__(self) -> None:
        self.trained: list[tuple[str, int]] = []
        self.evaluated: list[tuple[str, int]] = []
        self.overrides: list[list[str]] = []
        self.options: list = []
        self.fail: set[tuple[str, int]] = set()

    def pretrain(self, recipe, data, out, overrides):
        seed = int(next(o for o in overrides if o.startswith("train.seed=")).split("=")[1])
        if (recipe, seed) in self.fail:
            raise RuntimeError("CUDA out of memory (fake)")
        self.trained.append((recipe, seed))
        self.overrides.append(list(overrides))
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(f"recipe: {recipe}\n")
        (out / "backbone.safetensors").write_bytes(b"weights")
        steps = int(next(o for o in overrides if o.startswith("train.max_steps=")).split("=")[1])
        summary = {"recipe": recipe, "global_step": steps, "wall_time_s": 10.0 + seed, "images_per_s": 100.0 + seed}
        if recipe == "mcvt" and seed < 2:  # what a budget run's plan flags (budget_setup.pass_notes)
            summary["budget"] = {"notes": ["train.budget: protonce's first dataset pass (E-step) ... never runs"]}
        (out / "run.json").write_text(json.dumps(summary))
        return out

    def evaluate(self, run_dir, train, test, out, options, *, meta=None):
        recipe, seed = meta["ablation"]["recipe"], meta["ablation"]["seed"]
        self.evaluated.append((recipe, seed))
        self.options.append(options)
        layers = [{"block": b, **_score(recipe, seed, b)} for b in (1, 2)]
        results = {
            "knn": {"top1": layers[-1]["knn_top1"], "k": 20}, "layers": layers,
            "correspondence": {"top1": 50.0, "layers": [{"block": b, "top1": 50.0, "chance": 12.5} for b in (1, 2)]},
            "meta": {"run_dir": str(run_dir), **meta},
        }
        eval_dir = Path(run_dir) / "eval"
        eval_dir.mkdir(parents=True, exist_ok=True)
        (eval_dir / "results.json").write_text(json.dumps(results))
        return results


@pytest.fixture
def fakes(monkeypatch) -> Fakes:
    f = Fakes()
    monkeypatch.setattr(ablation_run, "pretrain", f.pretrain)
    monkeypatch.setattr(ablation_run, "evaluate", f.evaluate)
    return f


def _args(images: Path, out: Path, *extra: str, seeds: int = 3, steps: int = 2,
          recipes: tuple[str, ...] = ("mcvt", "mocov3")) -> list[str]:
    return ["ablate", "--recipes", *recipes, "--data", str(images), "--steps", str(steps), "--seeds", str(seeds),
            "--out", str(out), "--eval-train", str(images), "--eval-test", str(images), *extra, *TINY]


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_grid_trained_evaluated_and_reported(fakes, images, tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(_args(images, out, "--eval", "linear.epochs=2", "train_limit=8")) == 0
    printed = capsys.readouterr().out
    assert fakes.trained == [(r, s) for r in ("mcvt", "mocov3") for s in (0, 1, 2)] == fakes.evaluated
    assert "[1/6] mcvt seed 0: training (2 steps)" in printed and "[6/6] mocov3 seed 2: done in" in printed
    assert "ETA" in printed
    for overrides, (recipe, seed) in zip(fakes.overrides, fakes.trained):
        assert overrides[: len(TINY)] == TINY  # every run: the same overrides, then the budget and its seed
        assert overrides[len(TINY):] == ["train.max_steps=2", "train.epochs=2", f"train.seed={seed}"]
    first = fakes.options[0]
    assert all(o.to_dict() == first.to_dict() for o in fakes.options)  # the same protocol for every run
    assert first.linear.epochs == 2 and first.train_limit == 8 and first.visuals is False

    headline = "mcvt vs mocov3 at 2 steps × 3 seeds: better on 2 metrics, worse on 0, inconclusive on 4"
    assert headline in printed
    md = (out / "ablation.md").read_text()
    assert f"**{headline}.**" in md and "| metric | mcvt | mocov3 (base) |" in md and "*Rule.*" in md
    assert "| kNN top-1 CLS (%), block 1 | 39.50 ± " in md and "· **better** (Δ +5.50 ± " in md
    assert "inconclusive (identical)" in md and "Failed runs" not in md
    # what the runs' budget plans flagged is in the report, with the runs it applies to
    assert "## What the budget did not fit" in md
    assert "- train.budget: protonce's first dataset pass (E-step) ... never runs (mcvt/seed0, mcvt/seed1)" in md

    rows = list(csv.DictReader((out / "ablation.csv").open()))
    assert set(rows[0]) == {"recipe", "seed", "metric", "value"}
    assert len(rows) == 6 * (6 + 3)  # 6 runs × (6 evaluation + 3 training numbers)
    assert {"recipe": "mcvt", "seed": "1", "metric": "knn_top1.block2", "value": "40.5"} in rows
    assert not any("chance" in r["metric"] for r in rows)

    report = json.loads((out / "ablation.json").read_text())
    knn = next(m for m in report["metrics"] if m["metric"] == "knn_top1.block1")
    assert knn["vs_base"]["mcvt"]["verdict"] == "better" and knn["vs_base"]["mcvt"]["test"] == "paired"
    assert knn["recipes"]["mocov3"]["values"] == {"0": 31.0, "1": 34.0, "2": 37.0}
    assert knn["recipes"]["mocov3"]["half_width"] == pytest.approx(4.302653 * 3 / 3 ** 0.5, abs=1e-4)
    steps = next(m for m in report["metrics"] if m["metric"] == "train.steps")
    assert steps["group"] == "training" and steps["vs_base"]["mcvt"]["verdict"] == "inconclusive (identical)"
    assert report["base"] == "mocov3" and report["headlines"] == [headline]
    assert list(report["notes"].values()) == [["mcvt/seed0", "mcvt/seed1"]]
    assert (out / "ablation.png").read_bytes()[:8] == PNG_MAGIC
    state = json.loads((out / "ablation_plan.json").read_text())
    assert state["plan"]["recipes"] == ["mcvt", "mocov3"] and state["runs"]["mcvt/seed2"]["status"] == "evaluated"


def test_rerun_redoes_only_what_is_missing(fakes, images, tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(_args(images, out, seeds=2)) == 0
    assert "*With 2 seeds the t factor is 12.7, so only large differences are decisive" in (out / "ablation.md").read_text()
    results = {(r, s): out / "runs" / r / f"seed{s}" / "eval" / "results.json" for r in ("mcvt", "mocov3") for s in (0, 1)}
    before = {k: p.stat().st_mtime_ns for k, p in results.items()}
    killed = out / "runs" / "mcvt" / "seed1"  # a run killed before it finished: no run.json, a checkpoint
    (killed / "run.json").unlink()
    (killed / "checkpoints").mkdir()
    (killed / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    os.utime(killed / "backbone.safetensors")  # (its backbone re-exported on continuing)
    (out / "runs" / "mocov3" / "seed0" / "eval" / "results.json").unlink()  # an evaluation deleted
    fakes.trained.clear()
    fakes.evaluated.clear()
    capsys.readouterr()

    assert main(_args(images, out, seeds=2)) == 0
    printed = capsys.readouterr().out
    assert fakes.trained == [("mcvt", 1)]
    assert fakes.evaluated == [("mcvt", 1), ("mocov3", 0)]
    assert "2 of 4 runs to do" in printed and "[2/4] mcvt seed 1: continuing (2 steps)" in printed
    assert printed.count("trained and evaluated earlier, skipped") == 2
    assert results[("mcvt", 0)].stat().st_mtime_ns == before[("mcvt", 0)]  # untouched
    assert results[("mocov3", 1)].stat().st_mtime_ns == before[("mocov3", 1)]

    fakes.evaluated.clear()  # a stale evaluation (older than the backbone) is redone, a current one is not
    os.utime(out / "runs" / "mocov3" / "seed1" / "backbone.safetensors", ns=(before[("mocov3", 1)] + 10**9,) * 2)
    assert main(_args(images, out, seeds=2)) == 0
    assert fakes.trained == [("mcvt", 1)] and fakes.evaluated == [("mocov3", 1)]


def test_failed_run_is_reported_and_the_rest_go_on(fakes, images, tmp_path, capsys):
    out = tmp_path / "abl"
    fakes.fail = {("mcvt", 1)}
    assert main(_args(images, out)) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert "mcvt seed 1: failed in training: RuntimeError: CUDA out of memory (fake)" in captured.out
    assert captured.err.strip() == ("1 run(s) failed (mcvt/seed1); the report lists why. "
                                    "Re-run the same command to retry them.")
    assert len(fakes.evaluated) == 5  # the others went on
    assert "Traceback" in (out / "runs" / "mcvt" / "seed1" / "ablate_error.txt").read_text()
    md = (out / "ablation.md").read_text()
    assert "## Failed runs" in md and "`mcvt/seed1` failed in training: RuntimeError: CUDA out of memory (fake)" in md
    assert "(n=2)" in md  # mcvt has 2 of 3 seeds
    knn = next(m for m in json.loads((out / "ablation.json").read_text())["metrics"] if m["metric"] == "knn_top1.block1")
    assert knn["vs_base"]["mcvt"]["test"] == "welch"  # the seeds no longer match

    fakes.fail.clear()
    fakes.trained.clear()
    assert main(_args(images, out)) == 0  # the same command retries the failed run, only it
    assert fakes.trained == [("mcvt", 1)]
    assert not (out / "runs" / "mcvt" / "seed1" / "ablate_error.txt").exists()
    assert "Failed runs" not in (out / "ablation.md").read_text()


def test_changed_plan_refused_seeds_added_overwrite(fakes, images, tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(_args(images, out, seeds=2)) == 0
    capsys.readouterr()
    fakes.trained.clear()
    assert main(_args(images, out, "--eval", "linear.epochs=5", seeds=2, steps=3)) == 2
    line = _error_line(capsys)
    assert line.startswith(f"stratavit ablate: error: {out} holds an ablation with another plan (")
    assert "steps 2 there, 3 here" in line and "eval option linear.epochs 100 there, 5 here" in line
    assert "--overwrite" in line and fakes.trained == []
    assert main(_args(images, out, seeds=2, recipes=("mcvt", "dino"))) == 2  # a recipe dropped
    assert "recipes mcvt mocov3 there, mcvt dino here (they may only be added to)" in _error_line(capsys)

    assert main(_args(images, out, seeds=3)) == 0  # a seed added: only its runs
    assert fakes.trained == [("mcvt", 2), ("mocov3", 2)]
    fakes.trained.clear()
    assert main(_args(images, out, "--eval", "num_workers=2", seeds=3)) == 0  # speed only: the same plan
    assert fakes.trained == []
    assert main(_args(images, out, "--overwrite", seeds=2, steps=3)) == 0  # started over
    assert len(fakes.trained) == 4 and not (out / "runs" / "mcvt" / "seed2").exists()


def _set(args: list[str], flag: str, value: str | None) -> list[str]:
    """``args`` with ``flag``'s value replaced (None: the option dropped), or the option added."""
    if flag not in args:
        return [*args, flag, value] if value is not None else args
    i = args.index(flag)
    return args[:i] + ([flag, value] if value is not None else []) + args[i + 2:]


# (name, options to set (None: drop), key=value to add, recipes, the error line's text)
BAD_INPUT = [
    ("no budget", {"--steps": None}, [], None, "choose the equal budget: --budget 10m (equal wall time) or --steps N"),
    ("base not a recipe", {"--base": "dino"}, [], None, "--base dino: not one of the recipes (mcvt, mocov3); name one of them"),
    ("unknown recipe", {}, [], ("mcvt", "nope"), "unknown recipe 'nope'"),
    ("override in --recipes", {}, [], ("mcvt", "train.epochs=3"), "--recipes train.epochs=3: looks like an override"),
    ("recipe twice", {}, [], ("mcvt", "mcvt"), "each recipe once"),
    ("unknown key", {}, ["train.nonsense=1"], None, "recipe mcvt: unknown config key"),
    ("seed override", {}, ["train.seed=3"], None, "override 'train.seed=3': the seed is set per run by --seeds; drop it"),
    ("steps override", {}, ["train.max_steps=9"], None, "the equal budget is set by --steps or --budget"),
    ("no eval sets", {"--eval-train": None, "--eval-test": None}, [], None, "--eval-train DIR --eval-test DIR"),
    ("half the eval sets", {"--eval-test": None}, [], None, "give both --eval-train and --eval-test"),
    ("data missing", {"--data": "{tmp}/none"}, [], None, "--data: data folder {tmp}/none does not exist"),
    ("eval set missing", {"--eval-test": "{tmp}/none"}, [], None, "--eval-test: data folder {tmp}/none does not exist"),
    ("unknown eval option", {"--eval": "knn.kk=3"}, [], None, "Did you mean 'k'"),
    ("dense half", {"--dense-train": "{images}"}, [], None, "needs both --dense-train and --dense-val"),
    ("dense layout", {"--dense-train": "{images}", "--dense-val": "{images}"}, [], None, "--dense-train:"),
    ("no seeds", {"--seeds": "0"}, [], None, "--seeds must be at least 1"),
    ("no steps", {"--steps": "0"}, [], None, "--steps 0: give a positive number of optimiser steps"),
    ("out not an ablation", {"--out": "{tmp}"}, [], None, "is not empty and holds no ablation; choose a new or empty --out"),
    ("out is a file", {"--out": "{tmp}/notes.txt"}, [], None, "--out {tmp}/notes.txt is a file; give a folder"),
]


@pytest.mark.parametrize("name, options, extra, recipes, expected", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_is_one_line_before_anything_runs(fakes, images, tmp_path, capsys, name, options, extra, recipes,
                                                    expected):
    (tmp_path / "notes.txt").write_text("mine")
    args = _args(images, tmp_path / "abl", recipes=recipes or ("mcvt", "mocov3"))
    for flag, value in options.items():
        args = _set(args, flag, value.format(tmp=tmp_path, images=images) if value else None)
    assert main([*args, *extra]) == 2, name
    line = _error_line(capsys)
    assert line.startswith("stratavit ablate: error: ")
    assert expected.format(tmp=tmp_path, images=images) in line, line
    assert fakes.trained == [] and not (tmp_path / "abl" / "runs").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"  # nothing of the user's lost


def test_damaged_state_file_is_one_line(fakes, images, tmp_path, capsys):
    out = tmp_path / "abl"
    out.mkdir()
    (out / "ablation_plan.json").write_text('{"plan": ')  # cut short
    assert main(_args(images, out)) == 2
    assert _error_line(capsys) == (f"stratavit ablate: error: {out / 'ablation_plan.json'} is damaged; pass --overwrite "
                                   "to start the ablation over (its finished runs are deleted)")
    assert main(_args(images, out, "--overwrite")) == 0 and len(fakes.trained) == 6


def test_budget_and_steps_are_exclusive(images, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(_args(images, tmp_path / "abl", "--budget", "10m"))
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_budget_is_passed_as_train_budget_and_named_sets_default_their_test_split():
    plan = build_plan(["mcvt", "mocov3"], 3, "cifar10", budget="10m", steps=None, overrides=["data.batch_size=64"])
    assert plan.train_overrides(2) == ["data.batch_size=64", "train.budget=10m", "train.seed=2"]
    assert plan.budget_label == "10 min" and (plan.eval_train, plan.eval_test) == ("cifar10", "cifar10:test")
    assert Plan.from_dict(plan.to_dict()) == plan and Plan.from_dict(plan.to_dict()).fingerprint() == plan.fingerprint()
    assert build_plan(["dino"], 1, "x", budget="2h", steps=None, eval_train="a", eval_test="b").budget_label == "2 h"
    assert [budget_words(b) for b in ("1h30m", "90s", "0.5h", "900", "soon")] == ["1 h 30 min", "90 s", "0.5 h", "900 s", "soon"]


def test_metrics_of_a_real_results_structure():
    """The structure `stratavit evaluate` writes (trimmed from a real tiny run)."""
    results = {
        "knn": {"top1": 14.0, "k": 20, "temperature": 0.07}, "linear": {"top1": 20.0, "train_top1": 30.0, "epochs": 2},
        "layers": [{"block": b, "knn_top1": 14.0, "linear_top1": 12.0 + b, "knn_top1_patch": 16.0,
                    "linear_top1_patch": 22.0} for b in (1, 2)],
        "dense": {"miou": 60.0, "pixel_acc": 82.3, "num_classes": 2, "size": 32, "blocks": [1, 2], "epochs": 31,
                  "layers": [{"block": b, "miou": 60.0, "pixel_acc": 82.3, "per_class_iou": [79.9, 40.1],
                              "loss_size": 32} for b in (1, 2)]},  # loss_size: a setting, not a metric
        "correspondence": {"top1": 31.1, "pairs": 5,
                           "layers": [{"block": b, "top1": 31.1, "exact": 10.8, "chance": 12.6} for b in (1, 2)]},
        "baselines": {"random_init": {"layers": [{"block": 1, "knn_top1": 9.0}]}},
        "meta": {"img_size": 32, "training": {"global_step": 2}},
    }
    values = run_metrics(results, {"global_step": 2, "images_per_s": 1.01, "wall_time_s": 31.6, "recipe": "mcvt"})
    assert list(values) == [
        "knn_top1.block1", "knn_top1.block2", "linear_top1.block1", "linear_top1.block2",
        "knn_top1_patch.block1", "knn_top1_patch.block2", "linear_top1_patch.block1", "linear_top1_patch.block2",
        "dense.miou.block1", "dense.miou.block2", "dense.pixel_acc.block1", "dense.pixel_acc.block2",
        "correspondence.top1.block1", "correspondence.top1.block2", "correspondence.exact.block1",
        "correspondence.exact.block2", "train.images_per_s", "train.steps", "train.wall_time_s",
    ]
    assert values["linear_top1.block2"] == 14.0 and values["train.steps"] == 2.0
    assert metric("dense.miou.block2").label == "dense mIoU (%), block 2"
    assert metric("knn_top1_patch.block1").label == "kNN top-1 mean patch (%), block 1"
    assert metric("train.images_per_s").group == "training" and metric("train.images_per_s").block is None
    assert run_metrics(None, None) == {}


def test_metrics_of_retrieval_detection_and_the_multi_block_knn():
    """Retrieval is per block (its patch counts are not metrics); detection and the best multi-block kNN
    are measured once and enter under their own names."""
    results = {
        "knn_concat": [{"blocks": [1, 2], "top1": 30.5}], "knn_concat_best": {"blocks": [1, 2], "top1": 30.5},
        "retrieval": {"miou": 66.0, "k": 30, "memory_patches": 5000,
                      "layers": [{"block": b, "miou": 60.0 + b, "pixel_acc": 80.0, "available_patches": 9000,
                                  "memories": [{"memory_size": 2500, "miou": 61.0}]} for b in (1, 2)]},
        "detection": {"ap": 50.7, "ap50": 94.1, "ap75": 58.1, "steps": 100, "size": 64, "mode": "frozen"},
    }
    values = run_metrics(results, None)
    assert values == {"retrieval.miou.block1": 61.0, "retrieval.miou.block2": 62.0,
                      "retrieval.pixel_acc.block1": 80.0, "retrieval.pixel_acc.block2": 80.0,
                      "knn_concat_best.top1": 30.5,
                      "detection.ap": 50.7, "detection.ap50": 94.1, "detection.ap75": 58.1}
    assert metric("detection.ap").label == "detection AP (%)" and metric("detection.ap").group == "evaluation"


@pytest.mark.slow
def test_end_to_end_on_tiny_settings_then_resume(cifar_train, cifar_test, tmp_path, capsys):
    """2 recipes × 2 seeds really trained (2 steps) and evaluated on CIFAR-10 JPEGs; then one evaluation
    deleted and one run cut short before it finished: the same command redoes only those."""
    out = tmp_path / "abl"
    args = ["ablate", "--recipes", "dino", "mocov3", "--data", str(cifar_train), "--steps", "2", "--seeds", "2",
            "--out", str(out), "--eval-train", str(cifar_train), "--eval-test", str(cifar_test), *TINY,
            "--eval", "train_limit=100", "test_limit=50", "linear.epochs=2", "correspondence.images=0"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "dino vs mocov3 at 2 steps × 2 seeds: better on " in printed
    runs = {(r, s): out / "runs" / r / f"seed{s}" for r in ("dino", "mocov3") for s in (0, 1)}
    for (recipe, seed), run in runs.items():
        assert json.loads((run / "run.json").read_text())["global_step"] == 2
        results = json.loads((run / "eval" / "results.json").read_text())
        assert results["meta"]["ablation"]["seed"] == seed and results["meta"]["train_images"] == 100
        assert "correspondence" not in results and not (run / "eval" / "report.html").exists()  # as asked
    rows = list(csv.DictReader((out / "ablation.csv").open()))
    metrics = {r["metric"] for r in rows}
    assert {"knn_top1.block1", "knn_top1.block2", "linear_top1_patch.block2", "train.images_per_s", "train.steps"} <= metrics
    assert len(rows) == 4 * len(metrics)  # every run has every number
    assert (out / "ablation.png").read_bytes()[:8] == PNG_MAGIC
    assert "| metric | dino | mocov3 (base) |" in (out / "ablation.md").read_text()

    before = {k: (run / "eval" / "results.json").stat().st_mtime_ns for k, run in runs.items()}
    numbers = json.loads((runs[("dino", 0)] / "eval" / "results.json").read_text())["layers"]
    shutil.rmtree(runs[("mocov3", 1)] / "eval")
    cut = runs[("dino", 0)]  # cut short after its last checkpoint, before the backbone and run.json
    (cut / "run.json").unlink()
    (cut / "backbone.safetensors").unlink()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "2 of 4 runs to do" in printed and "[1/4] dino seed 0: continuing (2 steps)" in printed
    assert printed.count("trained and evaluated earlier, skipped") == 2
    sessions = json.loads((cut / "environment.json").read_text())["sessions"]
    assert len(sessions) == 2 and sessions[1]["resumed"] is True  # continued from last.ckpt, not retrained
    assert json.loads((cut / "eval" / "results.json").read_text())["layers"] == numbers  # the same weights
    for untouched in (("dino", 1), ("mocov3", 0)):
        assert (runs[untouched] / "eval" / "results.json").stat().st_mtime_ns == before[untouched]
    assert (runs[("mocov3", 1)] / "eval" / "results.json").exists()


def test_small_images_hold_the_base_recipes_backbone_fixed(tmp_path):
    """The preset gives MoCo v3 and DINO different backbones; an ablation gives every recipe the base's."""
    from PIL import Image

    from stratavit.ablation.backbone import shared_backbone_overrides
    from stratavit.data.datasets import SAMPLE_NAME
    from stratavit.recipe import resolve_config

    plan = build_plan(["dino", "mocov3"], 2, SAMPLE_NAME, budget="2m", steps=None, eval_train="a", eval_test="b")
    shared, line = shared_backbone_overrides(plan, "mocov3")
    assert shared == ["backbone.arch=vit_tiny_patch16_224", "backbone.img_size=32", "backbone.patch_size=8",
                      "backbone.embed_dim=192", "backbone.depth=4", "backbone.num_heads=3", "train.preset=small"]
    assert line is not None and "mocov3's backbone (ViT 4 x 192, patch 8)" in line
    from stratavit.engine.preset import apply_preset
    given = [*plan.overrides, *shared, f"data.path={SAMPLE_NAME}"]
    dino, _ = apply_preset(resolve_config("dino", given), "dino", given)
    assert (dino.backbone.patch_size, dino.backbone.embed_dim) == (8, 192)  # the base's backbone ...
    assert dino.objectives["dino"].out_dim == 4096 and dino.views.local_crops == 4  # ... with DINO's own preset
    # sizes set by the user, or large images: nothing added (the runs already share what they were given)
    sized = build_plan(["dino", "mocov3"], 2, SAMPLE_NAME, budget="2m", steps=None, eval_train="a", eval_test="b",
                       overrides=["backbone.patch_size=4"])
    assert shared_backbone_overrides(sized, "mocov3") == ([], None)
    (tmp_path / "c").mkdir()
    for i in range(3):
        Image.new("RGB", (300, 230)).save(tmp_path / "c" / f"{i}.jpg")
    large = build_plan(["dino", "mocov3"], 2, str(tmp_path), budget="2m", steps=None, eval_train="a", eval_test="b")
    assert shared_backbone_overrides(large, "mocov3") == ([], None)
