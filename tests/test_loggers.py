"""``train.loggers``: metrics.csv always; TensorBoard (and W&B, MLflow) only when asked for, with one
line when the name is unknown or the package missing."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY

from stratavit.cli import main
from stratavit.engine import loggers
from stratavit.engine.train import pretrain

MOCO = ["objectives.infonce.proj_hidden_dim=64", "objectives.infonce.pred_hidden_dim=64", "objectives.infonce.proj_dim=32"]
RUN = [*TINY, *MOCO, "data.limit=64", "train.max_steps=2"]


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_tensorboard_writes_the_loss_when_asked_and_only_then(tmp_path, cifar_train):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = pretrain("mocov3", str(cifar_train), tmp_path / "tb", [*RUN, "train.loggers=[csv,tensorboard]"])
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    assert {"loss", "loss/infonce", "lr"} <= set(acc.Tags()["scalars"])
    losses = acc.Scalars("loss")
    assert [e.step for e in losses] == [0, 1]
    csv_rows = (run / "metrics.csv").read_text().splitlines()
    assert len(csv_rows) == 3  # metrics.csv is written as well: header + 2 steps
    # the default is metrics.csv only, even with tensorboard installed
    plain = pretrain("mocov3", str(cifar_train), tmp_path / "plain", RUN)
    assert not (plain / "tensorboard").exists() and (plain / "metrics.csv").exists()


def test_an_unknown_logger_is_refused_in_one_line_with_the_choices(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--recipe", "mocov3", "--data", str(tmp_path), "--out", str(out), "train.loggers=[tensorbord]"]) == 2
    assert _one_line(capsys) == ("stratavit pretrain: error: train.loggers[0]: 'tensorbord' is not allowed; "
                                 "choose one of ['csv', 'tensorboard', 'wandb', 'mlflow']")
    assert not out.exists()


def test_a_logger_whose_package_is_missing_says_what_to_install(tmp_path, cifar_train, capsys, monkeypatch):
    real = loggers._installed
    monkeypatch.setattr(loggers, "_installed", lambda module: module not in ("wandb", "mlflow") and real(module))
    out = tmp_path / "run"
    assert main(["pretrain", "--recipe", "mocov3", "--data", str(cifar_train), "--out", str(out), *RUN,
                 "train.loggers=[csv,wandb,mlflow]"]) == 2
    assert _one_line(capsys) == ("stratavit pretrain: error: train.loggers lists wandb, mlflow, but the package is not "
                                 "installed: pip install wandb mlflow (or drop them from train.loggers)")
    assert not out.exists()
    # tensorboard runs on tensorboardX too; with neither, the same line names tensorboard
    monkeypatch.setattr(loggers, "_installed", lambda module: False)
    assert main(["pretrain", "--recipe", "mocov3", "--data", str(cifar_train), "--out", str(out), *RUN,
                 "train.loggers=[tensorboard]"]) == 2
    assert "pip install tensorboard (or drop it from train.loggers)" in _one_line(capsys)


def test_build_loggers_puts_metrics_csv_first_whatever_the_list(tmp_path):
    from stratavit.engine.metrics_log import RunCSVLogger
    from stratavit.run_folder import RunFolder

    built = loggers.build_loggers([], RunFolder(Path(tmp_path)))
    assert len(built) == 1 and isinstance(built[0], RunCSVLogger)
    assert len(loggers.build_loggers(["csv", "csv"], RunFolder(Path(tmp_path)))) == 1
