"""Exact resumption: data order, per-sample views, atomic checkpoints, SIGKILL and restart on CPU."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY
from torch.utils.data import DataLoader

from stratavit.data.datasets import Indexed, build_dataset
from stratavit.data.sampling import (
    ResumableSampler,
    epoch_permutation,
    mix_seed,
    sample_seed,
    seeded_rng,
    shard,
)
from stratavit.data.views import MultiCropTransform, collate_views
from stratavit.engine.resume import truncate_metrics
from stratavit.engine.train import pretrain
from stratavit.recipe import resolve_config

REPO = Path(__file__).resolve().parents[1]
DINO_SMALL = ["objectives.dino.out_dim=128", "objectives.dino.hidden_dim=64", "objectives.dino.bottleneck_dim=32",
              "views.local_crops=2"]
# dino: drop path 0.1 (global RNG in the step), EMA teacher, centre buffer; 96 images -> 6 steps per epoch
RUN = [*TINY, *DINO_SMALL, "train.epochs=2", "train.checkpoint_every_n_steps=2", "data.limit=96"]
STEPS = 12


# ----------------------------------------------------------------------------------------- seeds


def test_mix_seed_is_splitmix64():
    # SplitMix64 seeded with 0: its first two outputs are 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4
    # (the reference sequence); mix_seed(0) is the first output of state 0, shifted to 63 bits.
    assert mix_seed(0) == 0xE220A8397B1DCDAF >> 1
    from stratavit.data.sampling import _splitmix64

    assert _splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    assert mix_seed(1, 2) != mix_seed(2, 1)  # order matters
    assert mix_seed(-1) == mix_seed((1 << 64) - 1)  # negative integers wrap to 64 bits
    assert sample_seed(0, 0, 5) != sample_seed(0, 1, 5) != sample_seed(1, 0, 5)


def test_seeded_rng_is_repeatable_and_leaves_the_callers_streams_alone():
    torch.manual_seed(7)
    random.seed(7)
    expected_t, expected_r = torch.rand(3), random.random()
    torch.manual_seed(7)
    random.seed(7)
    with seeded_rng(123):
        a = torch.rand(4), random.random()
    with seeded_rng(123):
        b = torch.rand(4), random.random()
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert torch.equal(torch.rand(3), expected_t) and random.random() == expected_r


# ----------------------------------------------------------------------------------------- order


def test_epoch_permutation_is_a_pure_function_of_seed_and_epoch():
    p = epoch_permutation(50, seed=3, epoch=2)
    assert sorted(p.tolist()) == list(range(50))
    assert torch.equal(p, epoch_permutation(50, seed=3, epoch=2))
    assert not torch.equal(p, epoch_permutation(50, seed=3, epoch=1))
    assert not torch.equal(p, epoch_permutation(50, seed=4, epoch=2))
    # (seed + epoch) is not what is hashed: seed 3 epoch 2 is not seed 4 epoch 1
    assert not torch.equal(p, epoch_permutation(50, seed=4, epoch=1))


def test_ranks_partition_the_epoch_without_duplicates():
    order = torch.tensor([7, 3, 9, 0, 5, 1, 8, 2, 6, 4])
    assert shard(order, 0, 3).tolist() == [7, 0, 8]  # order[0:9:3]
    assert shard(order, 1, 3).tolist() == [3, 5, 2]
    assert shard(order, 2, 3).tolist() == [9, 1, 6]  # 4 (the 10th) is dropped: 10 % 3
    n, world, bs = 103, 4, 5
    per_rank = [list(ResumableSampler(n, seed=0, batch_size=bs, num_replicas=world, rank=r)) for r in range(world)]
    assert [len(k) for k in per_rank] == [25, 25, 25, 25]  # 103 // 4 = 25 = 5 whole batches of 5
    indices = [i for keys in per_rank for _, i in keys]
    assert len(set(indices)) == 100
    assert set(indices) <= set(epoch_permutation(n, 0, 0)[:100].tolist())
    assert all(e == 0 for keys in per_rank for e, _ in keys)


def test_sampler_cuts_to_whole_batches_and_follows_set_epoch():
    s = ResumableSampler(23, seed=1, batch_size=4)
    assert len(s) == 20 and s.batches_per_epoch() == 5
    first = list(s)
    assert first == [(0, i) for i in epoch_permutation(23, 1, 0)[:20].tolist()]
    s.set_epoch(3)
    assert list(s) == [(3, i) for i in epoch_permutation(23, 1, 3)[:20].tolist()]
    assert list(s) == list(s)  # iterating again repeats the epoch


def test_resume_skips_the_batches_done_once():
    s = ResumableSampler(40, seed=5, batch_size=4)  # 10 batches per epoch
    full = s.keys(2)
    s.resume(2, 3)
    s.set_epoch(2)  # what Lightning does (before or after creating the iterator)
    assert list(s) == full[12:]
    assert list(s) == full  # only the first iteration skips
    s.resume(1, 10)  # a checkpoint after epoch 1's last batch: epoch 2 from its start
    s.set_epoch(1)
    assert list(s) == full and s.epoch == 2
    with pytest.raises(ValueError, match="cannot resume"):
        s.resume(0, -1)


def test_loader_batches_after_resume_are_the_uninterrupted_tail():
    data = {(e, i): i for e in range(2) for i in range(30)}  # key -> sample index
    full = ResumableSampler(30, seed=0, batch_size=4)
    resumed = ResumableSampler(30, seed=0, batch_size=4)

    def batches(sampler: ResumableSampler, epoch: int) -> list[list[int]]:
        sampler.set_epoch(epoch)
        loader = DataLoader(data, batch_size=4, sampler=sampler, drop_last=True, collate_fn=list)
        return list(loader)

    uninterrupted = batches(full, 0) + batches(full, 1)
    resumed.resume(0, 5)
    assert batches(resumed, 0) + batches(resumed, 1) == uninterrupted[5:]


# ----------------------------------------------------------------------------------------- views


def _views_by_index(ds: Indexed, sampler: ResumableSampler, workers: int, epochs: int) -> dict[tuple[int, int], tuple]:
    loader = DataLoader(ds, batch_size=4, sampler=sampler, drop_last=True, num_workers=workers,
                        collate_fn=collate_views, persistent_workers=workers > 0)
    out = {}
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            for j, i in enumerate(batch.indices.tolist()):
                g = batch.global_views[0]
                out[(epoch, i)] = (g.images[j], g.boxes[j], bool(g.flips[j]), batch.local_views[0].images[j])
    return out


def test_views_are_a_function_of_seed_epoch_and_index_not_of_workers(cifar_train):
    cfg = resolve_config("dino", [*TINY, *DINO_SMALL])
    transform = MultiCropTransform(cfg.views, 4)
    base = build_dataset(str(cifar_train), transform=transform, limit=12, seed=0)
    ds = Indexed(base, seed=11)
    a = _views_by_index(ds, ResumableSampler(12, seed=11, batch_size=4), workers=0, epochs=2)
    b = _views_by_index(ds, ResumableSampler(12, seed=11, batch_size=4), workers=2, epochs=2)
    assert a.keys() == b.keys() and len(a) == 24
    for key in a:
        assert torch.equal(a[key][0], b[key][0]) and torch.equal(a[key][1], b[key][1]) and a[key][2] == b[key][2]
        assert torch.equal(a[key][3], b[key][3])
    # the reference: the transform run under the sample's seed, here in the test process
    (epoch, index), views = next(iter(a.items()))
    with seeded_rng(sample_seed(11, epoch, index)):
        (g, _), _ = base[index]
    assert torch.equal(g[0].image, views[0]) and torch.equal(g[0].box, views[1])
    # the epoch reaches the (persistent) workers: the same image is augmented anew each epoch
    for i in range(12):
        assert not torch.equal(b[(0, i)][1], b[(1, i)][1])
    # and another run seed gives other views
    other = _views_by_index(Indexed(base, seed=12), ResumableSampler(12, seed=11, batch_size=4), 0, 1)
    assert all(not torch.equal(other[(0, i)][1], a[(0, i)][1]) for i in range(12))


def test_indexed_needs_a_seed_for_epoch_keys(cifar_train):
    ds = Indexed(build_dataset(str(cifar_train), limit=3, seed=0))
    assert ds[1][2] == 1
    with pytest.raises(TypeError, match="seed"):
        ds[(0, 1)]


# ----------------------------------------------------------------------------------------- files


def test_truncate_metrics_drops_rows_after_the_checkpoint_and_a_cut_line(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,loss,step\n0,5.0,0\n0,4.0,1\n0,3.5,2\n0,3.0,3\n0,2.")  # killed while appending "0,2.9,4"
    truncate_metrics(path, 3)
    assert path.read_text() == "epoch,loss,step\n0,5.0,0\n0,4.0,1\n0,3.5,2\n"
    path.write_text("epoch,loss,step\n0,5.0,0\n0,4.0,1\n1")  # a cut row that would parse as step 1
    truncate_metrics(path, 2)
    assert path.read_text() == "epoch,loss,step\n0,5.0,0\n0,4.0,1\n"


_SLOW_WRITER = r"""
import sys, time, torch
from pathlib import Path
from stratavit.engine.callbacks.checkpoint import save_atomically

class Strategy:
    def barrier(self, name): pass

class Trainer:  # what save_atomically uses of a Lightning Trainer
    is_global_zero = True
    strategy = Strategy()
    def save_checkpoint(self, path, weights_only=False):
        with open(path, "wb") as fh:  # a big checkpoint, half written when the process is killed
            fh.write(b"\x00" * (1 << 20))
            fh.flush()
            print("writing", flush=True)
            time.sleep(60)

save_atomically(Trainer(), Path(sys.argv[1]))
"""


@pytest.mark.slow  # a subprocess that imports Lightning: seconds on 2 busy cores
@pytest.mark.timeout(120)
def test_a_kill_during_the_checkpoint_write_leaves_the_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save({"global_step": 6, "w": torch.arange(4.0)}, ckpt)
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(ckpt)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == 6 and torch.equal(state["w"], torch.arange(4.0))
    assert (tmp_path / "checkpoints" / "last.ckpt.tmp").stat().st_size == 1 << 20  # the partial write


def test_an_error_during_the_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    from stratavit.engine.callbacks import checkpoint as checkpointing

    ckpt = tmp_path / "last.ckpt"
    torch.save({"global_step": 3}, ckpt)

    class Trainer:
        is_global_zero = True

        def save_checkpoint(self, path, weights_only=False):
            torch.save({"global_step": 6}, path)  # complete, but the rename fails (disk full, ...)

    monkeypatch.setattr(checkpointing.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("no space left")))
    with pytest.raises(OSError, match="no space"):
        checkpointing.save_atomically(Trainer(), ckpt)  # type: ignore[arg-type]
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3
    # the next run removes the stale temporary file before it trains
    assert (tmp_path / "last.ckpt.tmp").exists()
    checkpointing.LastCheckpoint(ckpt).on_fit_start(Trainer(), None)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# ----------------------------------------------------------------------------------------- runs


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return [r for r in csv.DictReader(fh) if r.get("loss")]


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("stratavit")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "stratavit.cli"]


def _wait_for_checkpoint(ckpt: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 200) -> None:
    """Poll until ``ckpt`` holds ``global_step >= step`` (loading it only when it changed)."""
    deadline, seen = time.time() + timeout, None
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        try:
            stamp = os.stat(ckpt).st_mtime_ns
        except FileNotFoundError:
            stamp = None
        if stamp is not None and stamp != seen:
            seen = stamp
            if torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"] >= step:
                return
        time.sleep(0.02)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cifar_train) -> Path:
    return pretrain("dino", str(cifar_train), tmp_path_factory.mktemp("full") / "run", RUN)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigkill_and_resume_continues_the_uninterrupted_loss_curve(tmp_path, cifar_train, uninterrupted):
    full = _rows(uninterrupted / "metrics.csv")
    assert [int(r["step"]) for r in full] == list(range(STEPS))
    rng = random.Random(2024)
    wait_for = rng.choice([4, 8, 10])  # a step checkpoint in the middle of epoch 0 or 1
    delay = rng.uniform(0.0, 0.6)  # then kill a random moment later (inside the next step(s))
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "last.ckpt"
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        proc = subprocess.Popen([*_cli(), "pretrain", "--recipe", "dino", "--data", str(cifar_train), "--out", str(run), *RUN],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        _wait_for_checkpoint(ckpt, wait_for, proc, log)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed_at = torch.load(ckpt, weights_only=True)["global_step"]  # complete and loadable
    assert wait_for <= killed_at < STEPS
    # .tmp only if killed mid-write; previous.ckpt: the checkpoint before last.ckpt
    assert {"last.ckpt"} <= set(os.listdir(ckpt.parent)) <= {"last.ckpt", "last.ckpt.tmp", "previous.ckpt", "previous.ckpt.tmp"}
    assert [int(r["step"]) for r in _rows(run / "metrics.csv")][:killed_at] == list(range(killed_at))

    res = subprocess.run([*_cli(), "pretrain", "--out", str(run), "--resume"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(run / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(STEPS))  # no gap, no duplicate
    assert sorted(os.listdir(ckpt.parent)) == ["last.ckpt", "previous.ckpt"]  # stale temporary files removed
    assert torch.load(ckpt, weights_only=True)["global_step"] == STEPS
    # On one machine and torch version the resumed run is bitwise the uninterrupted one (same data
    # order, same views, same drop-path draws, teacher and optimiser state); 1e-6 leaves room only
    # for a different thread count between the two processes.
    for a, b in zip(rows, full):
        for key in ("loss", "loss/dino", "lr", "momentum"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6, abs=1e-9), (a["step"], key)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_same_seed_gives_the_same_metrics_and_another_seed_other_ones(tmp_path, cifar_train, uninterrupted):
    full = _rows(uninterrupted / "metrics.csv")
    # the same seed, now with 2 loader workers (persistent): every logged number is the same
    again = _rows(pretrain("dino", str(cifar_train), tmp_path / "again", [*RUN, "data.num_workers=2"]) / "metrics.csv")
    assert len(again) == STEPS and again == full
    # another seed: other initial weights, order and views, so another loss from the first step on
    other = _rows(pretrain("dino", str(cifar_train), tmp_path / "seed1", [*RUN, "train.seed=1", "train.max_steps=2"]) / "metrics.csv")
    assert all(float(a["loss"]) != pytest.approx(float(b["loss"]), rel=1e-3) for a, b in zip(other, full[:2]))


@pytest.mark.slow
def test_a_checkpoint_loads_back_into_the_module_and_exports(uninterrupted):
    """The checkpoint's hyper-parameters are the config as a dict: Lightning's load_from_checkpoint
    rebuilds the module from them, and export reads the backbones."""
    from stratavit.backbones.export import backbone_from_checkpoint
    from stratavit.engine.module import PretrainModule
    from stratavit.recipe import load_config_file
    from stratavit.run_folder import RunFolder

    run = RunFolder(uninterrupted)
    state = torch.load(run.checkpoint, map_location="cpu", weights_only=True)
    module = PretrainModule.load_from_checkpoint(run.checkpoint, map_location="cpu", weights_only=True)
    assert module.cfg == load_config_file(run.config) and module.nonfinite_steps == 0
    for key, value in module.state_dict().items():
        assert torch.equal(value, state["state_dict"][key]), key
    teacher = backbone_from_checkpoint(run.checkpoint, "teacher").state_dict()
    for key, value in module.teacher.backbone.state_dict().items():
        assert torch.equal(teacher[key], value), key
