"""The run folder: every file a run writes or reads, by name, in one place.

::

    RUN_DIR/config.yaml              resolved config (written once the settings are known to work)
    RUN_DIR/metrics.csv              one row per logged step
    RUN_DIR/checkpoints/last.ckpt    Lightning checkpoint, the resume point
    RUN_DIR/checkpoints/previous.ckpt  the checkpoint before it (the fallback if last.ckpt is damaged)
    RUN_DIR/backbone.safetensors     teacher backbone in timm format (on completion)
    RUN_DIR/run.json                 summary: steps, wall time, throughput, skipped images and steps
    RUN_DIR/environment.json         provenance: one entry per start or resume
    RUN_DIR/skipped_images.txt       unreadable training images
    RUN_DIR/eval/                    ``stratavit evaluate``'s default output folder:
        results.json, report.md, report.html, skipped_images.txt, cache/

Nothing here imports the rest of stratavit: every layer may use it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIG = "config.yaml"
METRICS = "metrics.csv"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
PREVIOUS_CHECKPOINT = "previous.ckpt"
BACKBONE = "backbone.safetensors"
SUMMARY = "run.json"
ENVIRONMENT = "environment.json"
SKIPPED = "skipped_images.txt"
EVAL_DIR = "eval"
RESULTS = "results.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
CACHE_DIR = "cache"


@dataclass(frozen=True)
class RunFolder:
    """Paths of one run folder (``RunFolder(Path("runs/moco")).checkpoint``)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def checkpoint(self) -> Path:
        return self.root / CHECKPOINT_DIR / LAST_CHECKPOINT

    @property
    def previous_checkpoint(self) -> Path:
        return self.root / CHECKPOINT_DIR / PREVIOUS_CHECKPOINT

    @property
    def backbone(self) -> Path:
        return self.root / BACKBONE

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY

    @property
    def environment(self) -> Path:
        return self.root / ENVIRONMENT

    @property
    def skipped(self) -> Path:
        return self.root / SKIPPED

    @property
    def eval_dir(self) -> Path:
        return self.root / EVAL_DIR

    def is_run(self) -> bool:
        """True if a run was started here (its resolved config exists)."""
        return self.config.exists()

    def read_summary(self) -> dict[str, Any]:
        """``run.json`` as a dict ({} when the run has not finished once)."""
        return read_json(self.summary)

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.summary, summary)


@dataclass(frozen=True)
class EvalFolder:
    """Paths of one evaluation output folder (``RUN_DIR/eval`` unless ``--out``)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def results(self) -> Path:
        return self.root / RESULTS

    @property
    def report_md(self) -> Path:
        return self.root / REPORT_MD

    @property
    def report_html(self) -> Path:
        return self.root / REPORT_HTML

    @property
    def skipped(self) -> Path:
        return self.root / SKIPPED

    @property
    def cache(self) -> Path:
        return self.root / CACHE_DIR


def last_checkpoint(run_dir: str | Path) -> Path:
    """``RUN_DIR/checkpoints/last.ckpt``."""
    return RunFolder(Path(run_dir)).checkpoint


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or {} if the file does not exist."""
    return json.loads(path.read_text()) if path.exists() else {}


def write_json(path: Path, data: Any) -> None:
    """Indented JSON with a final newline (the format of every JSON file a run writes)."""
    path.write_text(json.dumps(data, indent=2) + "\n")
