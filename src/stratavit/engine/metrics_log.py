"""``metrics.csv``: the CSV logger that appends when a run continues, and which steps it gets.

Lightning's CSVLogger deletes an existing ``metrics.csv`` when it starts; a resumed run must keep
the rows written before the checkpoint (rows after it are dropped by :func:`stratavit.engine.resume.truncate_metrics`).
Every logged row is written at once (a run's progress can be followed in the file, and a killed
run loses no row it logged). :class:`LogEndSteps` makes the first step, the last one and the step
a signal stopped the run at logged rows whatever ``train.log_every_n_steps`` is.
"""

from __future__ import annotations

import csv
import os
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    """Keeps the rows (and columns) of earlier runs, and rewrites the file atomically when new
    columns appear, so a kill at any moment leaves a whole ``metrics.csv``."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as fh:
                header = next(csv.reader(fh), [])
            self.metrics_keys = sorted(set(header))  # columns of earlier runs stay (e.g. an E-step's)

    def _check_log_dir_exists(self) -> None:  # keep earlier rows
        return None

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        tmp = self.metrics_file_path + ".tmp"
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.metrics_file_path)


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``RUN_DIR/metrics.csv`` and appending across resumes."""

    def __init__(self, run_dir: str) -> None:
        super().__init__(save_dir=run_dir, name="", version="", flush_logs_every_n_steps=1)

    @property
    def experiment(self) -> ExperimentWriter:  # type: ignore[override]
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class LogEndSteps(L.Callback):
    """Has Lightning write the metrics of the run's first step, of its last planned step and of
    the step a signal stops it after, on top of every ``log_every_n_steps``-th.

    Lightning writes a step's metrics after the callbacks' ``on_train_batch_end`` when
    ``trainer.log_every_n_steps`` divides it; here, for the chosen steps, that interval is 1 until
    the next batch starts. Place it after the collapse monitor, which reads the same interval and
    keeps its own schedule, and after ``stop`` (the checkpoint callback, whose ``stopping`` says a
    stop was agreed at this step).

    Args:
        stop: an object with a ``stopping`` attribute, non-zero once the run stops after this step.
    """

    def __init__(self, stop: Any = None) -> None:
        self.stop = stop
        self.planned_steps: int | None = None
        """The run's steps in all (``train.max_steps`` or epochs x batches), known once training starts."""
        self._interval: int | None = None  # the configured interval while it is overridden

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        planned = trainer.estimated_stepping_batches
        self.planned_steps = int(planned) if planned != float("inf") else None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step) - 1  # the optimiser step that just ran
        stopping = bool(getattr(self.stop, "stopping", 0))
        if trainer.log_every_n_steps < 1:  # logging turned off
            return
        last = self.planned_steps is not None and step + 1 >= self.planned_steps
        if (step == 0 or last or stopping) and self._interval is None:
            self._interval = trainer.log_every_n_steps
            trainer.log_every_n_steps = 1

    def _restore(self, trainer: L.Trainer) -> None:
        if self._interval is not None:
            trainer.log_every_n_steps = self._interval
            self._interval = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._restore(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore(trainer)
