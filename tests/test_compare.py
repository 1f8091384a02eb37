"""Tests for comparing runs (stratavit.evaluation.compare) on hand-written run folders."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from stratavit.evaluation.compare import COLUMNS, PLOTS, compare_runs
from stratavit.evaluation.errors import EvaluationError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Lightning's CSVLogger writes sparse rows: the loss and lr land on separate lines.
METRICS_CSV = """epoch,step,loss,loss/global,lr
0,0,5.0,3.0,
0,0,,,0.0001
0,10,4.0,2.5,
1,20,3.0,2.0,
"""

CIFAR_META = {"train": "cifar10", "test": "cifar10:test", "train_images": 5000, "test_images": 1000}


def _full_results(knn: float, linear: float, layers: list[float]) -> dict:
    return {
        "knn": {"top1": knn, "k": 20, "temperature": 0.07},
        "linear": {"top1": linear, "train_top1": 90.0},
        "layers": [
            {"block": i + 1, "knn_top1": v, "linear_top1": v + 1.0, "knn_top1_patch": v - 5.0}
            for i, v in enumerate(layers)
        ],
        "knn_concat": [{"blocks": [1, 2], "top1": 63.5}],
        "knn_concat_best": {"blocks": [1, 2], "top1": 63.5},
        "dense": {"miou": 30.5, "pixel_acc": 70.25, "layers": [{"block": 1, "miou": 20.0}, {"block": 2, "miou": 30.5}]},
        "retrieval": {"miou": 35.0, "layers": [{"block": 1, "miou": 25.0}, {"block": 2, "miou": 35.0}]},
        "correspondence": {"layers": [{"block": 1, "top1": 40.0}, {"block": 2, "top1": 55.5}], "top1": 55.5},
        "baselines": {"random_init": {"knn_top1": 25.0, "layers": []}, "raw_pixels": {"knn_top1": 33.0}},
        "meta": {"recipe": "dino", **CIFAR_META, "eval_seconds": 12.3},
    }


def _make_run(
    root: Path,
    name: str,
    recipe: str | None,
    results: dict | None,
    *,
    run_json: dict | None = None,
    metrics: str | None = METRICS_CSV,
    eval_subdir: str = "eval",
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    cfg = f"recipe: {recipe}\n" if recipe is not None else ""
    (run / "config.yaml").write_text(cfg + "backbone:\n  arch: vit_tiny_patch16_224\n")
    if run_json is not None:
        (run / "run.json").write_text(json.dumps(run_json))
    if metrics is not None:
        (run / "metrics.csv").write_text(metrics)
    if results is not None:
        (run / eval_subdir).mkdir()
        (run / eval_subdir / "results.json").write_text(json.dumps(results))
    return run


def _summary(steps: int, epochs: int, wall: float, ips: float | None) -> dict:
    return {
        "recipe": "ignored-when-config-has-one",
        "global_step": steps,
        "epochs_completed": epochs,
        "wall_time_s": wall,
        "images_per_s": ips,
        "skipped_images": 0,
        "nonfinite_steps": 0,
        "resumed": False,
    }


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, Path]:
    """Two 'dino' runs (one without dense/correspondence/linear layers) and an 'ibot' run on other data."""
    root = tmp_path / "runs"
    a = _make_run(root, "a", "dino", _full_results(61.25, 66.5, [40.0, 62.0, 61.25]),
                  run_json=_summary(300, 3, 120.5, 400.0))
    b_results = {
        "knn": {"top1": 58.0, "k": 20},
        "linear": {"top1": 67.0},
        "layers": [{"block": 1, "knn_top1": 45.0}, {"block": 2, "knn_top1": 58.0}],
        "meta": {"recipe": "dino", **CIFAR_META},
    }
    b = _make_run(root, "b", "dino", b_results, run_json=_summary(200, 2, 80.0, 500.0))
    c_results = _full_results(70.0, 72.0, [50.0, 70.0])
    c_results["meta"] = {"recipe": "ibot", "train": "stl10", "test": "stl10:test",
                         "train_images": 5000, "test_images": 1000}
    c = _make_run(root, "c", "ibot", c_results, run_json=_summary(300, 3, 200.0, 250.0), metrics=None)
    return {"a": a, "b": b, "c": c}


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_csv_rows_and_values(runs, tmp_path):
    out = tmp_path / "cmp"
    result = compare_runs([runs["a"], runs["b"], runs["c"]], out)
    header, rows = _read_csv(out / "compare.csv")
    assert header == list(COLUMNS) == result["columns"]
    assert [r["label"] for r in rows] == ["dino (a)", "dino (b)", "ibot"]
    a, b, c = rows
    assert a == {
        "label": "dino (a)",
        "run_dir": str(runs["a"]),
        "recipe": "dino",
        "knn_top1": "61.25",
        "linear_top1": "66.5",
        "best_block_knn": "2",
        "best_block_knn_top1": "62.0",
        "best_concat_knn_top1": "63.5",
        "dense_miou": "30.5",
        "dense_pixel_acc": "70.25",
        "retrieval_miou": "35.0",
        "correspondence_top1": "55.5",
        "detection_ap": "",  # not evaluated
        "detection_ap50": "",
        "random_init_knn_top1": "25.0",
        "raw_pixels_knn_top1": "33.0",
        "images_per_s": "400.0",
        "wall_time_s": "120.5",
        "steps": "300",
        "epochs": "3",
        "eval_train": "cifar10",
        "eval_test": "cifar10:test",
        "eval_train_images": "5000",
        "eval_test_images": "1000",
        "knn_k": "20",
        # ibot was evaluated on STL-10: every number it shares with a is flagged, numbers stay numbers
        "not_comparable": "†1 knn_top1, linear_top1, best_block_knn, best_block_knn_top1: train set, test set differ; "
                          "†2 best_concat_knn_top1, random_init_knn_top1, raw_pixels_knn_top1: train set, test set differ; "
                          "†3 correspondence_top1: test set differs",
    }
    # run b has no dense / correspondence / baselines: empty cells
    for col in ("dense_miou", "dense_pixel_acc", "retrieval_miou", "correspondence_top1", "random_init_knn_top1",
                "raw_pixels_knn_top1"):
        assert b[col] == ""
    assert (b["knn_top1"], b["linear_top1"], b["best_block_knn"], b["best_block_knn_top1"]) == ("58.0", "67.0", "2", "58.0")
    assert (b["steps"], b["epochs"], b["images_per_s"], b["wall_time_s"]) == ("200", "2", "500.0", "80.0")
    assert (c["recipe"], c["eval_train"], c["eval_test"], c["best_block_knn"]) == ("ibot", "stl10", "stl10:test", "2")

    # the returned rows hold the same values, as numbers / None
    ra, rb, _ = result["rows"]
    assert ra["knn_top1"] == 61.25 and ra["best_block_knn"] == 2 and ra["steps"] == 300
    assert rb["dense_miou"] is None and rb["correspondence_top1"] is None
    assert result["csv"] == out / "compare.csv" and result["markdown"] == out / "compare.md"


def test_markdown_table_best_runs_and_data_warning(runs, tmp_path):
    out = tmp_path / "cmp"
    compare_runs([runs["a"], runs["b"], runs["c"]], out)
    md = (out / "compare.md").read_text()
    assert md.startswith("# stratavit: run comparison\n")
    assert "| run | recipe | kNN top-1 (%) | linear top-1 (%) | best block kNN (%) |" in md
    # numbers measured on other data carry a marker (dense: neither run recorded its dense data, so unknown)
    assert "| dino (a) | dino | 61.25 †1 | 66.50 †1 | block 2 (62.00) †1 | 63.50 †2 | 30.50 | 70.25 | 35.00 | 55.50 †3 | – | – | 400.00 | 120.50 | 300 | 3 | cifar10 → cifar10:test |" in md
    # missing values show as –
    assert "| dino (b) | dino | 58.00 †1 | 67.00 †1 | block 2 (58.00) †1 | – | – | – | – | – | – | – | 500.00 | 80.00 | 200 | 2 | cifar10 → cifar10:test |" in md
    # the footnotes say what differs between which runs
    assert ("**†3** correspondence top-1 (%): not comparable across these runs: test set differs "
            "(dino (a): `cifar10:test`; ibot: `stl10:test`).") in md
    assert "### kNN top-1 per block (†1: not comparable, see above)" in md
    # best run per metric (flagged metrics keep their marker)
    assert "Best run per metric: kNN top-1 †1: **ibot** (70.00); linear top-1 †1: **ibot** (72.00);" in md
    assert "dense mIoU: **dino (a)** and **ibot** (30.50)" in md
    assert "throughput (img/s): **dino (b)** (500.00)" in md
    assert "wall time (shortest): **dino (b)** (80.00)" in md
    # ibot was evaluated on STL-10: not comparable
    assert "evaluated on different data" in md and "not comparable" in md
    assert "- ibot: train `stl10` (5000 images), test `stl10:test` (1000 images)" in md
    # plots are linked relatively and exist
    for name in PLOTS.values():
        assert f"]({name})" in md
    # the runs are listed with their folders
    assert f"- **dino (a)**: `{runs['a']}`" in md


def test_no_warning_when_same_data(runs, tmp_path):
    out = tmp_path / "cmp"
    result = compare_runs([runs["a"], runs["b"]], out)
    md = (out / "compare.md").read_text()
    assert "Warning" not in md and result["warnings"] == []


def test_same_sets_different_sizes_warn(runs, tmp_path):
    results = json.loads((runs["b"] / "eval" / "results.json").read_text())
    results["meta"]["test_images"] = 200
    (runs["b"] / "eval" / "results.json").write_text(json.dumps(results))
    compare_runs([runs["a"], runs["b"]], tmp_path / "cmp")
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "evaluated on different data" in md and "(200 images)" in md


def test_pngs_written_and_valid(runs, tmp_path):
    out = tmp_path / "cmp"
    result = compare_runs([runs["a"], runs["b"], runs["c"]], out)
    assert set(result["plots"]) == set(PLOTS)
    for kind, name in PLOTS.items():
        assert result["plots"][kind] == out / name
        assert _is_png(out / name), name


def test_plots_skipped_without_data(runs, tmp_path):
    out = tmp_path / "cmp"
    result = compare_runs([runs["b"]], out)  # no dense, correspondence or linear layers
    assert set(result["plots"]) == {"headline", "knn_layers", "loss", "throughput"}
    for kind in ("dense", "retrieval", "correspondence", "linear_layers"):
        assert not (out / PLOTS[kind]).exists()
        assert PLOTS[kind] not in (out / "compare.md").read_text()


def test_old_minimal_run(tmp_path):
    """An old evaluation with only a kNN number, no run.json, no metrics.csv, no meta."""
    old = _make_run(tmp_path / "runs", "old", "mocov3", {"knn": {"top1": 50.0}}, metrics=None)
    full = _make_run(tmp_path / "runs", "new", "dino", _full_results(61.25, 66.5, [40.0, 61.25]),
                     run_json=_summary(10, 1, 5.0, 100.0))
    out = tmp_path / "cmp"
    result = compare_runs([old, full], out)
    row = result["rows"][0]
    assert row["label"] == "mocov3" and row["knn_top1"] == 50.0
    assert all(row[c] is None for c in COLUMNS if c not in ("label", "run_dir", "recipe", "knn_top1"))
    _, rows = _read_csv(out / "compare.csv")
    assert rows[0]["linear_top1"] == "" and rows[0]["steps"] == "" and rows[0]["eval_train"] == ""
    md = (out / "compare.md").read_text()
    assert "| mocov3 | mocov3 | 50.00 | – | – | – | – | – | – | – | – | – | – |" in md
    assert "not recorded" in md  # cannot check that the data match
    # alone, nothing to plot but the headline bar
    alone = compare_runs([old], tmp_path / "cmp_old")
    assert set(alone["plots"]) == {"headline"}


def test_recipe_fallbacks_and_training_from_meta(tmp_path):
    results = {"knn": {"top1": 1.0}, "meta": {"recipe": "from-meta", "training": {"global_step": 7, "wall_time_s": 3.5}}}
    run = _make_run(tmp_path / "runs", "r", None, results, metrics=None)
    row = compare_runs([run], tmp_path / "cmp")["rows"][0]
    assert row["recipe"] == "from-meta" and row["label"] == "from-meta"
    assert row["steps"] == 7 and row["wall_time_s"] == 3.5


def test_label_disambiguation(tmp_path):
    res = {"knn": {"top1": 1.0}}
    x1 = _make_run(tmp_path / "g1", "run", "dino", res)
    x2 = _make_run(tmp_path / "g2", "run", "dino", res)
    y = _make_run(tmp_path / "g1", "other", "dino", res)
    z = _make_run(tmp_path / "g1", "solo", "ibot", res)
    rows = compare_runs([x1, x2, y, z], tmp_path / "cmp")["rows"]
    assert [r["label"] for r in rows] == ["dino (g1/run)", "dino (g2/run)", "dino (other)", "ibot"]

    custom = compare_runs([x1, z], tmp_path / "cmp2", labels=["base", "mine"])["rows"]
    assert [r["label"] for r in custom] == ["base", "mine"]
    with pytest.raises(EvaluationError, match="one label per run"):
        compare_runs([x1, z], tmp_path / "cmp3", labels=["only"])
    with pytest.raises(EvaluationError, match="duplicate labels"):
        compare_runs([x1, z], tmp_path / "cmp3", labels=["same", "same"])


def test_eval_subdir(tmp_path):
    run = _make_run(tmp_path / "runs", "r", "dino", {"knn": {"top1": 3.0}}, eval_subdir="eval_stl")
    row = compare_runs([run], tmp_path / "cmp", eval_subdir="eval_stl")["rows"][0]
    assert row["knn_top1"] == 3.0
    with pytest.raises(EvaluationError, match="stratavit evaluate"):
        compare_runs([run], tmp_path / "cmp2")


def test_errors(runs, tmp_path):
    with pytest.raises(EvaluationError, match="at least one run"):
        compare_runs([], tmp_path / "cmp")
    with pytest.raises(EvaluationError, match="given twice"):
        compare_runs([runs["a"], runs["a"].parent / "." / "a"], tmp_path / "cmp")

    not_run = tmp_path / "plain"
    not_run.mkdir()
    with pytest.raises(EvaluationError, match="not a stratavit run folder"):
        compare_runs([runs["a"], not_run], tmp_path / "cmp")
    with pytest.raises(EvaluationError, match="not a stratavit run folder"):
        compare_runs([tmp_path / "missing"], tmp_path / "cmp")

    unevaluated = _make_run(tmp_path / "runs2", "u", "dino", None)
    with pytest.raises(EvaluationError, match=r"run `stratavit evaluate .*u --train … --test …` first"):
        compare_runs([unevaluated], tmp_path / "cmp")

    broken = _make_run(tmp_path / "runs2", "broken", "dino", None)
    (broken / "eval").mkdir()
    (broken / "eval" / "results.json").write_text('{"knn": {"top1": 5')
    with pytest.raises(EvaluationError, match="not readable JSON"):
        compare_runs([broken], tmp_path / "cmp")

    bad_yaml = _make_run(tmp_path / "runs2", "bad_yaml", "dino", {"knn": {"top1": 1.0}})
    (bad_yaml / "config.yaml").write_text("recipe: [unclosed\n")
    with pytest.raises(EvaluationError, match="not valid YAML"):
        compare_runs([bad_yaml], tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()  # nothing written when an input is bad


def test_unreadable_run_json_is_ignored(runs, tmp_path):
    (runs["a"] / "run.json").write_text("{not json")
    row = compare_runs([runs["a"]], tmp_path / "cmp")["rows"][0]
    assert row["steps"] is None and row["knn_top1"] == 61.25
