"""bench/gpu_suite.sh runs end to end (tiny sizes, CPU): every part leaves a row, nothing fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_suite_runs_end_to_end_on_cpu(tmp_path, cifar_dir, horses_dir):
    data = tmp_path / "data"
    data.mkdir()
    (data / "cifar10").symlink_to(cifar_dir)
    (data / "weizmann-horses").symlink_to(horses_dir)
    env = {**os.environ, "STRATAVIT_DATA": str(data), "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    res = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_suite.sh"), "--tiny", "--cpu", "--fp32", "--no-compile",
         "--recipes", "mocov3", "dino", "--batch", "8", "--steps", "2", "--warmup", "1",
         "--loader-seconds", "2", "--cifar-seconds", "5"],
        capture_output=True, text=True, timeout=900, env=env, check=False,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads((tmp_path / "out" / "gpu_suite.json").read_text())
    assert out["skipped"] == []
    assert [(r["recipe"], r["compile"]) for r in out["throughput"]] == [("mocov3", False), ("dino", False)]
    assert all(r["images_per_s"] > 0 and r["flops_per_step"] > 0 for r in out["throughput"])
    assert [r["photometric"] for r in out["loader"]] == ["loader", "device"]
    assert out["loader"][1]["device_ops_images_per_s"] > 0
    assert out["cifar_dino"]["steps"] >= 1 and 0 <= out["cifar_dino"]["knn_top1"] <= 100
    md = (tmp_path / "out" / "gpu_suite.md").read_text()
    assert "| mocov3 | False |" in md and "CIFAR-10 ViT-T/4 dino" in md
    assert (tmp_path / "out" / "gpu_suite.log").exists()
