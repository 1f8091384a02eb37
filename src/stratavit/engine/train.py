"""``pretrain``: build the data, module and Lightning trainer for a recipe, run it, export the backbone.

The run folder (:mod:`stratavit.run_folder`): ``config.yaml`` (resolved config), ``metrics.csv``
(one row per logged step), ``checkpoints/last.ckpt`` (resume point), ``backbone.safetensors``
(teacher backbone, timm format, on completion), ``run.json`` (summary: steps, wall time,
throughput, skipped images/steps), ``environment.json`` (versions, machine, command line, commit:
one entry per start or resume).
"""

from __future__ import annotations

import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from torch.utils.data import DataLoader

from stratavit.backbones.export import export_backbone
from stratavit.config import Config, dump_yaml
from stratavit.data.datasets import Indexed, bad_files
from stratavit.engine.callbacks.checkpoint import (
    BatchSeed,
    LastCheckpoint,
    save_atomically,
)
from stratavit.engine.callbacks.collapse import CollapseCallback
from stratavit.engine.callbacks.dataset_pass import DatasetPass, dataset_pass_objectives
from stratavit.engine.data import build_train_loader, dataset_pass_images
from stratavit.engine.metrics_log import RunCSVLogger
from stratavit.engine.module import PretrainModule
from stratavit.engine.resume import ResumePoint, prepare_resume, resolve_run_config
from stratavit.engine.sync_batchnorm import convert_sync_batchnorm_cpu
from stratavit.provenance import environment, record_environment
from stratavit.run_folder import RunFolder


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


def build_module(cfg: Config) -> PretrainModule:
    """The module of ``cfg``: CPU-synchronised batch norms under multi-process gloo, compiled backbones
    with ``train.compile``."""
    module = PretrainModule(cfg)
    if _sync_batchnorm(cfg, on_cpu=True):
        convert_sync_batchnorm_cpu(module)  # batch-norm statistics over all gloo processes
    if cfg.train.compile:
        module.compile_backbones()
    return module


def check_data(module: PretrainModule, loader: DataLoader) -> None:
    """Let every objective check (or adapt to) the training set's size, where it is known."""
    if isinstance(loader.dataset, Indexed):  # size known (after data.limit); streamed shards: skipped
        for objective in module.objectives.values():
            objective.check_data(len(loader.dataset))  # type: ignore[operator]  # e.g. k-means granularities vs images


def engine_callbacks(cfg: Config, run: RunFolder, module: PretrainModule, extra: Sequence[Any]) -> list[Any]:
    """The run's callbacks in the order they run: the checkpoint, the RNG seeding, the collapse
    monitor, ``extra``, the progress bar, and last (where the module's own epoch-start hook ran
    before) the dataset pass if an objective needs one."""
    callbacks: list[Any] = [LastCheckpoint(run.checkpoint, cfg.train.checkpoint_every_n_steps), BatchSeed(cfg.train.seed)]
    collapse = CollapseCallback.from_config(cfg.train)
    if collapse is not None:
        callbacks.append(collapse)
    callbacks += list(extra)
    if cfg.train.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    if dataset_pass_objectives(module):
        images = dataset_pass_images(cfg)
        callbacks.append(DatasetPass(images, 2 * cfg.data.batch_size, cfg.data.num_workers, cfg.train.progress_bar))
    return callbacks


def _loggers(run: RunFolder) -> list[Any]:
    loggers: list[Any] = [RunCSVLogger(str(run.root))]
    try:  # optional
        import tensorboard  # noqa: F401
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(save_dir=str(run.root), name="tensorboard", version=""))
    except ImportError:
        pass
    return loggers


def build_trainer(cfg: Config, run: RunFolder, callbacks: list[Any]) -> L.Trainer:
    t = cfg.train
    return L.Trainer(
        default_root_dir=str(run.root),
        enable_checkpointing=False,  # LastCheckpoint writes last.ckpt itself, atomically
        max_epochs=t.epochs,
        max_steps=t.max_steps if t.max_steps is not None else -1,
        max_time=timedelta(seconds=t.max_time_s) if t.max_time_s else None,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=_precision(cfg),  # type: ignore[arg-type]
        sync_batchnorm=_sync_batchnorm(cfg),
        gradient_clip_val=cfg.optim.clip_grad,  # see PretrainModule.configure_gradient_clipping
        log_every_n_steps=t.log_every_n_steps,
        logger=_loggers(run),
        callbacks=callbacks,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=False,
    )


def fit(trainer: L.Trainer, module: PretrainModule, loader: DataLoader, start: ResumePoint | None) -> float:
    """``trainer.fit``, from ``start``'s checkpoint if given; returns the wall time in seconds."""
    began = time.time()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*Experiment logs directory.*")
        warnings.filterwarnings("ignore", ".*predefined dataloader.*")
        if callable(getattr(loader.sampler, "resume", None)):  # it is resumable, through its sampler
            warnings.filterwarnings("ignore", ".*your dataloader is not resumable.*")
        trainer.fit(
            module,
            train_dataloaders=loader,
            ckpt_path=str(start.checkpoint) if start else None,
            weights_only=True,
        )
    return time.time() - began


def finish(
    trainer: L.Trainer, module: PretrainModule, loader: DataLoader, run: RunFolder, cfg: Config,
    start: ResumePoint | None, wall: float,
) -> None:
    """After training: the final checkpoint and the exported backbone (if it trained, or has none
    yet), the list of unreadable images and the summary ``run.json``."""
    start_step = start.step if start else 0
    steps_now = int(trainer.global_step) - start_step
    write = steps_now > 0 or not run.backbone.exists()
    if write:
        save_atomically(trainer, run.checkpoint)  # collective
    if not trainer.is_global_zero:
        return
    if write:
        export_backbone(module, run.backbone)
    skipped = bad_files(loader.dataset)
    if skipped:  # de-duplicated (several workers may meet the same file)
        run.skipped.write_text("\n".join(skipped) + "\n")
    previous = run.read_summary() if start else {}
    summary = {
        "recipe": cfg.recipe,
        "global_step": int(trainer.global_step),
        "epochs_completed": int(trainer.current_epoch),
        "wall_time_s": round(wall + float(previous.get("wall_time_s", 0.0)), 2),
        "images_per_s": previous.get("images_per_s"),
        "skipped_images": len(skipped),
        "nonfinite_steps": module.nonfinite_steps,
        "resumed": start is not None,
    }
    if wall > 0 and steps_now > 0:
        summary["images_per_s"] = round(steps_now * cfg.data.batch_size * trainer.world_size / wall, 2)
    run.write_summary(summary)


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
    run = RunFolder(Path(out))
    overrides = [*overrides, *([f"data.path={data}"] if data is not None else [])]
    cfg, resuming = resolve_run_config(run.root, recipe, overrides, resume)
    run.root.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    module = build_module(cfg)
    loader = build_train_loader(cfg, module.backbone.patch_size, skip_log=run.skipped)
    check_data(module, loader)
    start = prepare_resume(run, cfg, loader) if resuming else None
    all_callbacks = engine_callbacks(cfg, run, module, callbacks)
    run.config.write_text(dump_yaml(cfg))  # only once the settings are known to work
    trainer = build_trainer(cfg, run, all_callbacks)
    if trainer.is_global_zero:  # versions, machine, command line, commit: one entry per start or resume
        record_environment(run.root, environment(
            seed=cfg.train.seed, world_size=trainer.world_size, resumed=resuming, start_step=start.step if start else 0,
            accelerator=type(trainer.accelerator).__name__, precision=str(trainer.precision),
        ))
    wall = fit(trainer, module, loader, start)
    finish(trainer, module, loader, run, cfg, start, wall)
    return run.root
