"""``RUN_DIR/checkpoints/last.ckpt``: written atomically at every epoch end, every N steps, every
M minutes and when a signal stops the run.

A killed run (SIGKILL, power loss) finds either the previous complete checkpoint or the new
complete one, never a truncated file: the checkpoint goes to ``last.ckpt.tmp`` and replaces
``last.ckpt`` with ``os.replace``. The checkpoint it replaces stays as ``previous.ckpt``, the
fallback should ``last.ckpt`` be damaged later (disk, copy). (Lightning's ``ModelCheckpoint`` with
``save_top_k=0`` writes ``last.ckpt`` only on step triggers, not at epoch ends, and writes it in place.)

:class:`BatchSeed` makes what a training step draws from the global RNG a function of the step's
position, so a resumed run draws what the uninterrupted one drew (see :mod:`stratavit.data.sampling`
for the data order and the views).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from stratavit.data.sampling import batch_seed
from stratavit.distributed import is_distributed
from stratavit.engine.callbacks.interrupt import StopSignals, TrainingInterrupted
from stratavit.run_folder import PREVIOUS_CHECKPOINT


def _fsync(path: Path, folder: bool = False) -> None:
    """Flush the file (or, best effort, the folder) ``path`` to the disk: a rename must not outrun its data."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if folder:  # not every platform opens folders (Windows)
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def previous_path(path: Path) -> Path:
    """Where :func:`save_atomically` keeps the checkpoint ``path`` held before (``previous.ckpt`` beside it)."""
    return Path(path).with_name(PREVIOUS_CHECKPOINT)


def _keep_as_previous(path: Path) -> None:
    """Make ``previous.ckpt`` the file now at ``path`` (a hard link, or a copy where the file system
    has none), atomically: ``path`` itself is never absent."""
    previous = previous_path(path)
    tmp = previous.with_name(previous.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
        _fsync(tmp)
    os.replace(tmp, previous)


def save_atomically(trainer: L.Trainer, path: Path, keep_previous: bool = True) -> None:
    """``trainer.save_checkpoint`` to ``path`` via a temporary file (collective: call on every rank).

    The temporary file is flushed to the disk before it replaces ``path``, and the folder after,
    so even a power cut leaves the old or the new checkpoint, whole. With ``keep_previous`` the
    checkpoint it replaces becomes ``previous.ckpt`` (:func:`previous_path`) first.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(str(tmp), weights_only=False)  # rank 0 writes, every rank takes part
    if trainer.is_global_zero:
        _fsync(tmp)
        if keep_previous and path.exists():
            _keep_as_previous(path)
        os.replace(tmp, path)
        _fsync(path.parent, folder=True)
    trainer.strategy.barrier("last-checkpoint")


def agree_max(trainer: L.Trainer, *values: int) -> list[int]:
    """The maximum of each of ``values`` over all processes (a collective: every process calls it
    at the same point; no communication on one process). Used for decisions one process may take
    alone (a signal, its clock) that all must act on together."""
    if not is_distributed():
        return [int(v) for v in values]
    t = torch.tensor([int(v) for v in values], dtype=torch.int64, device=trainer.strategy.root_device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


DATA_POSITION = "data_position"
"""Checkpoint key: ``{"epoch": e, "batches": k}``, the training data consumed (see :func:`data_position`)."""


def data_position(checkpoint: dict[str, Any]) -> tuple[int, int] | None:
    """``(epoch, batches of it done)`` where a checkpoint's run stopped; None for older checkpoints."""
    pos = checkpoint.get(DATA_POSITION)
    if not isinstance(pos, dict):
        return None
    return int(pos["epoch"]), int(pos["batches"])


def _as_saved_after_batch(checkpoint: dict[str, Any]) -> None:
    """Make a checkpoint written in ``on_train_batch_start`` read, to Lightning, as one written after
    the previous batch had completed.

    At that hook Lightning has already counted the coming batch as *ready*; left so, a restart
    would take the checkpoint for an interrupted batch and log every later step one step too late.
    Every other counter already says "k batches done".
    """
    try:
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        for part in ("total", "current"):
            progress[part]["ready"] = progress[part]["started"]
    except KeyError as e:
        raise RuntimeError(
            f"this Lightning version lays out its loop state differently ({e!r} missing); "
            "stratavit's mid-epoch checkpoints need updating for it"
        ) from None


class LastCheckpoint(L.Callback):
    """Saves ``path`` atomically every epoch, every ``every_n_steps`` optimiser steps and every
    ``every_minutes`` of wall-clock time (if set), and stops the run on a signal ``signals`` caught.

    A step checkpoint is written when the step is completely done: at the start of the next batch
    (or at the epoch end), not in ``on_train_batch_end``, which runs before the module's own
    ``on_train_batch_end`` (the teacher's EMA update) and before Lightning hands the step's
    metrics to the loggers. The loggers are flushed first, so ``metrics.csv`` holds every step
    the checkpoint holds even when the process is then killed. Every checkpoint records the data
    position (:data:`DATA_POSITION`) for :meth:`stratavit.data.sampling.ResumableSampler.resume`.

    In ``on_train_batch_end`` the processes agree (:func:`agree_max`, one collective per step
    under DDP) whether the clock says a checkpoint is due and whether a signal arrived on any of
    them; then, at the next batch start, every process writes the checkpoint and, on a signal,
    raises :class:`~stratavit.engine.callbacks.interrupt.TrainingInterrupted`. When the step was
    the last of its epoch, the epoch-end checkpoint is the stop checkpoint and the run stops at the
    next epoch's start (before any dataset pass); after the run's last step it just ends.
    """

    def __init__(
        self, path: Path, every_n_steps: int | None = None, every_minutes: float | None = None,
        signals: StopSignals | None = None,
    ) -> None:
        self.path = Path(path)
        self.every_n_steps = every_n_steps
        self.every_minutes = every_minutes
        self.signals = signals
        self.saved_step = -1
        """The step of the last checkpoint written or loaded by this run (-1: none)."""
        self._position = (0, 0)  # (epoch, batches of it done) when the next checkpoint is written
        self._due = False
        self._stop = 0  # the signal all processes agreed to stop on (0: none)
        self._between_batches = False
        self._last_save = time.monotonic()

    @property
    def stopping(self) -> int:
        """The signal the processes agreed to stop on at the coming step boundary (0: none)."""
        return self._stop

    def _save(self, trainer: L.Trainer) -> None:
        self._due = False
        if trainer.global_step == self.saved_step or trainer.sanity_checking:
            return
        for logger in trainer.loggers:
            logger.save()
        if self.signals is not None:
            self.signals.saving = True
        try:
            save_atomically(trainer, self.path)
        finally:
            if self.signals is not None:
                self.signals.saving = False
        self._saved(trainer.global_step)

    def _saved(self, step: int) -> None:
        self.saved_step = step
        self._last_save = time.monotonic()
        if self.signals is not None:
            self.signals.checkpoint, self.signals.checkpoint_step = self.path, step

    def _interrupted(self, trainer: L.Trainer) -> TrainingInterrupted:
        step = int(trainer.global_step)
        has = self.saved_step >= 0
        return TrainingInterrupted(self._stop, step, self.path if has else None, self.saved_step if has else None)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:  # left by a save that was killed
            for stale in (self.path, previous_path(self.path)):
                stale.with_name(stale.name + ".tmp").unlink(missing_ok=True)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_save = time.monotonic()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._position = (trainer.current_epoch, batch_idx + 1)
        n = self.every_n_steps
        if n and trainer.global_step > 0 and trainer.global_step % n == 0:
            self._due = True  # written once the step is completely done (see the class docstring)
        received = self.signals.received if self.signals is not None else 0
        timed = self.every_minutes is not None and time.monotonic() - self._last_save >= 60 * self.every_minutes
        signum, timed_any = agree_max(trainer, received, int(timed))
        if self.signals is not None:
            self.signals.step = int(trainer.global_step)
        if timed_any or signum:
            self._due = True
        if signum and not self._stop:
            self._stop = signum

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._due:
            self._position = (trainer.current_epoch, batch_idx)
            self._between_batches = True
            try:
                self._save(trainer)
            finally:
                self._between_batches = False
        if self._stop:
            raise self._interrupted(trainer)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._stop:  # a signal during the epoch-end checkpoint: do not start a dataset pass
            received = self.signals.received if self.signals is not None else 0
            self._stop = agree_max(trainer, received)[0]
        if self._stop:
            raise self._interrupted(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._position = (trainer.current_epoch + 1, 0)
        self._save(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        epoch, batches = self._position
        checkpoint[DATA_POSITION] = {"epoch": epoch, "batches": batches}
        if self._between_batches:
            _as_saved_after_batch(checkpoint)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._position = data_position(checkpoint) or self._position
        self._saved(int(checkpoint.get("global_step", 0)))


class ReclaimSigterm(L.Callback):
    """Puts :class:`~stratavit.engine.callbacks.interrupt.StopSignals`' handler back on SIGTERM once
    Lightning has installed its own (``on_train_start`` is the first hook after it; see
    :mod:`stratavit.engine.callbacks.interrupt`)."""

    def __init__(self, signals: StopSignals) -> None:
        self.signals = signals

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.signals.handle)


class BatchSeed(L.Callback):
    """Seeds torch's and Python's global RNGs before every training batch from ``(seed, epoch, batch, rank)``.

    Drop path and anything else a step draws from the global RNG then depend on where the run is,
    not on how it got there (loader iterators, restarts), so a run resumed from a checkpoint draws
    what the uninterrupted run drew. Ranks draw differently.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        s = batch_seed(self.seed, trainer.current_epoch, batch_idx, trainer.global_rank)
        torch.manual_seed(s)
        random.seed(s)
