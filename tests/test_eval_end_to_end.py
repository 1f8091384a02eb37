"""`stratavit evaluate` with every part (per-block probes, dense, correspondence, pictures, HTML)
on a tiny run, transfer to another image size, and `stratavit compare` on two runs."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY

MOCO_SMALL = ["objectives.infonce.proj_hidden_dim=64", "objectives.infonce.pred_hidden_dim=64",
              "objectives.infonce.proj_dim=32"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("stratavit")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "stratavit.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cifar_train) -> Path:
    run = tmp_path_factory.mktemp("runs") / "mocov3"
    res = _cli("pretrain", "--recipe", "mocov3", "--data", str(cifar_train), "--out", str(run), *TINY, *MOCO_SMALL,
               "train.max_steps=3")
    assert res.returncode == 0, res.stderr[-3000:]
    return run


@pytest.mark.slow
def test_evaluate_with_every_part(tiny_run, cifar_train, cifar_test, horses_dir):
    res = _cli(
        "evaluate", str(tiny_run), "--train", str(cifar_train), "--test", str(cifar_test),
        "--train-limit", "200", "--test-limit", "100", "--baselines", "--linear-epochs", "20",
        "--dense-train", str(horses_dir / "train"), "--dense-val", str(horses_dir / "val"),
        "--dense-blocks", "1,-1", "--dense-size", "64", "--correspondence", "20",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = tiny_run / "eval"
    assert str(out / "report.md") in res.stdout and str(out / "report.html") in res.stdout  # both are named
    results = json.loads((out / "results.json").read_text())
    for layer in results["layers"]:
        assert {"block", "knn_top1", "linear_top1", "knn_top1_patch", "linear_top1_patch"} <= set(layer)
        assert all(0 <= layer[k] <= 100 for k in layer if k != "block")
    assert results["linear"]["top1"] == results["layers"][-1]["linear_top1"]
    dense = results["dense"]
    assert [d["block"] for d in dense["layers"]] == [1, 2] and 0 <= dense["miou"] <= 100
    assert dense["miou"] == dense["layers"][-1]["miou"] and 0 <= dense["pixel_acc"] <= 100
    corr = results["correspondence"]
    assert [c["block"] for c in corr["layers"]] == [1, 2] and 0 <= corr["top1"] <= 100
    rand = results["baselines"]["random_init"]
    assert {"knn_top1", "linear_top1", "layers", "dense", "correspondence"} <= set(rand)
    assert "linear_top1" in results["baselines"]["raw_pixels"]
    assert "center crop" in results["meta"]["resize_policy"] or "centre crop" in results["meta"]["resize_policy"]

    report = (out / "report.md").read_text()
    for png in ("layer_panels.png", "attention.png", "pca.png", "matches.png", "confusion.png", "embedding.png",
                "loss_curve.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert png in report, png
    assert "## Dense probe" in report and "## Correspondence" in report
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and 'src="attention.png"' not in html
    assert "stratavit evaluate" not in res.stderr  # no error line

    # a second run of the same command is served from the feature caches
    res2 = _cli(
        "evaluate", str(tiny_run), "--train", str(cifar_train), "--test", str(cifar_test),
        "--train-limit", "200", "--test-limit", "100", "--linear-epochs", "20", "--correspondence", "0",
        "--no-visuals", "--out", str(tiny_run / "eval2"),
    )
    assert res2.returncode == 0, res2.stderr[-3000:]
    again = json.loads((tiny_run / "eval2" / "results.json").read_text())
    assert again["layers"] == results["layers"]  # deterministic probes on the same features
    assert "correspondence" not in again and not (tiny_run / "eval2" / "report.html").exists()


@pytest.mark.slow
def test_transfer_to_other_image_sizes_and_bad_input(tiny_run, horses_dir, tmp_path):
    # an ImageFolder of ~300x230 photos, two classes, evaluated at 48 px with the stretch policy
    folder = tmp_path / "horses-cls"
    for split in ("train", "val"):
        images = sorted((horses_dir / split / "images").glob("*.jpg"))
        for i, img in enumerate(images[:40]):
            cls = folder / split / ("a" if i % 2 else "b")
            cls.mkdir(parents=True, exist_ok=True)
            shutil.copy(img, cls / img.name)
    res = _cli("evaluate", str(tiny_run), "--train", str(folder / "train"), "--test", str(folder / "val"),
               "--img-size", "48", "--resize", "stretch", "--linear-epochs", "5", "--correspondence", "5",
               "--no-visuals", "--out", str(tmp_path / "transfer"))
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((tmp_path / "transfer" / "results.json").read_text())
    assert results["meta"]["img_size"] == 48 and "aspect ratio not kept" in results["meta"]["resize_policy"]
    assert results["meta"]["classes"] == 2 and results["meta"]["train_images"] == 40

    res = _cli("evaluate", str(tiny_run), "--train", str(folder / "train"), "--test", str(folder / "val"),
               "--img-size", "30", "--out", str(tmp_path / "bad"))
    assert res.returncode == 2 and "multiple of the patch size" in res.stderr
    res = _cli("evaluate", str(tiny_run), "--train", str(folder / "train"), "--test", str(folder / "val"),
               "--dense-train", str(horses_dir / "train"), "--out", str(tmp_path / "bad"))
    assert res.returncode == 2 and "--dense-val" in res.stderr
    res = _cli("evaluate", str(tiny_run), "--train", str(folder / "train"), "--test", str(folder / "val"),
               "--dense-train", str(folder / "train"), "--dense-val", str(folder / "val"), "--out", str(tmp_path / "bad"))
    assert res.returncode == 2 and "masks" in res.stderr
    assert not (tmp_path / "bad" / "cache").exists()  # refused before any feature was extracted
    res = _cli("evaluate", str(tiny_run), "--train", str(folder / "train"), "--test", str(folder / "val"),
               "--dense-train", str(horses_dir / "train"), "--dense-val", str(horses_dir / "val"),
               "--dense-blocks", "7", "--out", str(tmp_path / "bad"))
    assert res.returncode == 2 and "block 7 does not exist" in res.stderr
    assert not (tmp_path / "bad" / "cache").exists()

    # an unreadable image is skipped, counted and listed, and the evaluation goes on
    (folder / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    res = _cli("evaluate", str(tiny_run), "--train", str(folder / "train"), "--test", str(folder / "val"),
               "--linear-epochs", "2", "--correspondence", "0", "--no-visuals", "--out", str(tmp_path / "skip"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 unreadable image(s) were skipped" in res.stderr
    assert json.loads((tmp_path / "skip" / "results.json").read_text())["meta"]["skipped_images"] == 1
    assert "broken.jpg" in (tmp_path / "skip" / "skipped_images.txt").read_text()


@pytest.mark.slow
def test_compare_two_runs(tiny_run, cifar_train, cifar_test, tmp_path):
    second = tmp_path / "dino"
    res = _cli("pretrain", "--recipe", "dino", "--data", str(cifar_train), "--out", str(second), *TINY,
               "objectives.dino.out_dim=128", "objectives.dino.hidden_dim=64", "objectives.dino.bottleneck_dim=32",
               "views.local_crops=2", "train.max_steps=3")
    assert res.returncode == 0, res.stderr[-3000:]
    for run in (tiny_run, second):
        res = _cli("evaluate", str(run), "--train", str(cifar_train), "--test", str(cifar_test), "--train-limit", "200",
                   "--test-limit", "100", "--linear-epochs", "5", "--correspondence", "10", "--no-visuals",
                   "--out", str(run / "eval-compare"))
        assert res.returncode == 0, res.stderr[-3000:]
    res = _cli("compare", str(tiny_run), str(second), "--out", str(tmp_path / "cmp"), "--eval-subdir", "eval-compare")
    assert res.returncode == 0, res.stderr[-3000:]
    with (tmp_path / "cmp" / "compare.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["recipe"] for r in rows] == ["mocov3", "dino"]
    for r, run in zip(rows, (tiny_run, second)):
        results = json.loads((run / "eval-compare" / "results.json").read_text())
        assert float(r["knn_top1"]) == pytest.approx(results["knn"]["top1"])
        assert float(r["correspondence_top1"]) == pytest.approx(results["correspondence"]["top1"])
        assert float(r["images_per_s"]) > 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "mocov3" in md and "dino" in md and "compare_knn_layers.png" in md
    res = _cli("compare", str(tiny_run), str(tmp_path / "nope"), "--out", str(tmp_path / "cmp2"),
               "--eval-subdir", "eval-compare")
    assert res.returncode == 2 and "nope" in res.stderr
