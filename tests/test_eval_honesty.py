"""Honest numbers from `stratavit evaluate` and `stratavit compare` (issue 14, "silently wrong numbers").

Each case runs the CLI as a user calls it (``stratavit.cli.main``) on tiny runs made with the TINY
config: the evaluation size defaults to the training resolution and says so when it does not, a
patch size that does not divide the size fails in one line, compare flags numbers measured on
other data / sizes / protocols, one-class sets and an unmoved teacher are called out, the report
puts the headline first, and the dense probe states (and bounds) what it used.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image

from stratavit.cli import main

MOCO_SMALL = ["objectives.infonce.proj_hidden_dim=64", "objectives.infonce.pred_hidden_dim=64",
              "objectives.infonce.proj_dim=32"]
# the ViT is built for 64 px but trained on 32 px crops (the 224-built ViT trained at 64 px of the issue, small)
AT_32_BUILT_FOR_64 = ["backbone.img_size=64", "views.global_size=32"]
MOVES = ["train.max_steps=6", "optim.base_lr=0.05", "optim.warmup_epochs=0", "teacher.momentum=0.5",
         "teacher.momentum_end=0.5"]
QUICK = ["--train-limit", "100", "--test-limit", "60", "--linear-epochs", "2", "--correspondence", "0", "--no-visuals"]


def _pretrain(run: Path, data: Path, *extra: str) -> Path:
    assert main(["pretrain", "--recipe", "mocov3", "--data", str(data), "--out", str(run), *TINY, *MOCO_SMALL,
                 *extra]) == 0
    return run


@pytest.fixture(scope="module")
def moved_run(tmp_path_factory, cifar_train) -> Path:
    """Trained at 32 px on a ViT built for 64 px, for a few steps that move the teacher."""
    return _pretrain(tmp_path_factory.mktemp("runs") / "moved", cifar_train, *AT_32_BUILT_FOR_64, *MOVES)


@pytest.fixture(scope="module")
def still_run(tmp_path_factory, cifar_train) -> Path:
    """Two steps at the recipe's momentum and warm-up: the teacher is still its initialisation."""
    return _pretrain(tmp_path_factory.mktemp("runs") / "still", cifar_train, "train.max_steps=2")


def _evaluate(capsys, run: Path, train: Path, test: Path, out: Path, *extra: str) -> tuple[int, str, str, dict]:
    capsys.readouterr()
    code = main(["evaluate", str(run), "--train", str(train), "--test", str(test), *QUICK, "--out", str(out), *extra])
    captured = capsys.readouterr()
    results = json.loads((out / "results.json").read_text()) if code == 0 else {}
    return code, captured.out, captured.err, results


def _solid_folder(root: Path, colours: dict[str, int], n: int = 12) -> Path:
    """An ImageFolder of ``n`` 32x32 images per class, each class one grey level (with a little noise)."""
    rng = np.random.default_rng(0)
    for name, level in colours.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = np.clip(level + rng.integers(-10, 10, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


# --------------------------------------------------------------------------- #
# 1. resolution
# --------------------------------------------------------------------------- #
def test_default_size_is_the_training_resolution(capsys, moved_run, cifar_train, cifar_test, tmp_path):
    code, out, err, results = _evaluate(capsys, moved_run, cifar_train, cifar_test, tmp_path / "e")
    assert code == 0, err
    meta = results["meta"]
    assert meta["img_size"] == 32 and meta["train_img_size"] == 32  # not the backbone's 64
    assert "evaluating at" not in err and "Traceback" not in err
    report = (tmp_path / "e" / "report.md").read_text()
    assert "evaluated at 32 px (its training resolution)" in report


def test_another_size_says_so_in_console_and_report(capsys, moved_run, cifar_train, cifar_test, tmp_path):
    code, out, err, results = _evaluate(capsys, moved_run, cifar_train, cifar_test, tmp_path / "e", "--img-size", "64")
    assert code == 0, err
    line = "evaluating at 64 px; the run trained at 32 px (--img-size)"
    assert f"warning: {line}\n" in err
    assert results["meta"]["img_size"] == 64 and results["meta"]["train_img_size"] == 32
    assert line in results["meta"]["warnings"]
    report = (tmp_path / "e" / "report.md").read_text()
    assert report.index(f"> **Warning:** {line}") < report.index("## Headline")


def test_size_the_patch_does_not_divide_fails_in_one_line(capsys, moved_run, cifar_train, cifar_test, tmp_path):
    code, out, err, _ = _evaluate(capsys, moved_run, cifar_train, cifar_test, tmp_path / "e", "--img-size", "30")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        "stratavit evaluate: error: --img-size 30: evaluation size 30x30 is not a multiple of the patch size 4x4; "
        "use e.g. 28"
    ]
    assert not (tmp_path / "e" / "cache").exists()
    code, out, err, _ = _evaluate(capsys, moved_run, cifar_train, cifar_test, tmp_path / "e", "--img-size", "28",
                                  "--dense-train", "horses-sample:train", "--dense-val", "horses-sample:val",
                                  "--dense-size", "50")
    assert code == 2 and err.strip().splitlines()[-1].startswith("stratavit evaluate: error: --dense-size 50: ")
    assert "use e.g. 48" in err


def test_tokens_at_the_training_resolution_are_the_training_forward():
    """Evaluation resamples the position table as the training forward did (timm's dynamic size)."""
    from stratavit.backbones.vit import Backbone
    from stratavit.config import BackboneConfig
    from stratavit.evaluation.resolution import sized
    from stratavit.evaluation.tokens import block_tokens

    for pos_embed in ("learned", "sincos"):
        torch.manual_seed(0)
        backbone = Backbone(BackboneConfig(arch="vit_tiny_patch16_224", img_size=64, patch_size=4, embed_dim=32,
                                           depth=2, num_heads=2, pos_embed=pos_embed)).eval()
        torch.nn.init.normal_(backbone.vit.pos_embed, std=0.5)  # a trained, non-smooth table
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            trained = backbone.vit.norm(backbone(x, levels=[2])[2].tokens_pre)
        (tokens,) = block_tokens(sized(backbone.vit, 32, "--img-size"), x, [2])
        assert torch.allclose(tokens.cls, trained[:, 0], atol=1e-6)
        assert torch.allclose(tokens.patches.reshape(2, 64, 32), trained[:, 1:], atol=1e-6)


# --------------------------------------------------------------------------- #
# 2. compare flags what is not comparable
# --------------------------------------------------------------------------- #
def _seg_folder(root: Path, classes: int, n: int = 8) -> Path:
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / split / "images" / f"{i}.png")
            mask = np.repeat(rng.integers(0, classes, (5, 6), dtype=np.uint8), 8, 0).repeat(8, 1)
            Image.fromarray(mask).save(root / split / "masks" / f"{i}.png")
    return root


def test_compare_flags_other_data_size_and_protocol(capsys, moved_run, cifar_train, cifar_test, tmp_path):
    other = tmp_path / "other-run"
    shutil.copytree(moved_run, other, ignore=shutil.ignore_patterns("eval*"))
    seg = _seg_folder(tmp_path / "seg", classes=3)
    dense_a = ["--dense-train", "horses-sample:train", "--dense-val", "horses-sample:val", "dense.max_images=16",
               "dense.steps=10"]
    dense_b = ["--dense-train", str(seg / "train"), "--dense-val", str(seg / "val"), "dense.steps=10"]
    assert _evaluate(capsys, moved_run, cifar_train, cifar_test, moved_run / "eval", *dense_a)[0] == 0
    assert _evaluate(capsys, other, cifar_train, cifar_test, other / "eval", *dense_b, "--img-size", "64",
                     "knn.k=5")[0] == 0
    capsys.readouterr()
    assert main(["compare", str(moved_run), str(other), "--labels", "a", "b", "--out", str(tmp_path / "cmp")]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("warning:")]
    assert any("kNN top-1 (%)" in line and "evaluation size (px) differs (a: 32, b: 64)" in line
               and "kNN k differs (a: 20, b: 5)" in line for line in lines), lines
    assert any("dense mIoU (%)" in line and "dense train set differs" in line and "dense classes differs (a: 2, b: 3)"
               in line for line in lines), lines
    md = (tmp_path / "cmp" / "compare.md").read_text()
    row_a = next(line for line in md.splitlines() if line.startswith("| a |"))
    cells = [c.strip() for c in row_a.strip("|").split("|")]
    assert all("†" in c for c in cells[2:7] if c != "–"), cells  # kNN, linear, best block, dense mIoU, pixel acc
    assert "not comparable across these runs" in md and "dense val set differs" in md
    # what a run's own evaluation warned about travels along
    assert "warning: b: evaluating at 64 px; the run trained at 32 px (--img-size)" in lines
    assert "**Warning (b):** evaluating at 64 px; the run trained at 32 px (--img-size)" in md
    with (tmp_path / "cmp" / "compare.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert float(rows[0]["knn_top1"]) >= 0  # the numbers stay numbers
    assert "knn_top1" in rows[0]["not_comparable"] and "dense_miou" in rows[0]["not_comparable"]
    assert "evaluation size (px)" in rows[1]["not_comparable"]

    # the same evaluation of two runs: nothing flagged
    assert _evaluate(capsys, other, cifar_train, cifar_test, other / "eval", *dense_a)[0] == 0
    capsys.readouterr()
    assert main(["compare", str(moved_run), str(other), "--out", str(tmp_path / "cmp2")]) == 0
    assert "warning:" not in capsys.readouterr().err
    assert "†" not in (tmp_path / "cmp2" / "compare.md").read_text()


# --------------------------------------------------------------------------- #
# 3. warnings that save a user from a wrong conclusion
# --------------------------------------------------------------------------- #
def test_single_class_sets_are_called_meaningless(capsys, moved_run, tmp_path):
    one = _solid_folder(tmp_path / "one", {"horse": 200})
    code, out, err, results = _evaluate(capsys, moved_run, one, one, tmp_path / "e")
    assert code == 0 and "Traceback" not in err
    assert results["knn"]["top1"] == 100.0  # what it used to report without a word
    line = next(w for w in results["meta"]["warnings"] if w.startswith("the train set has a single class"))
    assert "kNN and linear top-1 are meaningless" in line and f"warning: {line}" in err
    assert f"> **Warning:** {line}" in (tmp_path / "e" / "report.md").read_text()

    two = _solid_folder(tmp_path / "two", {"dark": 20, "light": 230})
    only_dark = _solid_folder(tmp_path / "only-dark", {"dark": 20})
    code, out, err, results = _evaluate(capsys, moved_run, two, only_dark, tmp_path / "e2")
    assert code == 0
    assert any(w.startswith("the test set has 1 class(es) that the train set has (dark)") for w in results["meta"]["warnings"])


def test_test_labels_follow_the_train_class_names(capsys, still_run, tmp_path):
    """A test set without the train set's first class is labelled by class name, not by folder position."""
    train = _solid_folder(tmp_path / "train", {"dark": 20, "light": 230, "mid": 120})
    test = _solid_folder(tmp_path / "test", {"light": 230, "mid": 120, "pale": 180})
    code, out, err, results = _evaluate(capsys, still_run, train, test, tmp_path / "e")
    assert code == 0, err
    # light and mid are found (by position they would be called dark and light); pale is unknown to train
    assert results["knn"]["top1"] == pytest.approx(200 / 3, abs=0.01)
    assert "12 test image(s) belong to 1 class(es) the train set lacks (pale)" in err


def test_unmoved_teacher_is_called_a_random_network(capsys, still_run, moved_run, cifar_train, cifar_test, tmp_path):
    code, out, err, results = _evaluate(capsys, still_run, cifar_train, cifar_test, tmp_path / "e")
    assert code == 0
    change = results["meta"]["weights_change"]
    assert change["steps"] == 2 and change["relative_change"] < 1e-3
    line = (f"the teacher has barely moved from its initialisation (2 steps; relative change "
            f"{change['relative_change']:.1e}); these numbers are those of a random network")
    assert f"warning: {line}" in err and line in results["meta"]["warnings"]
    report = (tmp_path / "e" / "report.md").read_text()
    assert report.index(line) < report.index("## Headline")

    code, out, err, results = _evaluate(capsys, moved_run, cifar_train, cifar_test, tmp_path / "e2")
    assert results["meta"]["weights_change"]["relative_change"] > 1e-2 and "barely moved" not in err


# --------------------------------------------------------------------------- #
# 4. report order, 5. dense limits
# --------------------------------------------------------------------------- #
def test_report_headline_first_and_dense_limits_stated(capsys, moved_run, cifar_train, cifar_test, tmp_path):
    code, out, err, results = _evaluate(
        capsys, moved_run, cifar_train, cifar_test, tmp_path / "e", "--baselines", "--dense-train", "horses-sample:train",
        "--dense-val", "horses-sample:val", "--dense-size", "48", "dense.max_images=24", "dense.steps=5")
    assert code == 0, err
    used = ("dense probe: 24 train (of 200, dense.max_images=24) / 24 val (of 128, dense.max_images=24) images "
            "at 48 px, 6 head steps (3 epochs) per block, blocks 1, 2")
    assert used in out
    assert "warning: the dense probe runs at 48 px; the run trained at 32 px (--dense-size)" in err
    dense = results["dense"]
    assert (dense["train_images"], dense["val_images"], dense["train_total"], dense["steps"]) == (24, 24, 200, 6)
    assert dense["train"] == "horses-sample:train" and len(dense["train_fingerprint"]) == 16
    report = (tmp_path / "e" / "report.md").read_text()
    assert "Used: 24 train (of 200" in report
    title, summary = report.split("\n\n")[:2]
    assert title == "# stratavit evaluation: mocov3" and summary.startswith("The teacher backbone of")
    order = [report.index(s) for s in ("kNN top-1", "> **Warning:**", "## Headline", "## Per-block", "## Dense probe",
                                       "## Settings and provenance", "- **train_fingerprint**")]
    assert order == sorted(order)


def test_bad_dense_limits_fail_in_one_line(capsys, moved_run, tmp_path):
    for override, message in (("dense.steps=0", "dense.steps must be positive, not 0"),
                              ("dense.max_images=0", "dense.max_images must be positive (or null for all images), not 0"),
                              ("dense.loss_size=-1", "dense.loss_size must be positive (or null for the default), not -1")):
        capsys.readouterr()
        assert main(["evaluate", str(moved_run), "--train", "x", "--test", "y", "--out", str(tmp_path / "e"), override]) == 2
        err = capsys.readouterr().err
        assert err.strip().splitlines() == [f"stratavit evaluate: error: {message}"]
    assert not (tmp_path / "e").exists()
