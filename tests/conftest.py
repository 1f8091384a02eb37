"""Shared fixtures: the real CIFAR-10 JPEGs from ../shared, unpacked once into a cache folder."""

from __future__ import annotations

import os
import shutil
import signal
import tarfile
import tempfile
from pathlib import Path

import lightning as L
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STRATAVIT_SHARED", REPO.parent / "shared"))
CACHE = Path(os.environ.get("STRATAVIT_TEST_CACHE", Path.home() / ".cache" / "stratavit-tests"))

# A tiny backbone and schedule every end-to-end test can afford on 2 CPU cores.
TINY = [
    "backbone.arch=vit_tiny_patch16_224",
    "backbone.img_size=32",
    "backbone.patch_size=4",
    "backbone.embed_dim=32",
    "backbone.depth=2",
    "backbone.num_heads=2",
    "views.global_size=32",
    "views.local_size=16",
    "data.batch_size=16",
    "data.num_workers=0",
    "data.limit=200",
    "train.log_every_n_steps=1",
    "train.progress_bar=false",
    "optim.warmup_epochs=0.5",
]


def _free_gb(path: Path) -> float:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free / 1e9


def _print_free_disk(session) -> None:
    """One line of free disk where the suite writes, even under -q: a full disk shows up as errors in
    every fixture, so the cause should be the first thing in the log."""
    line = (f"disk free: {_free_gb(Path(tempfile.gettempdir())):.1f} GB for temporary folders, "
            f"{_free_gb(CACHE):.1f} GB for the data cache {CACHE} (the suite needs about 1 GB)")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)


def _restore_sigint() -> None:
    """A suite started in the background of a non-interactive shell (`make test &`, nohup) inherits
    SIGINT ignored; the Ctrl-C tests need what a terminal gives, Python's own handler."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_sessionstart(session) -> None:
    _print_free_disk(session)
    _restore_sigint()


def _unpack(archive: Path, target: Path) -> Path:
    done = target / ".complete"
    if not done.exists():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter="data")
        done.touch()
    return target


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """Folder with ``train/<class>/*.jpg`` and ``test/<class>/*.jpg`` (the whole shared CIFAR-10)."""
    src = SHARED / "datasets" / "cifar10"
    if not (src / "train.tar.gz").exists():
        message = f"shared CIFAR-10 not found at {src} (set STRATAVIT_SHARED to the shared/ folder)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI has ../shared beside the clone: never skip silently there
        pytest.skip(message)
    target = CACHE / "cifar10"
    _unpack(src / "train.tar.gz", target)
    _unpack(src / "test.tar.gz", target / "_test")
    return target


@pytest.fixture(scope="session")
def cifar_train(cifar_dir: Path) -> Path:
    return cifar_dir / "train"


@pytest.fixture(scope="session")
def cifar_test(cifar_dir: Path) -> Path:
    return cifar_dir / "_test" / "test"


@pytest.fixture(scope="session")
def horses_dir() -> Path:
    """Weizmann Horses in the dense-probe layout: ``{train,val}/{images,masks}/``."""
    src = SHARED / "datasets" / "weizmann-horses"
    archive = src / "weizmann-horses.tar.gz"
    if not archive.exists():
        message = f"shared Weizmann Horses not found at {src} (set STRATAVIT_SHARED to the shared/ folder)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return _unpack(archive, CACHE / "weizmann-horses")



@pytest.fixture(scope="session")
def small_cifar(tmp_path_factory, cifar_train) -> Path:
    """24 CIFAR-10 JPEGs in 3 classes: what quick checks read, without scanning 50,000 files each."""
    root = tmp_path_factory.mktemp("small-cifar")
    for cls in sorted(p for p in cifar_train.iterdir() if p.is_dir())[:3]:
        (root / cls.name).mkdir()
        for img in sorted(cls.iterdir())[:8]:
            shutil.copy(img, root / cls.name / img.name)
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, small_cifar) -> Path:
    """A run folder of one dino step on the TINY backbone (checkpoint + backbone.safetensors), ~5 s.
    Shared: tests must not write into it (export with --out elsewhere)."""
    from stratavit.cli import main

    run = tmp_path_factory.mktemp("walk") / "run"
    assert main(["pretrain", "--recipe", "dino", "--data", str(small_cifar), "--out", str(run), *TINY,
                 "data.limit=16", "train.max_steps=1"]) == 0
    return run


class CrashAt(L.Callback):
    """Kills a run (an exception, as a power cut would) once step ``at_step`` is done."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.at_step:
            raise RuntimeError("simulated crash")
