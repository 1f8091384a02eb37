"""``RUN_DIR/checkpoints/last.ckpt``: written atomically at every epoch end and every N steps.

A killed run (SIGKILL, power loss) finds either the previous complete checkpoint or the new
complete one, never a truncated file: the checkpoint goes to ``last.ckpt.tmp`` and replaces
``last.ckpt`` with ``os.replace``. (Lightning's ``ModelCheckpoint`` with ``save_top_k=0`` writes
``last.ckpt`` only on step triggers, not at epoch ends, and writes it in place.)

:class:`BatchSeed` makes what a training step draws from the global RNG a function of the step's
position, so a resumed run draws what the uninterrupted one drew (see :mod:`stratavit.data.sampling`
for the data order and the views).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import lightning as L
import torch

from stratavit.data.sampling import batch_seed


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


def save_atomically(trainer: L.Trainer, path: Path) -> None:
    """``trainer.save_checkpoint`` to ``path`` via a temporary file (collective: call on every rank).

    The temporary file is flushed to the disk before it replaces ``path``, and the folder after,
    so even a power cut leaves the old or the new checkpoint, whole.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(str(tmp), weights_only=False)  # rank 0 writes, every rank takes part
    if trainer.is_global_zero:
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent, folder=True)
    trainer.strategy.barrier("last-checkpoint")


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
    """Saves ``path`` atomically after every ``every_n_steps`` optimiser steps (if set) and every epoch.

    A step checkpoint is written when the step is completely done: at the start of the next batch
    (or at the epoch end), not in ``on_train_batch_end``, which runs before the module's own
    ``on_train_batch_end`` (the teacher's EMA update) and before Lightning hands the step's
    metrics to the loggers. The loggers are flushed first, so ``metrics.csv`` holds every step
    the checkpoint holds even when the process is then killed. Every checkpoint records the data
    position (:data:`DATA_POSITION`) for :meth:`stratavit.data.sampling.ResumableSampler.resume`.
    """

    def __init__(self, path: Path, every_n_steps: int | None = None) -> None:
        self.path = Path(path)
        self.every_n_steps = every_n_steps
        self._saved_step = -1
        self._position = (0, 0)  # (epoch, batches of it done) when the next checkpoint is written
        self._due = False
        self._between_batches = False

    def _save(self, trainer: L.Trainer) -> None:
        self._due = False
        if trainer.global_step == self._saved_step or trainer.sanity_checking:
            return
        for logger in trainer.loggers:
            logger.save()
        save_atomically(trainer, self.path)
        self._saved_step = trainer.global_step

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stale = self.path.with_name(self.path.name + ".tmp")  # left by a save that was killed
        if trainer.is_global_zero and stale.exists():
            stale.unlink()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._position = (trainer.current_epoch, batch_idx + 1)
        n = self.every_n_steps
        if n and trainer.global_step > 0 and trainer.global_step % n == 0:
            self._due = True  # written once the step is completely done (see the class docstring)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._due:
            return
        self._position = (trainer.current_epoch, batch_idx)
        self._between_batches = True
        try:
            self._save(trainer)
        finally:
            self._between_batches = False

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
