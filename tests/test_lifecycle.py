"""The life of a ``stratavit pretrain`` run: stopping on SIGINT / SIGTERM with a checkpoint and
continuing exactly, time-based checkpoints, a damaged checkpoint, metrics.csv and run.json, a quiet
console, data.num_workers=auto, and no empty run folder left by a check that fails."""

from __future__ import annotations

import csv
import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY, CrashAt

from stratavit.cli import main
from stratavit.engine.callbacks import checkpoint as checkpointing
from stratavit.engine.callbacks.interrupt import StopSignals, TrainingInterrupted
from stratavit.engine.data import resolve_num_workers
from stratavit.engine.train import pretrain
from stratavit.recipe import resolve_config

DINO_SMALL = ["objectives.dino.out_dim=128", "objectives.dino.hidden_dim=64", "objectives.dino.bottleneck_dim=32",
              "views.local_crops=2"]
# dino: drop path, EMA teacher, centre buffer, local crops; 96 images -> 6 steps per epoch, 12 steps
RUN = [*TINY, *DINO_SMALL, "train.epochs=2", "data.limit=96"]
STEPS = 12
MOCO = ["objectives.infonce.proj_hidden_dim=64", "objectives.infonce.pred_hidden_dim=64", "objectives.infonce.proj_dim=32"]


def _cli() -> list[str]:
    exe = Path(sys.executable).with_name("stratavit")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "stratavit.cli"]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return [r for r in csv.DictReader(fh) if r.get("loss")]


def _steps(path: Path) -> list[int]:
    return [int(r["step"]) for r in _rows(path)]


def _state(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=True)


def _wait_for_a_logged_step(metrics: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, "the run ended before it was signalled"
        assert time.time() < deadline, "no step was logged"
        if metrics.exists() and _rows(metrics):
            return
        time.sleep(0.05)


# ----------------------------------------------------------------------------------------- signals


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cifar_train) -> Path:
    return pretrain("dino", str(cifar_train), tmp_path_factory.mktemp("full") / "run", RUN)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_at_a_step_with_a_checkpoint_and_the_run_continues_exactly(tmp_path, cifar_train, uninterrupted, signum):
    """SIGINT as a terminal's Ctrl-C sends it, to the whole process group, loader worker included;
    SIGTERM as ``kill`` sends it, to the training process alone."""
    run = tmp_path / "run"
    workers = ["data.num_workers=1"] if signum == signal.SIGINT else []
    proc = subprocess.Popen([*_cli(), "pretrain", "--recipe", "dino", "--data", str(cifar_train), "--out", str(run), *RUN, *workers],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_for_a_logged_step(run / "metrics.csv", proc)
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        out, err = proc.communicate(timeout=240)
    finally:
        _kill_group(proc)
    assert proc.returncode == 128 + signum, err[-3000:]
    text = out + err
    assert "Traceback" not in text and "Detected KeyboardInterrupt" not in text
    stopped = [line for line in err.splitlines() if line.startswith("stopped by")]
    assert len(stopped) == 1, err[-3000:]
    state = _state(run / "checkpoints" / "last.ckpt")
    step = state["global_step"]
    assert 1 <= step < STEPS
    name = signal.Signals(signum).name
    assert stopped[0] == (f"stopped by {name} at step {step}, checkpoint saved at step {step} "
                          f"({run / 'checkpoints' / 'last.ckpt'}); continue with: stratavit pretrain --out {run}")
    summary = json.loads((run / "run.json").read_text())
    assert summary["global_step"] == step and summary["finished"] is False and summary["stopped_by"] == name
    assert summary["planned_steps"] == STEPS and summary["epochs"] == round(step / 6, 4)
    assert _steps(run / "metrics.csv") == list(range(step))  # every step up to the stop, logged

    command = stopped[0].split("continue with: ")[1]
    assert main(shlex.split(command)[1:]) == 0  # what the line says to run
    assert _steps(run / "metrics.csv") == list(range(STEPS))  # no gap, no duplicate
    continued, full = _state(run / "checkpoints" / "last.ckpt"), _state(uninterrupted / "checkpoints" / "last.ckpt")
    assert continued["global_step"] == full["global_step"] == STEPS
    assert continued["state_dict"].keys() == full["state_dict"].keys()
    for key, value in full["state_dict"].items():  # student, teacher, heads, DINO centre: bit for bit
        assert torch.equal(continued["state_dict"][key], value), key
    summary = json.loads((run / "run.json").read_text())
    assert summary["finished"] is True and summary["stopped_by"] is None and summary["epochs_completed"] == 2


def test_the_first_signal_asks_the_second_stops_and_a_save_in_progress_waits_for_a_third():
    signals = StopSignals(verbose_notice=False)
    signals.handle(signal.SIGTERM)
    assert signals.received == signal.SIGTERM
    signals.step, signals.checkpoint, signals.checkpoint_step = 7, Path("run/checkpoints/last.ckpt"), 4
    with pytest.raises(TrainingInterrupted) as stop:
        signals.handle(signal.SIGINT)
    assert stop.value.exit_code == 143 and stop.value.step == 7 and stop.value.checkpoint_step == 4
    stop.value.run_dir = Path("run")
    assert stop.value.message() == ("stopped by SIGTERM at step 7, without a new checkpoint; the one at step 4 is kept "
                                    "(run/checkpoints/last.ckpt); continue with: stratavit pretrain --out run")
    saving = StopSignals(verbose_notice=False)
    saving.handle(signal.SIGINT)
    saving.saving = True
    saving.handle(signal.SIGINT)  # noted, not raised: the checkpoint is being written
    with pytest.raises(TrainingInterrupted):
        saving.handle(signal.SIGINT)
    fresh = TrainingInterrupted(signal.SIGINT, 0, None, None)
    assert fresh.exit_code == 130 and "nothing to continue from" in fresh.message()


class _CtrlC(L.Callback):
    """Presses Ctrl-C ``times`` times after step ``at_step`` (signals to this very process)."""

    def __init__(self, at_step: int, times: int) -> None:
        self.at_step, self.times = at_step, times

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.at_step:
            for _ in range(self.times):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # each is handled before the next (the handler runs between bytecodes)


def test_a_second_ctrl_c_stops_at_once_keeping_the_last_checkpoint(tmp_path, cifar_train, capfd):
    run = tmp_path / "run"
    over = [*TINY, *MOCO, "data.limit=64", "train.epochs=2", "train.checkpoint_every_n_steps=2"]  # 8 steps
    with pytest.raises(TrainingInterrupted) as stop:
        pretrain("mocov3", str(cifar_train), run, over, callbacks=[_CtrlC(3, 2)])
    assert stop.value.exit_code == 130 and stop.value.step == 3 and stop.value.checkpoint_step == 2
    assert stop.value.message() == ("stopped by SIGINT at step 3, without a new checkpoint; the one at step 2 is kept "
                                    f"({run / 'checkpoints' / 'last.ckpt'}); continue with: stratavit pretrain --out {run}")
    assert "SIGINT: stopping after the current step" in capfd.readouterr().err  # the first press, acknowledged
    assert _state(run / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert json.loads((run / "run.json").read_text())["stopped_by"] == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own handler is back
    # one press: stops after the step, with its checkpoint
    with pytest.raises(TrainingInterrupted) as stop:
        pretrain(out=run, callbacks=[_CtrlC(5, 1)])
    assert stop.value.step == stop.value.checkpoint_step == 6  # pressed during step 5's end: stops after step 6
    assert _state(run / "checkpoints" / "last.ckpt")["global_step"] == 6
    pretrain(out=run)
    assert _steps(run / "metrics.csv") == list(range(8))


def test_stop_signals_install_and_restore_the_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with StopSignals(verbose_notice=False) as signals:
        assert signal.getsignal(signal.SIGINT) == signals.handle == signal.getsignal(signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # recorded, the process goes on
        time.sleep(0.05)
        assert signals.received == signal.SIGTERM
    assert {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} == before


class _Dispositions(torch.utils.data.Dataset):
    """Reports, from the loader worker that loads it, how that process treats SIGINT and SIGTERM."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> tuple[bool, bool]:
        return signal.getsignal(signal.SIGINT) == signal.SIG_IGN, signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def test_loader_workers_leave_the_stop_signals_to_the_training_process():
    from torch.utils.data import DataLoader

    from stratavit.engine.data import ignore_stop_signals

    loader = ignore_stop_signals(DataLoader(_Dispositions(), batch_size=None, num_workers=1,
                                            worker_init_fn=print, multiprocessing_context="fork"))
    assert [tuple(x) for x in loader] == [(True, True)]
    assert signal.getsignal(signal.SIGINT) != signal.SIG_IGN  # this process is untouched
    assert pickle.loads(pickle.dumps(loader.worker_init_fn)).inner is print  # spawn / forkserver workers get it pickled


def _agree_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)

    class Strategy:
        root_device = torch.device("cpu")

    class Trainer:
        strategy = Strategy()

    # only process 1 was signalled; only process 0's clock says a checkpoint is due
    got = checkpointing.agree_max(Trainer(), 15 if rank == 1 else 0, 1 if rank == 0 else 0)  # type: ignore[arg-type]
    Path(out_dir, f"{rank}.json").write_text(json.dumps(got))
    dist.destroy_process_group()


def test_processes_agree_on_a_signal_only_one_of_them_received(tmp_path):
    fork = mp.get_context("fork")  # (spawn would import this module again in each process: seconds)
    procs = [fork.Process(target=_agree_worker, args=(r, str(tmp_path / "init"), str(tmp_path))) for r in (0, 1)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)] == [[15, 1], [15, 1]]


def _child_with(env_key: str, env_value: str, parent: int, timeout: float = 120) -> int:
    """The pid of a child process of ``parent`` whose environment has ``env_key=env_value``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for task in Path(f"/proc/{parent}/task").iterdir():
            for pid in (task / "children").read_text().split():
                try:
                    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"{env_key}={env_value}".encode() in environ:
                    return int(pid)
        time.sleep(0.1)
    raise AssertionError(f"no child with {env_key}={env_value}")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the second process through /proc")
def test_under_ddp_a_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path, cifar_train):
    run = tmp_path / "ddp"
    proc = subprocess.Popen([*_cli(), "pretrain", "--recipe", "dino", "--data", str(cifar_train), "--out", str(run),
                             *RUN, "data.limit=128", "train.devices=2", "train.accelerator=cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        rank1 = _child_with("LOCAL_RANK", "1", proc.pid)
        _wait_for_a_logged_step(run / "metrics.csv", proc)
        os.kill(rank1, signal.SIGTERM)  # the second process only: the first must learn it from it
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in out + err
    step = _state(run / "checkpoints" / "last.ckpt")["global_step"]
    assert 1 <= step < 8  # 128 images, 2 processes x 16: 4 steps per epoch, 8 in all
    assert f"stopped by SIGTERM at step {step}, checkpoint saved at step {step}" in err
    assert json.loads((run / "run.json").read_text())["stopped_by"] == "SIGTERM"


# ----------------------------------------------------------------------------------------- checkpoints


def _saves(monkeypatch) -> list[int]:
    saved: list[int] = []
    original = checkpointing.save_atomically

    def record(trainer, path, keep_previous=True):
        saved.append(int(trainer.global_step))
        original(trainer, path, keep_previous)

    monkeypatch.setattr(checkpointing, "save_atomically", record)
    return saved


def test_a_checkpoint_every_few_minutes_and_the_previous_one_kept(tmp_path, cifar_train, monkeypatch):
    saved = _saves(monkeypatch)
    over = [*TINY, *MOCO, "data.limit=64", "train.max_steps=3"]
    run = pretrain("mocov3", str(cifar_train), tmp_path / "timed", [*over, "train.checkpoint_every_minutes=1e-9"])
    assert saved == [1, 2, 3]  # the clock says "due" after every step: written at each step boundary
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "previous.ckpt"]
    assert _state(ckpts / "last.ckpt")["global_step"] == 3 and _state(ckpts / "previous.ckpt")["global_step"] == 2
    saved.clear()
    pretrain("mocov3", str(cifar_train), tmp_path / "untimed", over)  # 30 minutes: not in 3 steps
    assert saved == [3]


# ----------------------------------------------------------------------------------------- damaged


def _truncate(path: Path) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return data[: len(data) // 2]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_a_damaged_checkpoint_says_so_and_the_command_it_gives_continues(tmp_path, cifar_train, capsys):
    run = tmp_path / "run"
    over = [*TINY, *MOCO, "data.limit=64", "train.max_steps=4", "train.checkpoint_every_n_steps=2"]
    assert main(["pretrain", "--recipe", "mocov3", "--data", str(cifar_train), "--out", str(run), *over]) == 0
    capsys.readouterr()
    last, previous = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "previous.ckpt"
    assert _state(previous)["global_step"] == 2
    damaged = _truncate(last)
    for flags in ([], ["--resume"]):
        assert main(["pretrain", "--out", str(run), *flags]) == 2
        line = _error_line(capsys)
        assert line.startswith(f"stratavit pretrain: error: {last} is damaged (")
        assert line.endswith(f"it is kept as is. Continue from the checkpoint before it (step 2) with: "
                             f"stratavit pretrain --out {run} --from-previous")
        assert last.read_bytes() == damaged  # kept as is
    command = line.split(" with: ")[1]
    assert main(shlex.split(command)[1:]) == 0
    assert _state(last)["global_step"] == 4
    assert (run / "checkpoints" / "last.ckpt.set-aside").read_bytes() == damaged
    assert _steps(run / "metrics.csv") == [0, 1, 2, 3]  # steps 2 and 3 again, once each


def test_a_damaged_checkpoint_without_a_previous_one_says_to_start_over(tmp_path, cifar_train, capsys):
    run = tmp_path / "run"
    over = [*TINY, *MOCO, "data.limit=64", "train.max_steps=2"]
    assert main(["pretrain", "--recipe", "mocov3", "--data", str(cifar_train), "--out", str(run), *over]) == 0
    capsys.readouterr()
    assert not (run / "checkpoints" / "previous.ckpt").exists()
    _truncate(run / "checkpoints" / "last.ckpt")
    assert main(["pretrain", "--out", str(run)]) == 2
    line = _error_line(capsys)
    assert "is damaged" in line and line.endswith(f"start over in a new folder with: stratavit pretrain --recipe "
                                                  f"{run / 'config.yaml'} --out NEW_RUN_DIR")
    assert main(["pretrain", "--out", str(run), "--from-previous"]) == 2
    assert "--from-previous: there is no earlier checkpoint" in _error_line(capsys)
    command = line.split(" with: ")[1].replace("NEW_RUN_DIR", str(tmp_path / "new"))
    assert main(shlex.split(command)[1:]) == 0
    assert _state(tmp_path / "new" / "checkpoints" / "last.ckpt")["global_step"] == 2


# ----------------------------------------------------------------------------------------- metrics, run.json



def test_first_and_last_steps_are_logged_and_run_json_counts_epochs(tmp_path, cifar_train):
    over = [*TINY, *MOCO, "data.limit=64", "train.log_every_n_steps=50", "train.epochs=1"]  # 4 steps per epoch
    run = pretrain("mocov3", str(cifar_train), tmp_path / "short", [*over, "train.max_steps=3"])
    assert _steps(run / "metrics.csv") == [0, 2]  # a run shorter than the interval still has its ends
    summary = json.loads((run / "run.json").read_text())
    assert {k: summary[k] for k in ("global_step", "planned_steps", "max_steps", "steps_per_epoch", "epochs",
                                    "epochs_completed", "finished")} == {
        "global_step": 3, "planned_steps": 3, "max_steps": 3, "steps_per_epoch": 4, "epochs": 0.75,
        "epochs_completed": 0, "finished": True}
    # killed after step 3 (checkpoint at 2), continued: the rows stay unique and the ends are there
    crash = tmp_path / "crash"
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain("mocov3", str(cifar_train), crash, [*over, "train.checkpoint_every_n_steps=2"], callbacks=[CrashAt(3)])
    assert _steps(crash / "metrics.csv") == [0]
    pretrain(out=crash, overrides=[*over, "train.checkpoint_every_n_steps=2"], resume=True)
    assert _steps(crash / "metrics.csv") == [0, 3]
    summary = json.loads((crash / "run.json").read_text())
    assert summary["epochs"] == 1.0 and summary["epochs_completed"] == 1 and summary["finished"] is True
    assert summary["resumed"] is True and summary["planned_steps"] == 4


def test_a_run_started_again_before_its_first_checkpoint_logs_each_step_once(tmp_path, cifar_train):
    over = [*TINY, *MOCO, "data.limit=64", "train.epochs=1"]
    early = tmp_path / "early"
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain("mocov3", str(cifar_train), early, [*over, "train.log_every_n_steps=1"], callbacks=[CrashAt(2)])
    assert _steps(early / "metrics.csv") == [0] and not (early / "checkpoints").exists()
    pretrain("mocov3", str(cifar_train), early, [*over, "train.log_every_n_steps=1"])
    assert _steps(early / "metrics.csv") == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------- console


_NOISE = ("GPU available", "TPU available", "litlogger", "Tip:", "worker processes in total",
          "smaller than the logging interval", "Detected KeyboardInterrupt", "Traceback", "INFO")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_console_shows_the_run_and_not_the_libraries_chatter(tmp_path, cifar_train):
    args = ["pretrain", "--recipe", "mocov3", "--data", str(cifar_train), "--out", str(tmp_path / "run"), *TINY, *MOCO,
            "data.limit=64", "train.max_steps=2", "data.num_workers=auto", "train.log_every_n_steps=50"]
    res = subprocess.run([*_cli(), *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    text = res.stdout + res.stderr
    for noise in _NOISE:
        assert noise not in text, noise
    assert res.stdout.splitlines()[0] == ("training mocov3 on 64 images: 2 steps (0.5 epochs of 4 steps, "
                                          f"batch 16 x 1 process, 32-true on CPU) -> {tmp_path / 'run'}")
    assert f"run folder: {tmp_path / 'run'}" in res.stdout
    # -v: the libraries' logs, once each
    res = subprocess.run([*_cli(), "-v", *args[:6], str(tmp_path / "verbose"), *args[7:]], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (res.stdout + res.stderr).count("GPU available") == 1


def test_num_workers_auto_leaves_a_core_to_each_training_process(monkeypatch, tmp_path):
    from stratavit.engine import data

    cfg = resolve_config("mocov3", [])
    assert cfg.data.num_workers == "auto"
    for cores, devices, expected in ((1, 1, 0), (2, 1, 1), (16, 2, 7), (64, 1, 8)):
        monkeypatch.setattr(data, "usable_cores", lambda cores=cores: cores)
        assert resolve_num_workers(resolve_config("mocov3", [f"train.devices={devices}"])) == expected
    assert resolve_num_workers(resolve_config("mocov3", ["data.num_workers=3"])) == 3


def test_num_workers_auto_is_kept_in_the_config_and_the_number_recorded(tmp_path, cifar_train):
    over = [*TINY, *MOCO, "data.limit=64", "train.max_steps=1", "data.num_workers=auto"]
    run = pretrain("mocov3", str(cifar_train), tmp_path / "run", over)
    assert "num_workers: auto" in (run / "config.yaml").read_text()
    session = json.loads((run / "environment.json").read_text())["sessions"][-1]
    assert session["data_workers"] == resolve_num_workers(resolve_config("mocov3", []))


# ----------------------------------------------------------------------------------------- pre-flight


def test_a_check_that_fails_leaves_no_folder_behind(tmp_path, cifar_train, capsys):
    new = tmp_path / "new" / "run"
    assert main(["pretrain", "--recipe", "mocov3", "--data", str(tmp_path / "missing"), "--out", str(new), *TINY]) == 2
    assert "does not exist" in _error_line(capsys)
    assert not (tmp_path / "new").exists()  # the parent it made goes too
    # a config only the built model can refuse (more level taps than blocks)
    assert main(["pretrain", "--recipe", "mcvt", "--data", str(cifar_train), "--out", str(new), *TINY,
                 "backbone.depth=1"]) == 2
    assert _error_line(capsys).startswith("stratavit pretrain: error: ")
    assert not (tmp_path / "new").exists()
    # a folder that existed is left alone, with what it holds
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["pretrain", "--recipe", "mocov3", "--data", str(tmp_path / "missing"), "--out", str(mine), *TINY]) == 2
    _error_line(capsys)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_the_cli_reports_a_stop_and_an_interrupt_outside_training_in_one_line(monkeypatch, capsys, tmp_path):
    from stratavit import cli

    def stopped(args):
        stop = TrainingInterrupted(signal.SIGTERM, 40, Path(args.out) / "checkpoints" / "last.ckpt", 40)
        stop.run_dir = Path(args.out)
        raise stop

    monkeypatch.setattr(cli, "cmd_demo", stopped)  # the demo trains through pretrain too
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 143
    line = _error_line(capsys)
    assert line.startswith("stopped by SIGTERM at step 40, checkpoint saved at step 40")
    assert line.endswith(f"continue with: stratavit demo --out {tmp_path / 'demo'}")

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_recipes", interrupted)
    assert main(["recipes"]) == 130
    assert _error_line(capsys) == ("stratavit recipes: interrupted; run the same command again "
                                   "(a run folder with a checkpoint continues from it)")
