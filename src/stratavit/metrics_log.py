"""CSV metrics logger that appends to the run's ``metrics.csv`` when a run continues.

Lightning's CSVLogger deletes an existing ``metrics.csv`` when it starts; a resumed run must keep
the rows written before the checkpoint (rows after it are dropped by ``train._truncate_metrics``).
"""

from __future__ import annotations

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:  # keep earlier rows
        return None


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` writing ``RUN_DIR/metrics.csv`` and appending across resumes."""

    def __init__(self, run_dir: str) -> None:
        super().__init__(save_dir=run_dir, name="", version="")

    @property
    def experiment(self) -> ExperimentWriter:  # type: ignore[override]
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
