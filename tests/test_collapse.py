"""Collapse indicators (RankMe, per-dim std), the once-per-run warning, and their wiring into training."""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY

from stratavit.config import ConfigError
from stratavit.engine.callbacks.collapse import (
    PATIENCE,
    RANK_FLOOR,
    RANK_FRACTION,
    RANKME_EPS,
    STD_THRESHOLD,
    CollapseMonitor,
    collapse_metrics,
    per_dim_std,
    rankme,
    singular_value_entropy_rank,
)
from stratavit.recipe import resolve_config

MOCO_SMALL = ["objectives.infonce.proj_hidden_dim=64", "objectives.infonce.pred_hidden_dim=64", "objectives.infonce.proj_dim=32"]
DINO_SMALL = ["objectives.dino.out_dim=128", "objectives.dino.hidden_dim=64", "objectives.dino.bottleneck_dim=32",
              "views.local_crops=2"]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------------- RankMe


def test_rankme_of_known_singular_values():
    # rows (3, 0, 0) and (0, 1, 0): singular values 3 and 1, p = (3/4, 1/4) (+ ε)
    z = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    p = torch.tensor([0.75, 0.25], dtype=torch.float64) + RANKME_EPS
    expected = math.exp(-float((p * p.log()).sum()))
    assert expected == pytest.approx(0.75**-0.75 * 0.25**-0.25, rel=1e-5)  # 1.7548
    assert float(rankme(z)) == pytest.approx(expected, rel=1e-6)
    # rotating rows and columns leaves the singular values, hence the rank, unchanged
    q1, _ = torch.linalg.qr(torch.randn(2, 2, generator=torch.Generator().manual_seed(0)))
    q2, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))
    assert float(rankme(q1 @ z @ q2)) == pytest.approx(expected, rel=1e-5)
    # equal singular values: exactly their number (up to ε)
    assert float(singular_value_entropy_rank(torch.ones(4))) == pytest.approx(4.0, rel=1e-5)


def test_rankme_extremes():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(64, 1, generator=g), torch.randn(1, 32, generator=g)
    assert float(rankme(u @ v)) == pytest.approx(1.0, abs=1e-3)  # rank 1
    q, _ = torch.linalg.qr(torch.randn(64, 16, generator=g))  # orthonormal columns: 16 equal σ
    assert float(rankme(q)) == pytest.approx(16.0, rel=1e-4)
    assert float(rankme(q.t())) == pytest.approx(16.0, rel=1e-4)  # min(N, D) either way
    assert float(rankme(torch.zeros(8, 4))) == pytest.approx(1.0, abs=1e-4)  # all-zero: collapsed, finite
    assert math.isnan(float(rankme(torch.full((4, 4), float("nan")))))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        rankme(torch.zeros(2, 3, 4))


# ------------------------------------------------------------------------------ per-dim std


def test_per_dim_std_hand_computed():
    # rows +e1, -e1 (any scale): dim 0 has values 1, -1 -> unbiased std √2; dim 1 has std 0
    z = torch.tensor([[5.0, 0.0], [-0.5, 0.0]])
    std, rel = per_dim_std(z)
    assert float(std) == pytest.approx(math.sqrt(2) / 2)
    assert float(rel) == pytest.approx(1.0)  # (√2/2) · √2


def test_per_dim_std_collapsed_and_isotropic():
    row = torch.randn(1, 64)
    std, rel = per_dim_std(row.expand(32, 64) * torch.rand(32, 1) + 0.0)  # same direction, any scale
    assert float(std) == pytest.approx(0.0, abs=1e-6) and float(rel) == pytest.approx(0.0, abs=1e-5)
    z = torch.randn(8192, 64, generator=torch.Generator().manual_seed(0))
    std, rel = per_dim_std(z)
    assert float(std) == pytest.approx(1 / 8, rel=0.02)  # 1/√D
    assert float(rel) == pytest.approx(1.0, rel=0.02)
    assert all(math.isnan(float(v)) for v in per_dim_std(torch.randn(1, 8)))


def test_collapse_metrics_keys_and_fraction():
    q, _ = torch.linalg.qr(torch.randn(40, 10, generator=torch.Generator().manual_seed(0)))
    m = collapse_metrics(q)
    assert set(m) == {"rankme", "rankme_frac", "std", "std_norm"}
    assert m["rankme"] == pytest.approx(10.0, rel=1e-4) and m["rankme_frac"] == pytest.approx(1.0, rel=1e-4)
    assert m["std_norm"] == pytest.approx(m["std"] * math.sqrt(10))


# ---------------------------------------------------------------------------------- monitor

HEALTHY = {"rankme": 50.0, "rankme_frac": 0.4, "std": 0.03, "std_norm": 0.6}
LOW_RANK = {"rankme": 1.5, "rankme_frac": 1.5 / 128, "std": 0.03, "std_norm": 0.6}
LOW_STD = {"rankme": 50.0, "rankme_frac": 0.4, "std": 0.001, "std_norm": 0.02}
NAN = {"rankme": float("nan"), "rankme_frac": float("nan"), "std": float("nan"), "std_norm": float("nan")}


def _warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "stratavit.engine.callbacks.collapse" and r.levelno == logging.WARNING]


def test_monitor_warns_once_after_patience(caplog):
    caplog.set_level(logging.WARNING, logger="stratavit.engine.callbacks.collapse")
    mon = CollapseMonitor(rank_fraction=0.02, std_threshold=0.05, patience=3)
    fired = [mon.update(s, m) for s, m in enumerate([HEALTHY, LOW_RANK, LOW_STD, HEALTHY, LOW_RANK, NAN, LOW_STD])]
    assert not any(fired) and not _warnings(caplog)  # dips of 2, healthy in between; NaN skipped
    fired = [mon.update(s, LOW_RANK) for s in range(7, 12)]
    assert fired == [True, False, False, False, False]  # LOW_STD(6), LOW_RANK(7) after LOW_RANK(4): 3 in a row
    (record,) = _warnings(caplog)
    assert mon.warned and mon.warned_at == 7 and mon.history[-1].step == 11
    msg = record.getMessage()
    assert "step 7" in msg and "RankMe 1.50 of at most 128 (warns below 2.56)" in msg  # 2 % of 128
    for advice in ("optim.base_lr", "data.batch_size", "teacher.momentum", "teacher_temp", "center_momentum"):
        assert advice in msg


def test_monitor_rank_threshold_has_a_floor_for_small_batches():
    mon = CollapseMonitor(rank_fraction=0.02, std_threshold=0.05)
    assert mon.rank_threshold(384) == pytest.approx(7.68) and mon.rank_threshold(16) == RANK_FLOOR == 1.5
    healthy = {"rankme": 3.0, "std_norm": 0.5, "rankme_frac": 3.0 / 16}
    assert not mon.is_below(healthy)
    assert mon.is_below({**healthy, "rankme": 1.2, "rankme_frac": 1.2 / 16})  # 2 % of 16 alone would be 0.32
    assert mon.is_below({**healthy, "rankme": 7.0, "rankme_frac": 7.0 / 384})
    assert not mon.is_below(NAN)


def test_monitor_defaults_and_bad_settings():
    mon = CollapseMonitor()
    assert (mon.rank_fraction, mon.std_threshold, mon.patience) == (RANK_FRACTION, STD_THRESHOLD, PATIENCE)
    assert mon.update(0, LOW_STD) is False  # patience 3 by default
    with pytest.raises(ConfigError, match="collapse_rank_fraction"):
        CollapseMonitor(rank_fraction=1.5)
    with pytest.raises(ConfigError, match="collapse_std_threshold"):
        CollapseMonitor(std_threshold=-0.1)
    with pytest.raises(ConfigError, match="collapse_patience"):
        CollapseMonitor(patience=0)


def test_config_keys_resolve_and_are_checked():
    cfg = resolve_config("dino", [])
    t = cfg.train
    assert t.collapse_monitor is True
    assert (t.collapse_rank_fraction, t.collapse_std_threshold, t.collapse_patience) == (RANK_FRACTION, STD_THRESHOLD, PATIENCE)
    t = resolve_config("dino", ["train.collapse_monitor=false", "train.collapse_rank_fraction=1e-2",
                                "train.collapse_std_threshold=0.1", "train.collapse_patience=5"]).train
    assert (t.collapse_monitor, t.collapse_rank_fraction, t.collapse_std_threshold, t.collapse_patience) == (False, 0.01, 0.1, 5)
    with pytest.raises(ConfigError, match="expected an integer"):
        resolve_config("dino", ["train.collapse_patience=2.5"])
    with pytest.raises(ConfigError, match="Did you mean 'collapse_patience'"):
        resolve_config("dino", ["train.collapse_patiense=2"])


# ------------------------------------------------------------------------------- in training


def test_training_logs_collapse_metrics(tmp_path, cifar_train):
    from stratavit.engine.train import pretrain

    over = [*TINY, *DINO_SMALL, "train.max_steps=4", "train.log_every_n_steps=2", "data.limit=64"]
    run = pretrain("dino", str(cifar_train), tmp_path / "run", over)
    rows = [r for r in _rows(run / "metrics.csv") if r.get("collapse/rankme")]
    # computed exactly on the steps Lightning writes (every 2nd: steps 1 and 3), not dropped in between
    assert [int(r["step"]) for r in rows] == [1, 3]
    for r in rows:
        rank, frac = float(r["collapse/rankme"]), float(r["collapse/rankme_frac"])
        assert 1.0 <= rank <= 16.0  # batch 16 < embed_dim 32: at most 16
        assert rank / frac == pytest.approx(16.0, rel=1e-4)
        std, std_norm = float(r["collapse/std"]), float(r["collapse/std_norm"])
        assert 0.0 < std and std_norm == pytest.approx(std * math.sqrt(32), rel=1e-4)
        assert float(r["collapse/alert"]) == 0.0  # a fresh tiny ViT is not collapsed


@pytest.mark.slow
def test_collapsing_run_warns_once(tmp_path, cifar_train, monkeypatch, caplog):
    """A constant teacher embedding (a complete collapse) is reported once, with the values logged."""
    import stratavit.engine.callbacks.collapse
    from stratavit.engine.train import pretrain

    monkeypatch.setattr(stratavit.engine.callbacks.collapse, "gather_concat", lambda z: torch.ones_like(z))
    caplog.set_level(logging.WARNING, logger="stratavit.engine.callbacks.collapse")
    over = [*TINY, *MOCO_SMALL, "train.max_steps=4", "data.limit=64"]  # log every step, patience 3
    run = pretrain("mocov3", str(cifar_train), tmp_path / "run", over)
    (record,) = _warnings(caplog)
    assert "step 2" in record.getMessage() and "collapsed" in record.getMessage()
    rows = [r for r in _rows(run / "metrics.csv") if r.get("collapse/rankme")]
    assert len(rows) == 4
    for r in rows:
        assert float(r["collapse/rankme"]) == pytest.approx(1.0, abs=1e-4)
        assert float(r["collapse/std"]) == pytest.approx(0.0, abs=1e-6)
        assert float(r["collapse/alert"]) == 1.0


def test_monitor_can_be_turned_off():
    from stratavit.engine.callbacks.collapse import CollapseCallback

    over = [*TINY, *MOCO_SMALL, "train.collapse_patience=2", "train.collapse_std_threshold=0.2"]
    callback = CollapseCallback.from_config(resolve_config("mocov3", over).train)
    assert callback is not None
    assert (callback.monitor.patience, callback.monitor.std_threshold) == (2, 0.2)
    assert CollapseCallback.from_config(resolve_config("mocov3", [*over, "train.collapse_monitor=false"]).train) is None


def test_monitor_runs_on_the_steps_lightning_logs():
    """In on_train_batch_end, after optimiser step s (global_step = s + 1): due when (s + 1) % n == 0."""
    from types import SimpleNamespace

    from stratavit.engine.callbacks.collapse import CollapseCallback

    due = [s for s in range(8) if CollapseCallback.is_due(SimpleNamespace(log_every_n_steps=3, global_step=s + 1))]
    assert due == [2, 5]  # Lightning writes steps 2 and 5 (its `(batches_that_stepped + 1) % n == 0`)
    assert not CollapseCallback.is_due(SimpleNamespace(log_every_n_steps=0, global_step=1))


# ----------------------------------------------------------------------------------- report

HEALTH_CSV = """epoch,step,loss,collapse/rankme,collapse/rankme_frac,collapse/std,collapse/std_norm,collapse/alert
0,0,5.0,12.0,0.375,0.09,0.5091,0.0
0,1,4.0,,,,,
0,2,3.5,{r2},{f2},{s2},{n2},{a2}
0,3,3.4,{r3},{f3},{s3},{n3},{a3}
"""


def _health_csv(path: Path, collapsed: bool) -> Path:
    if collapsed:  # max rank 32, D = 32 (1/√D = 0.1768)
        vals = dict(r2=1.2, f2=1.2 / 32, s2=0.001, n2=0.001 * math.sqrt(32), a2=1.0,
                    r3=1.1, f3=1.1 / 32, s3=0.0005, n3=0.0005 * math.sqrt(32), a3=1.0)
    else:
        vals = dict(r2=11.0, f2=11.0 / 32, s2=0.08, n2=0.08 * math.sqrt(32), a2=0.0,
                    r3=10.0, f3=10.0 / 32, s3=0.085, n3=0.085 * math.sqrt(32), a3=0.0)
    path.write_text(HEALTH_CSV.format(**vals))
    return path


def test_collapse_summary_and_plot(tmp_path):
    from stratavit.evaluation.report import collapse_summary, plot_collapse_curve

    s = collapse_summary(_health_csv(tmp_path / "metrics.csv", collapsed=True))
    assert s is not None and (s["checks"], s["alerts"], s["first_alert_step"]) == (3, 2, 2)
    assert s["min_rankme"] == pytest.approx(1.1) and s["max_rank"] == 32 and s["last_step"] == 3
    assert s["min_std_norm"] == pytest.approx(0.0005 * math.sqrt(32))
    png = plot_collapse_curve(tmp_path / "metrics.csv", tmp_path / "c.png", thresholds=(0.02, 0.05))
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    old = tmp_path / "old.csv"  # a run from before the monitor
    old.write_text("epoch,step,loss\n0,0,5.0\n")
    assert collapse_summary(old) is None and plot_collapse_curve(old, tmp_path / "o.png") is None
    assert collapse_summary(tmp_path / "missing.csv") is None and not (tmp_path / "o.png").exists()


def test_report_training_health_section(tmp_path):
    from stratavit.evaluation.report import collapse_thresholds, write_report

    results = {"knn": {"top1": 50.0}, "linear": {"top1": 55.0}}
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("train:\n  collapse_rank_fraction: 0.1\n")
    assert collapse_thresholds(run) == (0.1, STD_THRESHOLD) and collapse_thresholds(tmp_path) is None
    text = write_report(tmp_path / "bad", results, metrics_csv=_health_csv(run / "metrics.csv", True), html=True).read_text()
    assert "## Training health" in text and "![collapse indicators](collapse_curve.png)" in text
    assert ("**Warning: possible collapse.** The collapse monitor's thresholds were crossed at 2 of 3 logged "
            "checks (first at step 2); lowest RankMe 1.10 of at most 32, lowest per-dim std × √D 0.003") in text
    assert (tmp_path / "bad" / "collapse_curve.png").exists()
    assert "possible collapse" in (tmp_path / "bad" / "report.html").read_text()
    text = write_report(tmp_path / "good", results, metrics_csv=_health_csv(run / "metrics.csv", False)).read_text()
    assert "Warning" not in text
    assert "never crossed in 3 logged checks (last RankMe 10.00, per-dim std × √D 0.481 at step 3)" in text
    old = tmp_path / "old" / "metrics.csv"  # an old run: no section, no picture, no error
    old.parent.mkdir()
    old.write_text("epoch,step,loss\n0,0,5.0\n")
    text = write_report(tmp_path / "old_report", results, metrics_csv=old).read_text()
    assert "Training health" not in text and not (tmp_path / "old_report" / "collapse_curve.png").exists()


# ------------------------------------------------------------------------- two processes

WORLD, B, C = 2, 6, 8


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch import nn

    from stratavit.backbones.features import LevelFeatures
    from stratavit.engine.callbacks.collapse import CollapseCallback, teacher_embedding
    from stratavit.objectives import ViewFeatures

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        callback = CollapseCallback.from_config(resolve_config("mocov3", [*TINY, *MOCO_SMALL]).train)
        tokens = torch.load(os.path.join(out_dir, "tokens.pt"))[rank]  # (2 views · B, 1 + 4, C)
        feats = {1: LevelFeatures(torch.zeros_like(tokens), (2, 2), nn.Identity()), 2: LevelFeatures(tokens, (2, 2), nn.Identity())}
        z = teacher_embedding(ViewFeatures(feats, None, 2, 0, None))  # type: ignore[arg-type]  # deepest level, view 1
        out = callback.check(z, step=0)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_collapse_logs_see_the_global_batch(tmp_path):
    """Two gloo processes: the logged indicators are those of both processes' first views together."""
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(WORLD, 2 * B, 5, C, generator=g)
    torch.save(tokens, tmp_path / "tokens.pt")
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    expected = collapse_metrics(torch.cat([tokens[r, :B, 0] for r in range(WORLD)]))  # (2·B, C) CLS of view 1
    assert expected["rankme"] / expected["rankme_frac"] == pytest.approx(C)  # min(12, 8), not min(6, 8)
    for r in range(WORLD):
        out = torch.load(tmp_path / f"rank{r}.pt")
        for k, v in expected.items():
            assert out[f"collapse/{k}"] == pytest.approx(v, rel=1e-5)
