"""train.budget end to end on a fake clock: the plan fills the budget, a slower pace re-plans, the
schedules end with the run, and a continued run keeps the plan."""

from __future__ import annotations

import csv
import json
import time
from types import SimpleNamespace

import lightning as L
import pytest

from conftest import TINY, CrashAt
from stratavit.engine import budget_setup
from stratavit.engine.budget import Costs
from stratavit.engine.callbacks import budget as budget_cb
from stratavit.engine.train import pretrain


class FakeClock:
    """``time.time()`` that moves only when a step ends (by ``pace`` seconds), from the real now."""

    def __init__(self) -> None:
        self.now = time.time()

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


class Pace(L.Callback):
    def __init__(self, clock: FakeClock, pace: float) -> None:
        self.clock, self.pace = clock, pace

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clock.now += self.pace


def _run(tmp_path, monkeypatch, cifar_train, pace: float, budget: str = "20s", out: str = "run"):
    clock = FakeClock()
    fake_time = SimpleNamespace(time=clock.time, monotonic=clock.monotonic, sleep=time.sleep)
    monkeypatch.setattr(budget_cb, "time", fake_time)
    monkeypatch.setattr(budget_setup, "time", fake_time)
    monkeypatch.setattr(budget_setup, "measure_costs", lambda *a, **k: Costs(step_s=1.0))
    run = pretrain("mocov3", str(cifar_train), tmp_path / out, [*TINY, f"train.budget={budget}", "train.epochs=100"],
                   callbacks=[Pace(clock, pace)])
    return run, json.loads((run / "run.json").read_text())


def _lrs(run):
    with open(run / "metrics.csv") as fh:
        return [float(r["lr"]) for r in csv.DictReader(fh) if r.get("lr")]


@pytest.mark.slow
def test_plan_fills_the_budget_and_the_schedules_end_with_it(tmp_path, monkeypatch, cifar_train):
    run, summary = _run(tmp_path, monkeypatch, cifar_train, pace=1.0)
    b = summary["budget"]
    # 20 s at 1 s per step (200 images, batch 16: 12 steps per epoch; the recipe: 1,200 steps)
    assert b["max_steps"] == 20 and b["replans"] == [] and summary["global_step"] == 20 and summary["finished"]
    assert b["planned_s"] <= 20 and abs(b["actual_s"] - 20) <= 1.0
    plan = json.loads((run / "budget.json").read_text())
    assert plan["max_steps"] == 20 and plan["epochs"] == 2 and plan["scale"] == pytest.approx(20 / 1200)
    lrs = _lrs(run)
    assert len(lrs) == 20 and lrs[-1] < 0.02 * max(lrs)  # the cosine ran to its end
    cfg = (run / "config.yaml").read_text()
    assert "max_steps: 20" in cfg and "budget: 20s" in cfg  # config.yaml holds what ran


@pytest.mark.slow
def test_a_slower_pace_re_plans_and_the_schedules_follow(tmp_path, monkeypatch, cifar_train):
    run, summary = _run(tmp_path, monkeypatch, cifar_train, pace=2.0, budget="40s")
    b = summary["budget"]
    assert b["replans"], b
    first = b["replans"][0]
    assert first["at_step"] == 5 and first["step_s"] == pytest.approx(2.0, rel=0.05)
    # at step 5 after 10 s, 2 s per step: 30 s left -> 15 more steps
    assert first["max_steps"] == 20 and summary["global_step"] == b["max_steps"] == 20
    assert abs(b["actual_s"] - 40) <= 2.0
    lrs = _lrs(run)
    assert lrs[-1] < 0.02 * max(lrs)  # rebuilt over the new total: still ends at the bottom of the cosine


def test_a_bad_budget_is_one_line(tmp_path, capsys):
    from stratavit.cli import main

    assert main(["config", "--recipe", "dino", "train.budget=soon"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "write e.g. 15m, 2h, 1h30m or 900s" in err


@pytest.mark.slow
@pytest.mark.parametrize("photometric", ["loader", "device"])
def test_calibration_measures_without_changing_the_run(tmp_path, cifar_train, photometric):
    """The calibration trains a copy: the module's weights and every random generator are as before
    (also with the photometric augmentations on the training device, which read the process rank)."""
    import torch

    from stratavit.engine.calibrate import measure_costs
    from stratavit.engine.data import build_train_loader
    from stratavit.engine.train import build_module
    from stratavit.recipe import resolve_config

    cfg = resolve_config("mcvt", [*TINY, f"data.path={cifar_train}", "data.limit=64",
                                  f"views.photometric={photometric}"])
    torch.manual_seed(0)
    module = build_module(cfg)
    loader = build_train_loader(cfg, module.backbone.patch_size)
    rng = torch.get_rng_state()
    weights = {k: v.clone() for k, v in module.state_dict().items() if torch.is_tensor(v)}
    costs = measure_costs(module, loader, torch.device("cpu"), "32-true", tmp_path, steps=2)
    assert costs.step_s > 0 and costs.pass_s > 0 and costs.fixed_s > 0  # mcvt's ProtoNCE needs a dataset pass
    assert costs.epoch_s == pytest.approx(costs.fixed_s + costs.pass_s)  # the final save has no pass
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in weights.items())
    assert list(tmp_path.iterdir()) == []  # the timed checkpoint-sized file is gone



@pytest.mark.slow
def test_a_continued_budget_run_keeps_its_plan_and_counts_the_time_spent(tmp_path, monkeypatch, cifar_train):
    clock = FakeClock()
    fake_time = SimpleNamespace(time=clock.time, monotonic=clock.monotonic, sleep=time.sleep)
    monkeypatch.setattr(budget_cb, "time", fake_time)
    monkeypatch.setattr(budget_setup, "time", fake_time)
    monkeypatch.setattr(budget_setup, "measure_costs", lambda *a, **k: Costs(step_s=1.0))
    over = [*TINY, "train.budget=20s", "train.epochs=100", "train.checkpoint_every_n_steps=5"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain("mocov3", str(cifar_train), tmp_path / "run", over, callbacks=[Pace(clock, 1.0), CrashAt(7)])
    # continued: steps 5..19 redone from the step-5 checkpoint; the measured pace would now plan anew,
    # but the plan (20 steps) comes from the checkpoint, and the 5 s spent up to it count
    monkeypatch.setattr(budget_setup, "measure_costs", lambda *a, **k: pytest.fail("a continued run measures nothing"))
    clock.now = time.time()  # the new process starts now (pretrain reads the real clock for its start)
    run = pretrain(None, None, tmp_path / "run", [], callbacks=[Pace(clock, 1.0)])
    summary = json.loads((run / "run.json").read_text())
    assert summary["global_step"] == 20 and summary["budget"]["max_steps"] == 20 and summary["finished"]
    assert abs(summary["budget"]["actual_s"] - 20) <= 1.0  # 5 s before the checkpoint + 15 s after it
    assert _lrs(run)[-1] < 0.02 * max(_lrs(run))
