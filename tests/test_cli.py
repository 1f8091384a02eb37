"""The command line as a user calls it: pretrain -> evaluate -> export -> reload in timm; resume."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY, CrashAt

from stratavit import load_backbone, pretrain

MOCO_SMALL = ["objectives.infonce.proj_hidden_dim=64", "objectives.infonce.pred_hidden_dim=64", "objectives.infonce.proj_dim=32"]
DINO_SMALL = ["objectives.dino.out_dim=128", "objectives.dino.hidden_dim=64", "objectives.dino.bottleneck_dim=32",
              "views.local_crops=2"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("stratavit")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "stratavit.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=600)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return [r for r in csv.DictReader(fh) if r.get("loss")]


def test_recipes_and_config_commands():
    res = _cli("recipes")
    assert res.returncode == 0 and "mocov3" in res.stdout and "dino" in res.stdout
    res = _cli("config", "--recipe", "dino", "train.epochs=7")
    assert res.returncode == 0 and "epochs: 7" in res.stdout


def test_bad_override_fails_before_training(tmp_path):
    res = _cli("pretrain", "--recipe", "mocov3", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "train.epoch=2")
    assert res.returncode == 2
    assert "train.epoch" in res.stderr and "epochs" in res.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()
    res = _cli("pretrain", "--recipe", "mocov3", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and "does not exist" in res.stderr
    res = _cli("evaluate", str(tmp_path / "not-a-run"), "--train", str(tmp_path), "--test", str(tmp_path))
    assert res.returncode == 2 and "not a stratavit run folder" in res.stderr


@pytest.mark.slow
@pytest.mark.parametrize("recipe, extra", [("mocov3", MOCO_SMALL), ("dino", DINO_SMALL)])
def test_pretrain_evaluate_export_reload(tmp_path, cifar_train, cifar_test, recipe, extra):
    run = tmp_path / "run"
    res = _cli("pretrain", "--recipe", recipe, "--data", str(cifar_train), "--out", str(run), *TINY, *extra, "train.max_steps=4")
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("config.yaml", "metrics.csv", "checkpoints/last.ckpt", "backbone.safetensors", "run.json"):
        assert (run / name).exists(), name
    rows = _rows(run / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert {"step", "epoch", "loss", f"loss/{'infonce' if recipe == 'mocov3' else 'dino'}", "lr"} <= set(rows[0])
    assert all(float(r["loss"]) == float(r["loss"]) for r in rows)  # finite, not NaN

    res = _cli("evaluate", str(run), "--train", str(cifar_train), "--test", str(cifar_test),
               "--train-limit", "300", "--test-limit", "100", "--baselines")
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((run / "eval" / "results.json").read_text())
    assert 0 <= results["knn"]["top1"] <= 100 and 0 <= results["linear"]["top1"] <= 100
    assert [layer["block"] for layer in results["layers"]] == [1, 2]
    assert results["layers"][-1]["knn_top1"] == results["knn"]["top1"]
    assert set(results["baselines"]) == {"random_init", "raw_pixels"}
    report = (run / "eval" / "report.md").read_text()
    assert "layer_curve.png" in report and (run / "eval" / "layer_curve.png").exists()
    assert (run / "eval" / "loss_curve.png").exists()

    out = tmp_path / "exported.safetensors"
    res = _cli("export", str(run), "--to", "timm", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    kw = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, dynamic_img_size=True)
    plain = timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(out)), num_classes=0, **kw)
    strict = timm.create_model("vit_tiny_patch16_224", num_classes=0, **kw)
    from safetensors.torch import load_file

    missing, unexpected = strict.load_state_dict(load_file(str(out)), strict=True)
    assert not missing and not unexpected
    ours = load_backbone(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), ours(x))
        torch.testing.assert_close(strict.eval()(x), ours(x))
    # a head for fine-tuning loads too (head is newly initialised)
    timm.create_model("vit_tiny_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(out)), num_classes=10, **kw)



@pytest.mark.slow
def test_resume_continues_steps_and_loss_curve(tmp_path, cifar_train):
    args = dict(recipe="mocov3", data=str(cifar_train))
    over = [*TINY, *MOCO_SMALL, "train.epochs=2", "train.checkpoint_every_n_steps=4", "data.limit=128"]
    # uninterrupted: 2 epochs x 8 steps
    full = pretrain(out=tmp_path / "full", overrides=over, **args)
    full_rows = _rows(full / "metrics.csv")
    assert [int(r["step"]) for r in full_rows] == list(range(16))
    # crash after step 6 (last checkpoint at step 4), then run the same command again
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain(out=tmp_path / "crash", overrides=over, callbacks=[CrashAt(6)], **args)
    ckpt = torch.load(tmp_path / "crash" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    with pytest.raises(Exception, match="nothing to continue"):
        pretrain(out=tmp_path / "other", overrides=over, resume=True, **args)
    with pytest.raises(Exception, match="already past"):  # a limit below the checkpoint: clear error, nothing lost
        pretrain(out=tmp_path / "crash", overrides=[*over, "train.max_steps=2"], resume=True, **args)
    assert torch.load(tmp_path / "crash" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    resumed = pretrain(out=tmp_path / "crash", overrides=over, resume=True, **args)
    rows = _rows(resumed / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(16))  # no gap, no duplicate
    # weights, optimiser, schedules, data order and views continue exactly where they stopped: the
    # resumed curve is the uninterrupted one (tests/test_resume.py has the SIGKILL version)
    for a, b in zip(rows, full_rows):
        for key in ("loss", "lr", "momentum"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6), (a["step"], key)
    summary = json.loads((resumed / "run.json").read_text())
    assert summary["resumed"] is True and summary["global_step"] == 16


@pytest.mark.slow
def test_killed_run_resumes_from_the_last_epoch_without_step_checkpoints(tmp_path, cifar_train):
    """No checkpoint_every_n_steps: every epoch end still leaves a complete last.ckpt to continue from."""
    over = [*TINY, *MOCO_SMALL, "train.epochs=3", "data.limit=128"]  # 8 steps per epoch
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain("mocov3", str(cifar_train), tmp_path / "run", over, callbacks=[CrashAt(12)])
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["last.ckpt"]  # no stray temp or epoch files
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 8
    resumed = pretrain("mocov3", str(cifar_train), tmp_path / "run", over, resume=True)
    assert [int(r["step"]) for r in _rows(resumed / "metrics.csv")] == list(range(24))
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 24


@pytest.mark.slow
def test_two_process_ddp_run_on_cpu(tmp_path, cifar_train):
    """train.devices=2 runs Lightning's DDP with gloo on CPU (the gathered loss paths for real)."""
    run = tmp_path / "ddp"
    res = _cli("pretrain", "--recipe", "dino", "--data", str(cifar_train), "--out", str(run), *TINY, *DINO_SMALL,
               "train.max_steps=3", "train.devices=2", "train.accelerator=cpu", "data.limit=128")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("run folder:") == 1
    summary = json.loads((run / "run.json").read_text())
    assert summary["global_step"] == 3
    assert [int(r["step"]) for r in _rows(run / "metrics.csv")] == [0, 1, 2]
    assert load_backbone(run) is not None


MCVT_SMALL = ["objectives.infonce.proj_hidden_dim=64", "objectives.infonce.pred_hidden_dim=64",
              "objectives.protonce.proj_hidden_dim=64", "objectives.protonce.pred_hidden_dim=64",
              "objectives.protonce.num_clusters=[4,8]", "backbone.depth=4"]


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 2])
def test_mcvt_runs_its_estep_every_epoch_after_warmup(tmp_path, cifar_train, devices):
    """MCVT end to end: InfoNCE-only warm-up epoch, then one E-step per epoch (also under 2-process DDP)."""
    run = tmp_path / "mcvt"
    res = _cli("pretrain", "--recipe", "mcvt", "--data", str(cifar_train), "--out", str(run), *TINY, *MCVT_SMALL,
               "train.epochs=3", "data.limit=96", f"train.devices={devices}", "train.accelerator=cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    with (run / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    estep = [r for r in rows if r.get("estep/seconds")]
    assert [int(r["epoch"]) for r in estep] == [1, 2]  # warm-up: 10 % of 3 epochs -> 1 epoch
    for r in estep:
        assert float(r["protonce/k4/phi_mean"]) == pytest.approx(0.2, rel=1e-4)  # φ rescaled to mean τ
        assert float(r["protonce/k8/empty"]) == 0
    steps = [r for r in rows if r.get("loss")]
    warm = [r for r in steps if int(r["epoch"]) == 0]
    later = [r for r in steps if int(r["epoch"]) >= 1]
    assert all(not r.get("protonce/proto") for r in warm)
    assert all(r.get("protonce/proto") for r in later)
    assert {"loss/infonce", "loss/protonce", "infonce/block1", "infonce/block3"} <= set(rows[0])


@pytest.mark.slow
def test_cl_edi_runs(tmp_path, cifar_train):
    run = tmp_path / "cledi"
    res = _cli("pretrain", "--recipe", "cl-edi", "--data", str(cifar_train), "--out", str(run), *TINY, *MOCO_SMALL,
               "objectives.patch_aggregate.proj_hidden_dim=64", "objectives.patch_aggregate.pred_hidden_dim=64",
               "train.max_steps=3")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(run / "metrics.csv")
    assert len(rows) == 3 and all(r["loss/patch_aggregate"] and r["loss/infonce"] for r in rows)
    total = [float(r["loss"]) for r in rows]
    parts = [float(r["loss/infonce"]) + float(r["loss/patch_aggregate"]) for r in rows]
    assert total == pytest.approx(parts, rel=1e-5)


DINO_FAMILY_SMALL = ["out_dim=128", "hidden_dim=64", "bottleneck_dim=32"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe, parts, weights", [
    ("ibot", ["ibot_mim"], [1.0]),
    ("sere", ["ibot_mim", "self_relation"], [1.65, 1.0]),
])
def test_masked_recipes_run(tmp_path, cifar_train, recipe, parts, weights):
    run = tmp_path / recipe
    res = _cli("pretrain", "--recipe", recipe, "--data", str(cifar_train), "--out", str(run), *TINY,
               *[f"objectives.ibot_mim.{s}" for s in DINO_FAMILY_SMALL], "views.local_crops=2", "train.max_steps=3")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(run / "metrics.csv")
    assert len(rows) == 3 and all(r[f"loss/{p}"] for r in rows for p in parts)
    assert all(0.0 <= float(r["ibot/mask_ratio"]) <= 0.5 for r in rows)
    total = [float(r["loss"]) for r in rows]
    summed = [sum(w * float(r[f"loss/{p}"]) for p, w in zip(parts, weights)) for r in rows]
    assert total == pytest.approx(summed, rel=1e-5)
    assert (run / "backbone.safetensors").exists()


@pytest.mark.slow
def test_local_global_runs_with_patch_jitter(tmp_path, cifar_train):
    run = tmp_path / "lg"
    res = _cli("pretrain", "--recipe", "local-global", "--data", str(cifar_train), "--out", str(run), *TINY,
               *[f"objectives.patch_match.{s}" for s in DINO_FAMILY_SMALL], "objectives.patch_match.patch_jitter_p=0.5",
               "views.local_crops=2", "train.max_steps=3")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(run / "metrics.csv")
    assert len(rows) == 3 and all(float(r["patch_match/matched_per_pair"]) > 0 for r in rows)
    assert [float(r["loss"]) for r in rows] == pytest.approx([float(r["loss/patch_match"]) for r in rows])


@pytest.mark.slow
def test_mcl_runs_every_montage_level(tmp_path, cifar_train):
    run = tmp_path / "mcl"
    tiny = [o for o in TINY if not o.startswith(("data.batch_size", "views.local_size"))]
    res = _cli("pretrain", "--recipe", "mcl", "--data", str(cifar_train), "--out", str(run), *tiny,
               "data.batch_size=64", "views.local_size=32", "objectives.montage.proj_hidden_dim=64",
               "objectives.montage.pred_hidden_dim=64", "objectives.montage.proj_dim=32", "train.max_steps=2")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(run / "metrics.csv")
    assert len(rows) == 2 and all(r[f"montage/level{i}"] for r in rows for i in range(4))
    res = _cli("pretrain", "--recipe", "mcl", "--data", str(cifar_train), "--out", str(tmp_path / "bad"), *tiny,
               "data.batch_size=48", "views.local_size=32", "train.max_steps=1")
    # one line with the fix (level 3 puts 64 tiles on B/32 canvases: every image twice)
    assert res.returncode == 2 and "multiple of 32" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.slow
def test_unreadable_images_are_skipped_counted_and_listed_from_loader_workers(tmp_path, cifar_train):
    """A corrupt and a truncated JPEG in the data: training goes on, both are listed in the run folder
    even though a loader worker (not the main process) met them."""
    import shutil

    data = tmp_path / "data"
    for i, src in enumerate(sorted((cifar_train / "cat").glob("*.jpg"))[:15]):
        (data / ("a" if i % 2 else "b")).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, data / ("a" if i % 2 else "b") / src.name)
    (data / "a" / "corrupt.jpg").write_bytes(b"definitely not a jpeg")
    good = (data / "b").glob("*.jpg").__next__().read_bytes()
    (data / "b" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    run = tmp_path / "run"
    res = _cli("pretrain", "--recipe", "mocov3", "--data", str(data), "--out", str(run), *TINY, *MOCO_SMALL,
               "data.batch_size=17", "data.num_workers=1", "train.epochs=1")
    assert res.returncode == 0, res.stderr[-3000:]
    listed = (run / "skipped_images.txt").read_text().split()
    assert sorted(Path(p).name for p in listed) == ["corrupt.jpg", "truncated.jpg"]
    assert json.loads((run / "run.json").read_text())["skipped_images"] == 2


@pytest.mark.slow
def test_mcvt_resumed_mid_epoch_keeps_its_prototypes(tmp_path, cifar_train):
    """Prototypes, their epoch and the negative sampler are in the checkpoint: a crash mid-epoch after
    the warm-up resumes with the same prototype term and no second E-step for that epoch."""
    over = [*TINY, *MCVT_SMALL, "train.epochs=2", "data.limit=96", "train.checkpoint_every_n_steps=2",
            "objectives.protonce.warmup_epochs=1"]  # 6 steps per epoch, E-step at the start of epoch 1
    full = pretrain("mcvt", str(cifar_train), tmp_path / "full", over)
    full_rows = _rows(full / "metrics.csv")
    with pytest.raises(RuntimeError, match="simulated crash"):
        pretrain("mcvt", str(cifar_train), tmp_path / "crash", over, callbacks=[CrashAt(9)])
    assert torch.load(tmp_path / "crash" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    resumed = pretrain("mcvt", str(cifar_train), tmp_path / "crash", over, resume=True)
    steps = _rows(resumed / "metrics.csv")
    assert [int(r["step"]) for r in steps] == [int(r["step"]) for r in full_rows]
    with (resumed / "metrics.csv").open() as fh:
        assert sum(1 for r in csv.DictReader(fh) if r.get("estep/seconds")) == 1  # not redone on resume
    for a, b in zip(steps, full_rows):
        for key in ("loss", "protonce/proto"):
            if b.get(key):
                assert a.get(key), (a["step"], key)  # the prototype term did not drop out
                assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-5), (a["step"], key)
