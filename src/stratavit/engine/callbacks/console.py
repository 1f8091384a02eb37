"""The one line a run prints when training starts: what trains, on what, for how long, and where to."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import lightning as L


def _epochs(steps: float, per_epoch: int) -> str:
    return f"{steps / per_epoch:.3g}" if per_epoch > 0 else "?"


class StartLine(L.Callback):
    """Calls ``report`` (rank 0) once training starts, when the schedule is known, with e.g.
    ``training dino on 64 images: 3 steps (0.75 epochs of 4 steps, batch 16 x 1 process, 32-true on CPU) -> runs/x``
    or ``continuing dino at step 3 of 8 (...) -> runs/x``.

    Args:
        report: where the line goes (the CLI prints it).
        recipe, images, run_dir: what it names.
        start_step: the step a continued run resumes at (0 for a new run).
    """

    def __init__(self, report: Callable[[str], None], recipe: str, images: int | None, run_dir: Path, start_step: int = 0) -> None:
        self.report = report
        self.recipe = recipe
        self.images = images
        self.run_dir = run_dir
        self.start_step = start_step

    def line(self, trainer: L.Trainer, per_epoch: int) -> str:
        planned = trainer.estimated_stepping_batches
        total = f"{int(planned)}" if planned != float("inf") else "?"
        batch = getattr(trainer.lightning_module.cfg.data, "batch_size", "?")  # type: ignore[union-attr]
        world = trainer.world_size
        device = type(trainer.accelerator).__name__.replace("Accelerator", "").upper() or "?"
        detail = (f"{_epochs(planned, per_epoch)} epochs of {per_epoch} steps, batch {batch} x {world} "
                  f"process{'es' if world > 1 else ''}, {trainer.precision} on {device}")
        images = f"{self.images} images" if self.images is not None else "streamed images"
        if self.start_step > 0:
            head = f"continuing {self.recipe} at step {self.start_step} of {total} on {images}"
        else:
            head = f"training {self.recipe} on {images}: {total} steps"
        return f"{head} ({detail}) -> {self.run_dir}"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.report(self.line(trainer, int(getattr(pl_module, "steps_per_epoch", 0))))


__all__ = ["StartLine"]
