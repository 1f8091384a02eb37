"""``RUN_DIR/checkpoints/last.ckpt``: written atomically at every epoch end and every N steps.

A killed run (SIGKILL, power loss) finds either the previous complete checkpoint or the new
complete one, never a truncated file: the checkpoint goes to ``last.ckpt.tmp`` and replaces
``last.ckpt`` with ``os.replace``. (Lightning's ``ModelCheckpoint`` with ``save_top_k=0`` writes
``last.ckpt`` only on step triggers, not at epoch ends, and writes it in place.)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L


def save_atomically(trainer: L.Trainer, path: Path) -> None:
    """``trainer.save_checkpoint`` to ``path`` via a temporary file (collective: call on every rank)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(str(tmp), weights_only=False)  # rank 0 writes, every rank takes part
    if trainer.is_global_zero:
        os.replace(tmp, path)
    trainer.strategy.barrier("last-checkpoint")


class LastCheckpoint(L.Callback):
    """Saves ``path`` atomically after every ``every_n_steps`` optimiser steps (if set) and every epoch."""

    def __init__(self, path: Path, every_n_steps: int | None = None) -> None:
        self.path = Path(path)
        self.every_n_steps = every_n_steps
        self._saved_step = -1

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.global_step == self._saved_step or trainer.sanity_checking:
            return
        save_atomically(trainer, self.path)
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        n = self.every_n_steps
        if n and trainer.global_step > 0 and trainer.global_step % n == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)
