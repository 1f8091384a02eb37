"""``pretrain``: build the data, module and Lightning trainer for a recipe, run it, export the backbone.

The run folder (:mod:`stratavit.run_folder`): ``config.yaml`` (resolved config), ``metrics.csv``
(one row per logged step), ``checkpoints/last.ckpt`` (resume point) and ``previous.ckpt`` (the one
before), ``backbone.safetensors`` (teacher backbone, timm format, on completion), ``run.json``
(summary: steps done and planned, epochs, whether it finished, wall time, throughput, skipped
images/steps), ``environment.json`` (versions, machine, command line, commit: one entry per start
or resume).

The life of a run: every check that can fail on the settings or the data runs before training
(a folder this call created is removed again when one fails); SIGINT / SIGTERM stop it at a step
boundary with a checkpoint (:mod:`stratavit.engine.callbacks.interrupt`) and
:class:`~stratavit.engine.callbacks.interrupt.TrainingInterrupted` comes out of :func:`pretrain`
once ``run.json`` says where it stopped; running into the same folder continues it.
"""

from __future__ import annotations

import shutil
import sys
import time
import warnings
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from stratavit.backbones.export import export_backbone
from stratavit.config import Config, ConfigError, dump_yaml
from stratavit.data.datasets import Indexed, bad_files
from stratavit.engine.budget_setup import setup_budget
from stratavit.engine.callbacks.budget import BudgetWatch
from stratavit.engine.callbacks.checkpoint import (
    BatchSeed,
    LastCheckpoint,
    ReclaimSigterm,
    save_atomically,
)
from stratavit.engine.callbacks.collapse import CollapseCallback
from stratavit.engine.callbacks.console import StartLine
from stratavit.engine.callbacks.dataset_pass import DatasetPass, dataset_pass_objectives
from stratavit.engine.callbacks.interrupt import StopSignals, TrainingInterrupted, signal_name
from stratavit.engine.data import build_train_loader, dataset_pass_images, resolve_num_workers
from stratavit.engine.loggers import build_loggers, check_loggers
from stratavit.engine.metrics_log import LogEndSteps
from stratavit.engine.module import PretrainModule
from stratavit.engine.preset import apply_preset
from stratavit.engine.resume import (
    ResumePoint,
    begin_run,
    prepare_resume,
    read_resume_point,
    resolve_run_config,
)
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


def engine_callbacks(
    cfg: Config, run: RunFolder, module: PretrainModule, extra: Sequence[Any], signals: StopSignals | None = None,
) -> list[Any]:
    """The run's callbacks in the order they run: the checkpoint (which also stops the run on the
    signals ``signals`` records), the RNG seeding, the collapse monitor, ``extra``, the logging of
    the first/last/stop steps, the progress bar, and last (where the module's own epoch-start hook
    ran before) the dataset pass if an objective needs one."""
    t = cfg.train
    checkpoint = LastCheckpoint(run.checkpoint, t.checkpoint_every_n_steps, t.checkpoint_every_minutes, signals)
    callbacks: list[Any] = [checkpoint, BatchSeed(t.seed)]
    if signals is not None:
        callbacks.append(ReclaimSigterm(signals))
    collapse = CollapseCallback.from_config(t)
    if collapse is not None:
        callbacks.append(collapse)
    callbacks += list(extra)
    callbacks.append(LogEndSteps(stop=checkpoint))
    if t.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    if dataset_pass_objectives(module):
        images = dataset_pass_images(cfg)
        callbacks.append(DatasetPass(images, 2 * cfg.data.batch_size, resolve_num_workers(cfg), t.progress_bar))
    return callbacks


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
        logger=build_loggers(cfg.train.loggers, run),
        callbacks=callbacks,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=False,
    )


def fit(
    trainer: L.Trainer, module: PretrainModule, loader: DataLoader, start: ResumePoint | None, signals: StopSignals,
) -> tuple[float, TrainingInterrupted | None]:
    """``trainer.fit``, from ``start``'s checkpoint if given, with ``signals`` catching SIGINT and
    SIGTERM; returns the wall time in seconds and the interruption, if a signal stopped it."""
    began = time.time()
    stopped: TrainingInterrupted | None = None
    with warnings.catch_warnings(), signals:
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*Experiment logs directory.*")
        warnings.filterwarnings("ignore", ".*predefined dataloader.*")
        warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")  # first and last steps are logged
        if callable(getattr(loader.sampler, "resume", None)):  # it is resumable, through its sampler
            warnings.filterwarnings("ignore", ".*your dataloader is not resumable.*")
        try:
            trainer.fit(
                module,
                train_dataloaders=loader,
                ckpt_path=str(start.checkpoint) if start else None,
                weights_only=True,
            )
        except TrainingInterrupted as e:
            stopped = e
        except SIGTERMException:  # Lightning's own, for a SIGTERM before our handler took over again
            stopped = TrainingInterrupted(signals.received or 15, int(trainer.global_step), signals.checkpoint,
                                          signals.checkpoint_step)
    return time.time() - began, stopped


def _checkpoint_callback(trainer: L.Trainer) -> LastCheckpoint | None:
    return next((c for c in trainer.callbacks if isinstance(c, LastCheckpoint)), None)  # type: ignore[attr-defined]


def _planned_steps(trainer: L.Trainer) -> int | None:
    ends = next((c for c in trainer.callbacks if isinstance(c, LogEndSteps)), None)  # type: ignore[attr-defined]
    return ends.planned_steps if ends is not None else None


def run_summary(
    trainer: L.Trainer, module: PretrainModule, cfg: Config, start: ResumePoint | None, wall: float,
    previous: dict[str, Any], stopped: TrainingInterrupted | None, skipped: int,
) -> dict[str, Any]:
    """``run.json``: steps done and planned, epochs (``epochs_completed``: whole passes over the
    data; ``epochs``: the fraction done), whether the run finished and what stopped it, wall time
    over all starts, throughput of this start, skipped images and steps."""
    step = int(trainer.global_step)
    per_epoch = max(1, int(module.steps_per_epoch))
    planned = _planned_steps(trainer) or previous.get("planned_steps")
    finished = stopped is None and (planned is None or step >= planned)
    stopped_by = signal_name(stopped.signum) if stopped is not None else None
    if stopped is None and not finished and cfg.train.max_time_s:
        stopped_by = "train.max_time_s"
    steps_now = step - (start.step if start else 0)
    summary = {
        "recipe": cfg.recipe,
        "global_step": step,
        "planned_steps": planned,
        "max_steps": cfg.train.max_steps,
        "steps_per_epoch": per_epoch,
        "epochs": round(step / per_epoch, 4),
        "epochs_completed": step // per_epoch,
        "planned_epochs": cfg.train.epochs,
        "finished": finished,
        "stopped_by": stopped_by,
        "wall_time_s": round(wall + float(previous.get("wall_time_s", 0.0)), 2),
        "images_per_s": previous.get("images_per_s"),
        "skipped_images": skipped,
        "nonfinite_steps": module.nonfinite_steps,
        "resumed": start is not None,
    }
    if wall > 0 and steps_now > 0:
        summary["images_per_s"] = round(steps_now * cfg.data.batch_size * trainer.world_size / wall, 2)
    watch = next((c for c in trainer.callbacks if isinstance(c, BudgetWatch)), None)  # type: ignore[attr-defined]
    if watch is not None:
        plan = watch.plan
        summary["budget"] = {"budget_s": plan.budget_s, "planned_s": round(plan.planned_s, 1),
                             "actual_s": round(watch.elapsed_s(), 1), "max_steps": plan.max_steps, "scale": round(plan.scale, 5),
                             "step_s": round(plan.costs.step_s, 4), "replans": plan.replans, "notes": plan.notes}
    return summary


def finish(
    trainer: L.Trainer, module: PretrainModule, loader: DataLoader, run: RunFolder, cfg: Config,
    start: ResumePoint | None, wall: float, stopped: TrainingInterrupted | None = None,
) -> None:
    """After training: the final checkpoint and the exported backbone (if it trained, or has none
    yet, and was not stopped by a signal, whose stop wrote the checkpoint), the list of unreadable
    images and the summary ``run.json``."""
    start_step = start.step if start else 0
    steps_now = int(trainer.global_step) - start_step
    write = stopped is None and (steps_now > 0 or not run.backbone.exists())
    checkpoint = _checkpoint_callback(trainer)
    if write and (checkpoint is None or checkpoint.saved_step != trainer.global_step):
        save_atomically(trainer, run.checkpoint)  # collective
    if not trainer.is_global_zero:
        return
    if write:
        export_backbone(module, run.backbone)
    skipped = bad_files(loader.dataset)
    if skipped:  # de-duplicated (several workers may meet the same file)
        run.skipped.write_text("\n".join(skipped) + "\n")
    previous = run.read_summary() if start else {}
    run.write_summary(run_summary(trainer, module, cfg, start, wall, previous, stopped, len(skipped)))


def _first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself or a parent) that does not exist yet; None if it exists."""
    path = path.absolute()
    missing = None
    for folder in [path, *path.parents]:
        if folder.exists():
            break
        missing = folder
    return missing


@contextmanager
def removed_on_failure(root: Path) -> Iterator[None]:
    """Create ``root`` (with its parents); if the block fails, remove what this created, never a
    folder that existed before (it may hold the user's earlier run)."""
    created = _first_missing(root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _images(loader: DataLoader) -> int | None:
    """Images the run trains on (after ``data.limit``); None where unknown."""
    count = getattr(loader.dataset, "num_samples", None)
    if count is None and isinstance(loader.dataset, Indexed):
        count = len(loader.dataset)
    return int(count) if count is not None else None


def _check_trainer(cfg: Config, run: RunFolder, callbacks: list[Any]) -> L.Trainer:
    """:func:`build_trainer`, with Lightning's refusals of the settings (no GPU for
    ``train.accelerator=gpu``, more devices than there are, an unknown strategy) as ConfigError."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return build_trainer(cfg, run, callbacks)
    except (MisconfigurationException, ValueError, RuntimeError) as e:
        t = cfg.train
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"train.accelerator={t.accelerator} train.devices={t.devices} train.num_nodes={t.num_nodes} "
            f"train.strategy={t.strategy} train.precision={t.precision} cannot run on this machine ({first}); "
            "change them (train.accelerator=auto train.devices=1 train.strategy=auto train.precision=auto run anywhere)"
        ) from None


def pretrain(
    recipe: str | None = None,
    data: str | None = None,
    out: str | Path = "runs/pretrain",
    overrides: Sequence[str] = (),
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    from_previous: bool = False,
    report: Callable[[str], None] | None = None,
) -> Path:
    """Pre-train a backbone; returns the run folder.

    Args:
        recipe: recipe name (``stratavit recipes``) or a YAML path; may be None when continuing.
        data: ImageFolder directory or named set (overrides ``data.path``).
        out: run folder. If it holds ``checkpoints/last.ckpt`` the run continues from there.
        overrides: ``key=value`` config overrides.
        resume: require a checkpoint to continue from.
        callbacks: extra Lightning callbacks.
        from_previous: continue from ``checkpoints/previous.ckpt`` (when ``last.ckpt`` is damaged).
        report: called with the line that says what trains, once training starts (rank 0).

    Raises:
        TrainingInterrupted: SIGINT or SIGTERM stopped the run (its ``message()`` says where and
            how to continue); the checkpoint and ``run.json`` are written.
    """
    started = time.time()  # a train.budget counts from here
    run = RunFolder(Path(out))
    overrides = [*overrides, *([f"data.path={data}"] if data is not None else [])]
    cfg, resuming = resolve_run_config(run.root, recipe, overrides, resume or from_previous, from_previous)
    if not resuming and recipe is not None:
        cfg, preset_line = apply_preset(cfg, recipe, overrides)
        if preset_line is not None and rank_zero_only.rank == 0:
            print(preset_line, file=sys.stderr, flush=True)
    check_loggers(cfg.train.loggers)
    point = read_resume_point(run, cfg, from_previous) if resuming else None  # a damaged checkpoint: one line
    signals = StopSignals()
    with removed_on_failure(run.root):  # nothing is left behind by a check that fails
        L.seed_everything(cfg.train.seed, workers=True, verbose=False)
        module = build_module(cfg)
        loader = build_train_loader(cfg, module.backbone.patch_size, skip_log=run.skipped)
        check_data(module, loader)
        start = prepare_resume(point, loader) if point is not None else None
        budget = setup_budget(cfg, run, module, loader, resuming, started, build_module, _precision(cfg))
        if budget is not None:  # the recipe compressed into the budget; the module built from it
            cfg, module = budget.cfg, budget.module
            check_data(module, loader)
            if rank_zero_only.rank == 0 and not resuming:
                for note in budget.watch.plan.notes:
                    print(f"warning: {note}", file=sys.stderr, flush=True)
        extra = [*callbacks, *([budget.watch] if budget else [])]
        extra += [StartLine(report, cfg.recipe, _images(loader), run.root, point.step if point else 0)] if report else []
        trainer = _check_trainer(cfg, run, engine_callbacks(cfg, run, module, extra, signals))
    run.config.write_text(dump_yaml(cfg))  # only once the settings are known to work
    if trainer.is_global_zero:  # versions, machine, command line, commit: one entry per start or resume
        record_environment(run.root, environment(
            seed=cfg.train.seed, world_size=trainer.world_size, resumed=resuming, start_step=start.step if start else 0,
            accelerator=type(trainer.accelerator).__name__, precision=str(trainer.precision),
            data_workers=resolve_num_workers(cfg), from_checkpoint=str(point.checkpoint) if point else None,
        ))
    if trainer.is_global_zero:
        begin_run(run, point)  # the first change to what the folder held (metrics rows after the checkpoint)
    wall, stopped = fit(trainer, module, loader, start, signals)
    finish(trainer, module, loader, run, cfg, start, wall, stopped)
    if stopped is not None:
        stopped.run_dir = run.root
        raise stopped
    return run.root
