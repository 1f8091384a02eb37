"""train.budget: durations, the plan, re-plans and the compressed recipe, on hand-worked numbers."""

from __future__ import annotations


import pytest

from stratavit.config import ConfigError
from stratavit.engine.budget import (
    BudgetPlan,
    Costs,
    compressed_overrides,
    parse_duration,
    plan_budget,
    predicted_seconds,
    replan,
)
from stratavit.recipe import resolve_config


@pytest.mark.parametrize("text,seconds", [("15m", 900), ("2h", 7200), ("1h30m", 5400), ("90s", 90), ("0.5h", 1800),
                                          ("45", 45), (120, 120), ("1d", 86400), (" 10 m ", 600)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["fast", "15 minutes", "m", "0m", "-5m", ""])
def test_bad_durations_say_how_to_write_one(text):
    with pytest.raises(ConfigError, match="train.budget"):
        parse_duration(text)


def test_predicted_seconds_counts_an_epoch_cost_per_epoch_started():
    c = Costs(step_s=2.0, epoch_s=10.0, fixed_s=5.0)
    # 25 steps of 10 per epoch: 3 epochs started -> 25*2 + 3*10 + 5
    assert predicted_seconds(25, 10, c) == 50 + 30 + 5
    # from step 20 (epoch 2 already started, its cost paid? no: the epoch of step 20 starts at 20)
    assert predicted_seconds(25, 10, c, from_step=20) == 5 * 2 + 1 * 10 + 5
    assert predicted_seconds(20, 10, c, from_step=20) == 5
    # from step 23, inside epoch 2: that epoch has started (its cost is paid), only epoch 3's is to come
    assert predicted_seconds(25, 10, c, from_step=23) == 2 * 2 + 5
    assert predicted_seconds(35, 10, c, from_step=23) == 12 * 2 + 1 * 10 + 5


def test_plan_fills_the_budget_and_no_more():
    c = Costs(step_s=2.0, epoch_s=10.0, fixed_s=5.0)
    plan = plan_budget(budget_s=300, spent_s=20, costs=c, steps_per_epoch=10, recipe_steps=1000)
    # 280 s available: N steps cost 2N + 10*ceil(N/10) + 5 -> N=110: 220+110+5=335 no; N=90: 180+90+5=275 yes;
    # N=91: 182+100+5=287 no -> 90
    assert plan.max_steps == 90 and plan.epochs == 9
    assert plan.scale == pytest.approx(90 / 1000)
    assert plan.planned_s == pytest.approx(20 + 275)
    assert plan.planned_s <= 300


def test_a_budget_longer_than_the_recipe_changes_nothing():
    plan = plan_budget(budget_s=10_000, spent_s=0, costs=Costs(step_s=1.0), steps_per_epoch=10, recipe_steps=50)
    assert plan.max_steps == 50 and plan.scale == 1.0


def test_a_budget_too_short_for_one_step_is_one_line():
    with pytest.raises(ConfigError, match="leaves no time for a single step.*give a longer budget"):
        plan_budget(budget_s=30, spent_s=29, costs=Costs(step_s=2.0), steps_per_epoch=10, recipe_steps=100)


def test_replan_only_when_the_pace_drifts_beyond_the_tolerance():
    c = Costs(step_s=1.0)
    plan = plan_budget(budget_s=100, spent_s=0, costs=c, steps_per_epoch=1000, recipe_steps=10_000)
    assert plan.max_steps == 100
    # at step 50 after 52 s, 1.04 s/step: projected 52 + 52 = 104 s: within 10 % -> keep
    assert replan(plan, 50, 52.0, 1.04, tolerance=0.1) is None
    # at step 50 after 75 s, 1.5 s/step: projected 75 + 75 = 150 s: re-plan to 50 + floor(25 / 1.5) = 66
    new = replan(plan, 50, 75.0, 1.5, tolerance=0.1)
    assert new is not None and new.max_steps == 66
    assert new.replans == [{"at_step": 50, "elapsed_s": 75.0, "step_s": 1.5, "max_steps": 66}]
    # faster than planned: more steps, capped by the recipe
    faster = replan(plan, 50, 25.0, 0.5, tolerance=0.1)
    assert faster is not None and faster.max_steps == 50 + 150
    # a plan survives the checkpoint round trip
    assert BudgetPlan.from_dict(new.to_dict()) == new


def test_the_recipe_is_compressed_epoch_schedules_included():
    cfg = resolve_config("dino", ["objectives.dino.warmup_teacher_temp_epochs=30"])  # 100 epochs, last layer frozen 1
    plan = BudgetPlan(budget_s=900, costs=Costs(1.0), steps_per_epoch=100, recipe_steps=10_000, max_steps=500,
                      epochs=5, scale=0.05)
    got = dict(o.split("=", 1) for o in compressed_overrides(cfg, plan))
    assert got["train.max_steps"] == "500" and got["train.epochs"] == "5"
    assert float(got["optim.warmup_epochs"]) == pytest.approx(cfg.optim.warmup_epochs * 0.05)
    dino = cfg.objectives["dino"]
    # float-typed epoch schedules keep their share of the run: 30 of 100 epochs -> 1.5 of 5, 1 -> 0.05
    assert dino.warmup_teacher_temp_epochs == 30 and got["objectives.dino.warmup_teacher_temp_epochs"] == "1.5"
    assert got["objectives.dino.freeze_last_layer_epochs"] == "0.05"
    # the overrides make a valid config
    resolve_config("dino", list(compressed_overrides(cfg, plan)))


def test_int_epoch_schedules_are_rounded_and_kept_at_one():
    """ProtoNCE's warm-up counts whole epochs before its per-epoch E-steps: rounded, and kept >= 1."""
    cfg = resolve_config("mcvt", ["objectives.protonce.warmup_epochs=20"])
    plan = BudgetPlan(budget_s=900, costs=Costs(1.0), steps_per_epoch=100, recipe_steps=10_000, max_steps=500,
                      epochs=5, scale=0.05)
    got = dict(o.split("=", 1) for o in compressed_overrides(cfg, plan))
    assert got["objectives.protonce.warmup_epochs"] == "1"  # 20 * 0.05 = 1.0
    cfg2 = resolve_config("mcvt", ["objectives.protonce.warmup_epochs=2"])
    got2 = dict(o.split("=", 1) for o in compressed_overrides(cfg2, plan))
    assert got2["objectives.protonce.warmup_epochs"] == "1"  # 0.1 rounds to 0, kept at 1 (the plan has 5 epochs > 2)


def _mcvt_plan(epochs: int, steps_per_epoch: int = 100) -> tuple[object, BudgetPlan]:
    from conftest import TINY
    from stratavit.engine.train import build_module

    module = build_module(resolve_config("mcvt", [*TINY, f"train.epochs={epochs}"]))
    plan = BudgetPlan(budget_s=120, costs=Costs(step_s=0.5, epoch_s=11.0, fixed_s=1.0, pass_s=10.0),
                      steps_per_epoch=steps_per_epoch, recipe_steps=10_000, max_steps=epochs * steps_per_epoch,
                      epochs=epochs, scale=0.01, started_s=5.0)
    return module, plan


def test_a_plan_whose_epochs_end_before_the_first_e_step_says_so_and_how_to_change_it():
    from stratavit.engine.budget_setup import pass_notes

    module, plan = _mcvt_plan(epochs=1)
    notes = pass_notes(module, plan, 1)
    assert len(notes) == 1
    # ProtoNCE's default warm-up is 10 % of the epochs, at least 1: 2 epochs are the shortest plan with a pass;
    # 101 steps: 5 s spent + 101 * 0.5 + 2 epochs * 11 + 1 = 78.5 s -> 2m
    assert "protonce" in notes[0] and "never runs" in notes[0]
    assert "train.budget=2m or more (about 2 epochs)" in notes[0]
    assert "objectives.protonce.warmup_epochs=0" in notes[0]
    assert pass_notes(*_mcvt_plan(epochs=2), 2) == []  # epoch 1 has its E-step
    # the suggested override really brings the E-step into the first epoch
    from conftest import TINY
    from stratavit.engine.train import build_module

    fixed = build_module(resolve_config("mcvt", [*TINY, "train.epochs=1", "objectives.protonce.warmup_epochs=0"]))
    assert pass_notes(fixed, plan, 1) == []
    # a plan survives the round trip with its notes
    plan.notes = notes
    assert BudgetPlan.from_dict(plan.to_dict()).notes == notes


def test_the_pace_takes_out_the_measured_dataset_passes_not_the_planned_ones(monkeypatch):
    """At a check, seconds per step = (time since training started − the epochs' planned saves − the seconds
    the dataset passes really took) / steps: an epoch without its pass (a warm-up) is not charged one."""
    from pathlib import Path
    from types import SimpleNamespace

    from stratavit.engine.callbacks import budget as budget_cb

    plan = BudgetPlan(budget_s=120, costs=Costs(step_s=0.8, epoch_s=16.0, fixed_s=0.5, pass_s=15.5),
                      steps_per_epoch=156, recipe_steps=10_000, max_steps=120, epochs=1, scale=0.01)
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(budget_cb, "time", SimpleNamespace(time=lambda: clock.now, monotonic=lambda: clock.now))
    seen = []
    monkeypatch.setattr(budget_cb, "replan", lambda plan, step, elapsed, step_s, tol: seen.append(step_s))
    watch = budget_cb.BudgetWatch(plan, Path("/nonexistent/budget.json"), started=clock.now)
    passes = SimpleNamespace(provides_dataset_pass=True, seconds=0.0)
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, callbacks=[watch, passes],
                              strategy=SimpleNamespace(broadcast=lambda x, src=0: x))
    watch.on_train_start(trainer, None)
    clock.now += 5 * 0.8  # 5 steps of 0.8 s, no E-step yet (warm-up)
    trainer.global_step = 5
    watch.on_train_batch_end(trainer, None, None, None, 4)
    assert seen[-1] == pytest.approx((4.0 - 0.5) / 5)  # before: (4 - 16) clamped to ~0 -> a plan of 780 steps
    passes.seconds = 15.0  # an E-step of 15 s, then 5 more steps
    clock.now += 15.0 + 5 * 0.8
    trainer.global_step = 10
    watch.on_train_batch_end(trainer, None, None, None, 9)
    assert seen[-1] == pytest.approx((8.0 + 15.0 - 0.5 - 15.0) / 10)


def test_a_plan_written_before_pass_s_counts_its_epoch_cost_as_the_pass():
    """Resuming a run planned by an older version: its epoch_s held the pass and the save together."""
    old = BudgetPlan(budget_s=120, costs=Costs(step_s=0.8, epoch_s=16.0, fixed_s=16.0), steps_per_epoch=156,
                     recipe_steps=10_000, max_steps=100, epochs=1, scale=0.01).to_dict()
    del old["costs"]["pass_s"], old["notes"]
    plan = BudgetPlan.from_dict(old)
    assert plan.costs.pass_s == 16.0 and plan.costs.epoch_s == 16.0 and plan.notes == []
