"""``pretrain``: build the data, module and Lightning trainer for a recipe, run it, export the backbone.

Run folder layout::

    RUN_DIR/config.yaml            resolved config
    RUN_DIR/metrics.csv            one row per logged step: step, epoch, loss, loss/<name>, lr, ...
    RUN_DIR/checkpoints/last.ckpt  Lightning checkpoint (resume point)
    RUN_DIR/backbone.safetensors   teacher backbone, timm format (on completion)
    RUN_DIR/run.json               summary: steps, wall time, throughput, skipped images/steps
    RUN_DIR/environment.json       versions, machine, command line, git commit: one entry per start/resume
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

from stratavit.config import Config, ConfigError, dump_yaml, load_config_file, resolve_config, to_dict
from stratavit.datasets import DataError, Indexed, bad_files, build_dataset, check_image_sizes, set_skip_log
from stratavit.sampling import ResumableSampler
from stratavit.views import MultiCropTransform, collate_views, eval_transform

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"


def last_checkpoint(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / LAST


def resolve_run_config(
    run_dir: Path, recipe: str | None, overrides: Sequence[str], resume: bool
) -> tuple[Config, bool]:
    """The config of a new run, or of the run in ``run_dir`` continued (with ``overrides`` on top).

    Returns ``(config, resuming)``.
    """
    last = last_checkpoint(run_dir)
    saved = run_dir / "config.yaml"
    if last.exists() and saved.exists():
        cfg = load_config_file(saved)
        if recipe is not None and recipe != cfg.recipe:
            raise ConfigError(
                f"{run_dir} holds a '{cfg.recipe}' run; pass --recipe {cfg.recipe} to continue it, "
                f"or choose another --out for a new '{recipe}' run"
            )
        if overrides:
            cfg = resolve_config(to_dict(cfg), list(overrides))
        return cfg, True
    if resume:
        raise ConfigError(f"--resume: no checkpoint at {last}; nothing to continue (drop --resume to start)")
    if recipe is None:
        raise ConfigError("choose a recipe with --recipe (see `stratavit recipes`)")
    return resolve_config(recipe, list(overrides)), False


def _precision(cfg: Config) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def _sync_batchnorm(cfg: Config, on_cpu: bool = False) -> bool:
    """Whether batch norms (MoCo v3's heads, SERE's relation modules) are synchronised across processes.

    ``on_cpu=False``: Lightning's ``sync_batchnorm`` flag, torch's SyncBatchNorm, for multi-process
    GPU runs. ``on_cpu=True``: multi-process CPU (gloo) runs, where torch's SyncBatchNorm cannot
    run; there :func:`stratavit.engine.sync_batchnorm.convert_sync_batchnorm_cpu` converts the module.
    """
    multi = cfg.train.devices * cfg.train.num_nodes > 1
    on_gpu = cfg.train.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return bool(cfg.train.sync_batchnorm and multi and (on_gpu != on_cpu))


def _truncate_metrics(path: Path, from_step: int) -> None:
    """Drop rows logged at or after ``from_step`` (written after the checkpoint of a killed run),
    and a last line cut short by a kill in the middle of writing it."""
    if not path.exists():
        return
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    rows = list(csv.DictReader(io.StringIO(complete, newline="")))
    fields = list(rows[0].keys()) if rows else None
    if not fields:
        return
    kept = [r for r in rows if r.get("step", "") == "" or int(float(r["step"])) < from_step]
    if len(kept) == len(rows) and complete == text:
        return
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(kept)
    os.replace(tmp, path)


def build_train_loader(cfg: Config, patch_size: int, skip_log: Path | None = None) -> DataLoader:
    """Multi-crop training loader: batches are :class:`~stratavit.views.MultiViewBatch`.

    Unreadable images are skipped; with ``skip_log`` their paths are appended to that file by
    whichever process (loader worker) met them.
    """
    if cfg.data.path is None:
        raise ConfigError("no training data: pass --data DIR (an ImageFolder directory) or a named set such as cifar10")
    transform = MultiCropTransform(cfg.views, patch_size)
    from stratavit.shards import is_shard_dir, shard_loader

    if is_shard_dir(cfg.data.path):  # tar shards: streamed, split across processes and workers
        return shard_loader(cfg, transform, skip_log)
    ds = build_dataset(cfg.data.path, split="train", transform=transform, root=cfg.data.root, limit=cfg.data.limit, seed=cfg.train.seed)
    if skip_log is not None:
        set_skip_log(ds, skip_log)
    check_image_sizes(
        ds, cfg.views.global_size, cfg.data.path, cfg.data.allow_upsampling, multiple=patch_size,
        local_size=cfg.views.local_size if cfg.views.local_crops else None, resize=cfg.views.resize,
    )
    n = len(ds)  # type: ignore[arg-type]
    if n < cfg.data.batch_size:
        raise DataError(
            f"{cfg.data.path} has {n} images, fewer than data.batch_size={cfg.data.batch_size}; "
            "lower data.batch_size or add images"
        )
    world = cfg.train.devices * cfg.train.num_nodes
    if world > 1 and n // world < cfg.data.batch_size:
        raise DataError(
            f"{cfg.data.path} has {n} images: {n // world} per process for {world} processes, fewer than "
            f"data.batch_size={cfg.data.batch_size}; lower data.batch_size or add images"
        )
    # The order of each epoch and each sample's views are pure functions of (seed, epoch, index):
    # a run resumed mid-epoch continues exactly (stratavit.sampling).
    return DataLoader(
        Indexed(ds, seed=cfg.train.seed),
        batch_size=cfg.data.batch_size,
        sampler=ResumableSampler(n, cfg.train.seed, cfg.data.batch_size),
        drop_last=True,
        num_workers=cfg.data.num_workers,
        collate_fn=collate_views,
        persistent_workers=cfg.data.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
    )


def pretrain(
    recipe: str | None = None,
    data: str | None = None,
    out: str | Path = "runs/pretrain",
    overrides: Sequence[str] = (),
    resume: bool = False,
    callbacks: Sequence[Any] = (),
) -> Path:
    """Pre-train a backbone; returns the run folder.

    Args:
        recipe: recipe name (``stratavit recipes``) or a YAML path; may be None when continuing.
        data: ImageFolder directory or named set (overrides ``data.path``).
        out: run folder. If it holds ``checkpoints/last.ckpt`` the run continues from there.
        overrides: ``key=value`` config overrides.
        resume: require a checkpoint to continue from.
        callbacks: extra Lightning callbacks.
    """
    import lightning as L
    from lightning.pytorch.callbacks import TQDMProgressBar

    from stratavit.engine.callbacks.checkpoint import BatchSeed, LastCheckpoint, data_position, save_atomically

    from stratavit.export import export_backbone
    from stratavit.engine.metrics_log import RunCSVLogger
    from stratavit.engine.module import PretrainModule

    run_dir = Path(out)
    overrides = list(overrides)
    if data is not None:
        overrides.append(f"data.path={data}")
    cfg, resuming = resolve_run_config(run_dir, recipe, overrides, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)

    module = PretrainModule(to_dict(cfg))
    if _sync_batchnorm(cfg, on_cpu=True):
        from stratavit.engine.sync_batchnorm import convert_sync_batchnorm_cpu

        convert_sync_batchnorm_cpu(module)  # batch-norm statistics over all gloo processes
    if cfg.train.compile:
        module.compile_backbones()
    loader = build_train_loader(cfg, module.backbone.patch_size, skip_log=run_dir / "skipped_images.txt")
    if isinstance(loader.dataset, Indexed):  # size known (after data.limit); streamed shards: skipped
        for objective in module.objectives.values():
            objective.check_data(len(loader.dataset))  # type: ignore[operator]  # e.g. k-means granularities vs images
    if module.needs_dataset():
        assert cfg.data.path is not None
        plain = build_dataset(
            cfg.data.path, split="train", transform=eval_transform(cfg.views.global_size, cfg.views.mean, cfg.views.std),
            root=cfg.data.root, limit=cfg.data.limit, seed=cfg.train.seed,
        )
        module.set_embedding_dataset(Indexed(plain), 2 * cfg.data.batch_size, cfg.data.num_workers)

    ckpt_path = None
    start_step = 0
    if resuming:
        ckpt_path = last_checkpoint(run_dir)
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        start_step = int(state.get("global_step", 0))
        ck_epoch = int(state.get("epoch", 0))
        position = data_position(state)
        del state
        if ck_epoch > cfg.train.epochs or (cfg.train.max_steps is not None and start_step > cfg.train.max_steps):
            raise ConfigError(
                f"{run_dir} was checkpointed at epoch {ck_epoch}, step {start_step}, already past "
                f"train.epochs={cfg.train.epochs} / train.max_steps={cfg.train.max_steps}; continue without "
                "that override (the run's config.yaml has its own) or raise it"
            )
        _truncate_metrics(run_dir / "metrics.csv", start_step)
        resume_data = getattr(loader.sampler, "resume", None)  # ResumableSampler, or the shard loader's hook
        if position is not None and callable(resume_data):
            resume_data(*position)  # the same batches, in the same order, as the uninterrupted run
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))  # only once the settings are known to work

    loggers: list[Any] = [RunCSVLogger(str(run_dir))]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger
        import tensorboard  # noqa: F401

        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=""))
    except ImportError:
        pass
    checkpoint = LastCheckpoint(last_checkpoint(run_dir), cfg.train.checkpoint_every_n_steps)
    all_callbacks: list[Any] = [checkpoint, BatchSeed(cfg.train.seed), *callbacks]
    if cfg.train.progress_bar:
        all_callbacks.append(TQDMProgressBar(refresh_rate=1))
    trainer = L.Trainer(
        default_root_dir=str(run_dir),
        enable_checkpointing=False,  # LastCheckpoint writes last.ckpt itself, atomically
        max_epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps if cfg.train.max_steps is not None else -1,
        max_time=timedelta(seconds=cfg.train.max_time_s) if cfg.train.max_time_s else None,
        accelerator=cfg.train.accelerator,
        devices=cfg.train.devices,
        num_nodes=cfg.train.num_nodes,
        strategy=cfg.train.strategy,
        precision=_precision(cfg),  # type: ignore[arg-type]
        sync_batchnorm=_sync_batchnorm(cfg),
        gradient_clip_val=cfg.optim.clip_grad,
        log_every_n_steps=cfg.train.log_every_n_steps,
        logger=loggers,
        callbacks=all_callbacks,
        enable_progress_bar=cfg.train.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=False,
    )
    if trainer.is_global_zero:  # versions, machine, command line, commit: one entry per start or resume
        from stratavit.provenance import environment, record_environment

        record_environment(run_dir, environment(
            seed=cfg.train.seed, world_size=trainer.world_size, resumed=resuming, start_step=start_step,
            accelerator=type(trainer.accelerator).__name__, precision=str(trainer.precision),
        ))
    start = time.time()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*Experiment logs directory.*")
        warnings.filterwarnings("ignore", ".*predefined dataloader.*")
        if callable(getattr(loader.sampler, "resume", None)):  # it is resumable, through its sampler
            warnings.filterwarnings("ignore", ".*your dataloader is not resumable.*")
        trainer.fit(
            module,
            train_dataloaders=loader,
            ckpt_path=str(ckpt_path) if ckpt_path else None,
            weights_only=True,
        )
    wall = time.time() - start
    steps_now = int(trainer.global_step) - start_step
    final = run_dir / "backbone.safetensors"
    if steps_now > 0 or not final.exists():
        save_atomically(trainer, last_checkpoint(run_dir))  # collective
    if trainer.is_global_zero:
        if steps_now > 0 or not final.exists():
            export_backbone(module, final)
        skipped = bad_files(loader.dataset)
        if skipped:  # de-duplicated (several workers may meet the same file)
            (run_dir / "skipped_images.txt").write_text("\n".join(skipped) + "\n")
        summary_path = run_dir / "run.json"
        previous = json.loads(summary_path.read_text()) if resuming and summary_path.exists() else {}
        summary = {
            "recipe": cfg.recipe,
            "global_step": int(trainer.global_step),
            "epochs_completed": int(trainer.current_epoch),
            "wall_time_s": round(wall + float(previous.get("wall_time_s", 0.0)), 2),
            "images_per_s": previous.get("images_per_s"),
            "skipped_images": len(skipped),
            "nonfinite_steps": module.nonfinite_steps,
            "resumed": resuming,
        }
        if wall > 0 and steps_now > 0:
            summary["images_per_s"] = round(steps_now * cfg.data.batch_size * trainer.world_size / wall, 2)
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return run_dir
