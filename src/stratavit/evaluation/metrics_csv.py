"""The one reader of a run's ``metrics.csv`` (Lightning CSVLogger: sparse rows, empty cells)."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

from stratavit.evaluation.tables import to_float

__all__ = ["MetricsTable", "read_metrics"]

log = logging.getLogger(__name__)


@dataclass
class MetricsTable:
    """Columns and rows of a metrics CSV (empty when the file is missing or unreadable)."""

    columns: list[str] = field(default_factory=list)
    rows: list[dict[str, str]] = field(default_factory=list)

    def series(self, col: str) -> tuple[list[float], list[float]]:
        """``(steps, values)`` of the rows where ``col`` holds a finite number.

        The step is the ``step`` column (rows without one are skipped), or the row index when
        the CSV has no ``step`` column.
        """
        xs, ys = [], []
        for i, row in enumerate(self.rows):
            y = to_float(row.get(col))
            if y is None:
                continue
            x = to_float(row.get("step")) if "step" in self.columns else float(i)
            if x is None:
                continue
            xs.append(x)
            ys.append(y)
        return xs, ys


def read_metrics(metrics_csv: Path, *, warn: bool = False) -> MetricsTable:
    """The table of ``metrics_csv``; empty when it is missing or unreadable (logged with ``warn``)."""
    path = Path(metrics_csv)
    if not path.is_file():
        return MetricsTable()
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            return MetricsTable(list(reader.fieldnames or []), list(reader))
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        if warn:
            log.warning("ignoring %s: %s", path, e)
        return MetricsTable()
