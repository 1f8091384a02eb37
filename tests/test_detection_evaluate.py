"""``stratavit evaluate --detection-train D --detection-val D``: bad input as one line, and the whole path on tiny settings."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import TINY

from stratavit.cli import main
from stratavit.evaluation.compare import compare_runs


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, small_cifar: Path) -> Path:
    """A run of its own (conftest's session ``tiny_run`` is shared and must not be written into; the
    end-to-end test evaluates into this run's folder so ``compare`` reads it back)."""
    run = tmp_path_factory.mktemp("det") / "run"
    assert main(["pretrain", "--recipe", "dino", "--data", str(small_cifar), "--out", str(run), *TINY,
                 "data.limit=16", "train.max_steps=1"]) == 0
    return run


CASES = [
    ("half given", ["--detection-train", "horses-boxes:train"], "needs both --detection-train and --detection-val"),
    ("missing folder", ["--detection-train", "{tmp}/none", "--detection-val", "horses-boxes:val"],
     "detection data {tmp}/none does not exist or is not a folder or a .json"),
    ("missing json", ["--detection-train", "{tmp}/nojson", "--detection-val", "horses-boxes:val"],
     "detection annotations {tmp}/nojson/annotations.json do not exist"),
    ("corrupt json", ["--detection-train", "{tmp}/corrupt", "--detection-val", "horses-boxes:val"],
     "{tmp}/corrupt/annotations.json is not valid JSON"),
    ("bad split name", ["--detection-train", "horses-boxes:test", "--detection-val", "horses-boxes:val"],
     "use horses-boxes:train or horses-boxes:val"),
    ("size off the stride", ["--detection-train", "horses-boxes:train", "--detection-val", "horses-boxes:val",
                             "detection.size=36"], "detection.size 36 is not a multiple of 8"),
    ("unknown mode", ["--detection-train", "horses-boxes:train", "--detection-val", "horses-boxes:val",
                      "detection.mode=partial"], "detection.mode"),
    ("zero steps", ["--detection-train", "horses-boxes:train", "--detection-val", "horses-boxes:val",
                    "detection.steps=0"], "detection.steps=0 must be >= 1"),
]


@pytest.mark.parametrize("name,extra,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_detection_input_gives_one_line_and_exit_2(
    name: str, extra: list[str], expected: str, tiny_run: Path, small_cifar: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for folder in ("nojson", "corrupt"):
        (tmp_path / folder / "images").mkdir(parents=True)
    (tmp_path / "corrupt" / "annotations.json").write_text('{"images": [}')
    argv = ["evaluate", str(tiny_run), "--train", str(small_cifar), "--test", str(small_cifar), "--out", str(tmp_path / "e"),
            *[a.replace("{tmp}", str(tmp_path)) for a in extra]]
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning: ")]  # e.g. barely moved
    assert code == 2, (name, out, err)
    assert "Traceback" not in out + err and len(lines) == 1, (name, err)
    assert lines[0].startswith("stratavit evaluate: error: ")
    assert expected.replace("{tmp}", str(tmp_path)) in lines[0], (name, lines[0])


@pytest.mark.slow
def test_detection_reaches_results_report_and_compare(
    tiny_run: Path, small_cifar: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    out = tiny_run / "eval-det"
    assert main(["evaluate", str(tiny_run), "--train", str(small_cifar), "--test", str(small_cifar), "--out", str(out),
                 "--linear-epochs", "2", "--correspondence", "0", "--baselines",
                 "--detection-train", "horses-boxes:train", "--detection-val", "horses-boxes:val",
                 "detection.steps=2", "detection.max_images=6", "detection.batch_size=3", "detection.size=32",
                 "detection.width=16", "detection.mode=frozen"]) == 0
    printed = capsys.readouterr().out
    assert "detection: 6 train (of 200, detection.max_images=6) / 6 val (of 128" in printed and '"detection_ap"' in printed
    results = json.loads((out / "results.json").read_text())
    det = results["detection"]
    for key in ("ap", "ap50", "ap75"):
        assert 0.0 <= det[key] <= 100.0
    assert det["mode"] == "frozen" and det["steps"] == 2 and det["size"] == 32 and det["strides"] == [4, 8]
    assert det["categories"] == ["horse"] and det["train_images"] == 6 and det["val_images"] == 6
    assert len(det["train_fingerprint"]) == 16 and det["train_fingerprint"] != det["val_fingerprint"]
    assert "detection" in results["baselines"]["random_init"]
    assert "example" not in det
    report = (out / "report.md").read_text()
    assert "## Detection transfer" in report and "| random init |" in report and "detection AP (%)" in report
    assert (out / "detections.png").exists() and "detections.png" in report

    cmp = compare_runs([tiny_run], tmp_path / "cmp", eval_subdir="eval-det")
    assert cmp["rows"][0]["detection_ap"] == det["ap"]
    with (tmp_path / "cmp" / "compare.csv").open() as fh:
        assert float(next(csv.DictReader(fh))["detection_ap"]) == det["ap"]
    assert "detection AP (%)" in (tmp_path / "cmp" / "compare.md").read_text()
