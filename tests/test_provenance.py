"""environment.json: what a run was trained with (versions, machine, command line, source commit)."""

from __future__ import annotations

import json
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning
import numpy
import pytest
import timm
import torch
import torchvision
from conftest import TINY

import stratavit
from stratavit.provenance import (
    ENVIRONMENT_FILE,
    environment,
    git_info,
    read_environment,
    record_environment,
)

MOCO_SMALL = ["objectives.infonce.proj_hidden_dim=64", "objectives.infonce.pred_hidden_dim=64", "objectives.infonce.proj_dim=32"]
SOURCE = Path(stratavit.__file__).resolve().parent


def _git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def _in_checkout() -> bool:
    if shutil.which("git") is None:
        return False
    res = subprocess.run(["git", "ls-files", "--error-unmatch", "__init__.py"], cwd=SOURCE, capture_output=True)
    return res.returncode == 0


def test_environment_entry_values():
    env = environment(seed=3, world_size=2, resumed=False)
    assert env["seed"] == 3 and env["world_size"] == 2 and env["resumed"] is False
    assert env["argv"] == sys.argv
    assert env["packages"] == {
        "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
        "lightning": lightning.__version__, "numpy": numpy.__version__,
    }
    assert env["python"]["version"] == platform.python_version()
    assert env["stratavit"]["version"] == stratavit.__version__ and env["stratavit"]["source"] == str(SOURCE)
    assert env["cuda"]["available"] == torch.cuda.is_available() and env["cuda"]["cuda_version"] == torch.version.cuda
    json.dumps(env)  # JSON-safe as it is


@pytest.mark.skipif(not _in_checkout(), reason="stratavit is not run from a git checkout")
def test_git_info_in_this_checkout():
    info = git_info()
    assert re.fullmatch(r"[0-9a-f]{40}", info["commit"])
    assert info["commit"] == _git("rev-parse", "HEAD", cwd=SOURCE)
    assert info["dirty"] == bool(_git("status", "--porcelain", "--untracked-files=no", cwd=SOURCE))


@pytest.mark.skipif(shutil.which("git") is None, reason="no git")
def test_git_info_outside_a_checkout_is_null(tmp_path):
    assert git_info(tmp_path) == {"commit": None, "dirty": None}
    assert git_info(tmp_path / "missing") == {"commit": None, "dirty": None}
    # a package folder inside some other repository, not tracked by it (e.g. a venv in a project): null too
    repo = tmp_path / "project"
    (repo / "venv" / "stratavit").mkdir(parents=True)
    (repo / "venv" / "stratavit" / "__init__.py").write_text("")
    (repo / "README").write_text("x")
    _git("init", "-q", cwd=repo)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "add", "README", cwd=repo)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x", cwd=repo)
    assert git_info(repo / "venv" / "stratavit") == {"commit": None, "dirty": None}


def test_record_appends_and_reads_back(tmp_path):
    assert read_environment(tmp_path) == []
    record_environment(tmp_path, {"a": 1})
    record_environment(tmp_path, {"a": 2})
    assert json.loads((tmp_path / ENVIRONMENT_FILE).read_text()) == {"sessions": [{"a": 1}, {"a": 2}]}
    (tmp_path / ENVIRONMENT_FILE).write_text("not json")
    assert read_environment(tmp_path) == []


def test_run_writes_environment_and_resume_appends(tmp_path, cifar_train):
    from stratavit.engine.train import pretrain
    from stratavit.evaluation.report import write_report

    over = [*TINY, *MOCO_SMALL, "data.limit=64", "train.seed=7"]
    run = pretrain("mocov3", str(cifar_train), tmp_path / "run", [*over, "train.max_steps=2"])
    (first,) = read_environment(run)
    assert first["seed"] == 7 and first["world_size"] == 1 and first["resumed"] is False and first["start_step"] == 0
    assert first["argv"] == sys.argv and first["packages"]["torch"] == torch.__version__
    assert first["packages"]["timm"] == timm.__version__ and first["packages"]["lightning"] == lightning.__version__
    assert first["python"]["version"] == platform.python_version() and first["hostname"]
    if _in_checkout():
        assert re.fullmatch(r"[0-9a-f]{40}", first["stratavit"]["commit"])
        assert isinstance(first["stratavit"]["dirty"], bool)

    pretrain("mocov3", str(cifar_train), run, [*over, "train.max_steps=3"])  # continues from step 2
    sessions = read_environment(run)
    assert len(sessions) == 2 and sessions[0] == first  # the first entry is kept as it was
    assert sessions[1]["resumed"] is True and sessions[1]["start_step"] == 2

    # the evaluation report of the run says what it was trained with
    text = write_report(tmp_path / "eval", {"knn": {"top1": 1.0}}, metrics_csv=run / "metrics.csv").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("Trained with"))
    assert f"stratavit {stratavit.__version__}" in line and f"torch {torch.__version__}" in line
    assert "seed 7; resumed 1 time(s)" in line and "1 process(es)" in line
    if first["stratavit"]["commit"]:
        assert f"commit `{first['stratavit']['commit'][:10]}`" in line
