"""Dense retrieval (Hummingbird): the kNN labelling and mIoU by hand, the memory's sampling, the
evaluation end to end (results.json, report, compare) and its bad options."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY

from stratavit.cli import main
from stratavit.evaluation.compare import compare_runs
from stratavit.evaluation.dense_head import segmentation_scores
from stratavit.evaluation.errors import EvaluationError
from stratavit.evaluation.retrieval_memory import (
    Memory,
    build_memory,
    knn_soft_labels,
    memory_order,
    patch_label_distributions,
    retrieval_confusions,
)

# --------------------------------------------------------------------------- #
# the math, by hand
# --------------------------------------------------------------------------- #
# four memory entries in 2-D, unit length, with known label distributions over K = 2 classes
MEM_FEATS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
MEM_LABELS = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.25, 0.75]])


def _memory() -> Memory:
    return Memory(MEM_FEATS.clone(), MEM_LABELS.clone(), 4)


def test_knn_soft_labels_by_hand():
    # query a = (2, 0) -> unit (1, 0): sims 1, 0, -1, 0.6; top-2: entries 0 (1.0) and 3 (0.6)
    # query b = (0, 3) -> unit (0, 1): sims 0, 1, 0, 0.8; top-2: entries 1 (1.0) and 3 (0.8)
    t = 0.5
    w_a = math.exp(1.0 / t) / (math.exp(1.0 / t) + math.exp(0.6 / t))  # weight of entry 0
    w_b = math.exp(1.0 / t) / (math.exp(1.0 / t) + math.exp(0.8 / t))  # weight of entry 1
    expected = torch.tensor([
        [w_a * 1.0 + (1 - w_a) * 0.25, w_a * 0.0 + (1 - w_a) * 0.75],
        [w_b * 0.0 + (1 - w_b) * 0.25, w_b * 1.0 + (1 - w_b) * 0.75],
    ])
    (soft,) = knn_soft_labels(torch.tensor([[2.0, 0.0], [0.0, 3.0]]), _memory(), k=2, temperature=t)
    assert torch.allclose(soft, expected, atol=1e-6)
    assert torch.allclose(soft.sum(1), torch.ones(2))
    # a memory prefix of 2 (entries 0 and 1): query a -> entries 0 (1.0), 1 (0.0)
    w = math.exp(1.0 / t) / (math.exp(1.0 / t) + math.exp(0.0))
    full, two = knn_soft_labels(torch.tensor([[2.0, 0.0]]), _memory(), k=2, temperature=t, sizes=[4, 2], chunk=1)
    assert torch.allclose(two, torch.tensor([[w, 1 - w]]), atol=1e-6)
    assert torch.allclose(full, expected[:1], atol=1e-6)


def test_retrieval_mIoU_by_hand():
    # 1 val image, a 1x2 patch grid (the two queries above), its mask 1x2 pixels: [class 0, class 1]
    t = 0.5
    val = torch.tensor([[[[2.0, 0.0], [0.0, 3.0]]]])  # (1, gh=1, gw=2, C=2)
    # query a -> class 0 (0.89 vs 0.11), query b -> class 1: both pixels right -> mIoU 100
    confs, kept = retrieval_confusions(val, [torch.tensor([[0, 1]])], _memory(), [4], 2, k=2, temperature=t, keep=1)
    assert confs[0].tolist() == [[1, 0], [0, 1]] and kept[0].tolist() == [[0, 1]]
    assert segmentation_scores(confs[0])["miou"] == pytest.approx(100.0)
    # the mask says [1, 1]: class 0 predicted once, wrongly:
    # IoU_0 = 0 / 1, IoU_1 = 1 / 2 -> mIoU 25
    confs, _ = retrieval_confusions(val, [torch.tensor([[1, 1]])], _memory(), [4], 2, k=2, temperature=t)
    assert confs[0].tolist() == [[0, 0], [1, 1]]
    assert segmentation_scores(confs[0])["miou"] == pytest.approx(25.0)
    # k=1 with the 2-entry prefix: query b's neighbour is entry 1 -> class 1, query a's entry 0 -> class 0
    confs, _ = retrieval_confusions(val, [torch.tensor([[0, 255]])], _memory(), [2], 2, k=1, temperature=t)
    assert confs[0].tolist() == [[1, 0], [0, 0]]  # the ignored pixel is not counted


def test_patch_label_distributions_by_hand():
    # one 4x4 mask on a 2x2 grid (2x2 pixels a patch), 255 = ignore
    mask = torch.tensor([[[0, 0, 1, 1],
                          [0, 1, 1, 255],
                          [255, 255, 2, 2],
                          [255, 255, 2, 0]]])
    d = patch_label_distributions(mask, (2, 2), 3)
    assert d.shape == (1, 2, 2, 3)
    assert torch.allclose(d[0, 0, 0], torch.tensor([0.75, 0.25, 0.0]))
    assert torch.allclose(d[0, 0, 1], torch.tensor([0.0, 1.0, 0.0]))  # the ignored pixel does not count
    assert torch.allclose(d[0, 1, 0], torch.zeros(3))  # nothing labelled
    assert torch.allclose(d[0, 1, 1], torch.tensor([0.25, 0.0, 0.75]))
    with pytest.raises(EvaluationError, match="outside 0..2"):
        patch_label_distributions(torch.full((1, 4, 4), 3), (2, 2), 3)


def test_memory_sampling_is_seeded_nested_and_capped():
    n, gh, gw, c = 5, 3, 3, 8
    feats = torch.randn(n, gh, gw, c, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(n, gh, gw, 2)
    labels[..., 0] = 1.0
    labels[0, 0, 0] = 0.0  # one patch without a label stays out
    a = build_memory(feats.numpy().astype("float16"), labels, 20, seed=3)
    b = build_memory(feats, labels, 20, seed=3)
    assert a.available == b.available == n * gh * gw - 1
    assert len(a) == 20 and torch.allclose(a.feats, b.feats, atol=1e-2)  # same patches, fp16 store or not
    assert torch.allclose(a.feats.norm(dim=1), torch.ones(20), atol=1e-5)
    full = build_memory(feats, labels, 10_000, seed=3)
    assert len(full) == n * gh * gw - 1  # capped at the labelled patches
    assert torch.allclose(full.feats[:20], b.feats)  # memories are nested prefixes of one order
    other = build_memory(feats, labels, 20, seed=4)
    assert not torch.allclose(other.feats, b.feats)
    order = memory_order(labels.reshape(-1, 2), 3)
    assert 0 not in order.tolist() and sorted(order.tolist()) == list(range(1, n * gh * gw))
    # each sampled row is its patch's normalised token
    idx = order[:20]
    assert torch.allclose(b.feats, torch.nn.functional.normalize(feats.reshape(-1, c)[idx], dim=1), atol=1e-6)


def test_bad_math_inputs():
    with pytest.raises(EvaluationError, match="memory sizes"):
        knn_soft_labels(torch.ones(1, 2), _memory(), 2, 0.1, sizes=[5])
    with pytest.raises(EvaluationError, match="temperature > 0"):
        knn_soft_labels(torch.ones(1, 2), _memory(), 2, 0.0)


# --------------------------------------------------------------------------- #
# end to end: a tiny run, the shipped horses sample
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cifar_train) -> Path:
    run = tmp_path_factory.mktemp("retr") / "run"
    assert main(["pretrain", "--recipe", "mocov3", "--data", str(cifar_train), "--out", str(run), *TINY,
                 "objectives.infonce.proj_hidden_dim=64", "objectives.infonce.pred_hidden_dim=64",
                 "objectives.infonce.proj_dim=32", "train.max_steps=2", "data.limit=32"]) == 0
    return run


def _evaluate_args(run: Path, cifar_train: Path, out: Path) -> list[str]:
    return ["evaluate", str(run), "--train", str(cifar_train), "--test", str(cifar_train), "--train-limit", "20",
            "--test-limit", "20", "--linear-epochs", "1", "--correspondence", "0", "--out", str(out),
            "--dense-train", "horses-sample:train", "--dense-val", "horses-sample:val", "dense.max_images=24",
            "dense.steps=2"]


@pytest.mark.slow
def test_evaluate_writes_retrieval_everywhere(tiny_run, cifar_train, tmp_path, capsys):
    out = tiny_run / "eval-retrieval"  # inside the run: compare reads it back
    assert main([*_evaluate_args(tiny_run, cifar_train, out), "--baselines",
                 "retrieval.memory_sizes=[100,100000]", "retrieval.k=5"]) == 0
    printed = capsys.readouterr().out
    assert "dense retrieval: memory of" in printed and "retrieval_miou" in printed
    results = json.loads((out / "results.json").read_text())
    r = results["retrieval"]
    assert list(results).index("dense") < list(results).index("retrieval")
    assert r["k"] == 5 and r["temperature"] == 0.02 and r["memory_sizes"] == [100, 100000]
    assert r["train_images"] == 24 and r["val_images"] == 24 and r["size"] == 32 and r["blocks"] == [1, 2]
    assert r["train"] == "horses-sample:train" and len(r["train_fingerprint"]) == 16
    available = 24 * 8 * 8  # 32 px, patch 4: every horse patch has labelled pixels
    assert r["memory_patches"] == available and r["query_patches"] == 24 * 8 * 8
    for row in r["layers"]:
        assert row["available_patches"] == available
        assert [m["patches"] for m in row["memories"]] == [100, available]
        assert row["miou"] == row["memories"][-1]["miou"] and 0 <= row["miou"] <= 100
    assert r["miou"] == r["layers"][-1]["miou"]
    assert "retrieval" in results["baselines"]["random_init"]
    assert results["dense"]["blocks"] == r["blocks"]  # same blocks: the dense probe's token stores are read
    assert {"teacher retrieval", "random init retrieval"} <= set(results["meta"]["seconds"])

    report = (out / "report.md").read_text()
    assert "## Dense retrieval" in report and "retrieval mIoU (%)" in report
    assert f"mIoU (%), memory {available}" in report and "retrieval.png" in report
    assert report.index("## Dense probe") < report.index("## Dense retrieval")
    assert (out / "retrieval.png").exists()

    cmp = compare_runs([tiny_run], tmp_path / "cmp", eval_subdir="eval-retrieval")
    assert cmp["rows"][0]["retrieval_miou"] == r["miou"]
    with (tmp_path / "cmp" / "compare.csv").open() as fh:
        assert float(next(csv.DictReader(fh))["retrieval_miou"]) == r["miou"]
    assert "retrieval mIoU (%)" in (tmp_path / "cmp" / "compare.md").read_text()


def test_retrieval_can_be_turned_off(tiny_run, cifar_train, tmp_path):
    out = tmp_path / "eval"
    assert main([*_evaluate_args(tiny_run, cifar_train, out), "--no-visuals", "retrieval.enabled=false"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert "dense" in results and "retrieval" not in results


@pytest.mark.parametrize("override,expected", [
    ("retrieval.k=0", "retrieval.k=0 must be >= 1"),
    ("retrieval.temperature=0", "retrieval.temperature=0.0 must be > 0"),
    ("retrieval.memory_sizes=[0,100]", "retrieval.memory_sizes=[0, 100] must be >= 1"),
    ("retrieval.memory_sizes=[]", "retrieval.memory_sizes is empty"),
    ("retrieval.k=50", "retrieval.k=50 is larger than the smallest memory"),
    ("retrieval.blocks=[7]", "retrieval.blocks"),
    ("retrieval.kk=3", "Did you mean 'k'"),
])
def test_bad_retrieval_options_give_one_line(override, expected, tiny_run, cifar_train, tmp_path, capsys):
    capsys.readouterr()
    code = main([*_evaluate_args(tiny_run, cifar_train, tmp_path / "e"), "retrieval.memory_sizes=[40]"
                 if "memory_sizes" not in override else "retrieval.k=1", override])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert all(line.startswith("warning: ") for line in err[:-1]), err  # the tiny run "barely moved"
    assert err[-1].startswith("stratavit evaluate: error: ") and expected in err[-1], err
