"""Training steps outside Lightning (calibration, benchmarks): what the module reads from a trainer."""

from __future__ import annotations

from typing import Any


class StandaloneTrainer:
    """Stands in for ``lightning.Trainer`` where :class:`~stratavit.engine.module.PretrainModule` reads one
    (``configure_optimizers``, the schedules, the step state), for steps run by hand.

    Args:
        steps: the run's optimiser steps (what the schedules are laid over).
        batches: batches per epoch.
        epoch: the epoch the steps count as (default 1: past DINO's frozen last layer, every head trains).
    """

    world_size = 1
    global_rank = 0
    local_rank = 0
    node_rank = 0
    accumulate_grad_batches = 1
    global_step = 0

    def __init__(self, steps: int = 10_000, batches: int = 100, epoch: int = 1) -> None:
        self.estimated_stepping_batches = steps
        self.num_training_batches = batches
        self.current_epoch = epoch
        self.optimizers: list[Any] = []


def attach(module: Any, trainer: StandaloneTrainer | None = None) -> Any:
    """Give ``module`` a :class:`StandaloneTrainer` (default sizes) and return it."""
    module._trainer = trainer or StandaloneTrainer()
    return module
