"""Measure what a run costs before it plans a budget (:mod:`stratavit.engine.budget`).

A copy of the freshly built module trains ``steps`` real steps on the run's own loader (after
``warmup`` untimed ones: the first steps pay for allocation and the loader's start-up), outside
Lightning: forward of student and teacher, every objective, backward, optimiser step, EMA, in the
run's precision. Then the copy is dropped and every random generator is put back, so the run that
follows is the one it would have been without calibration. Per epoch it adds what runs once an
epoch: the dataset pass of an objective that needs one (estimated from one teacher forward of a
batch, scaled to the data set) and a checkpoint (one timed save of the weights and optimiser state).
"""

from __future__ import annotations

import contextlib
import copy
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from stratavit.engine.budget import Costs
from stratavit.engine.standalone import StandaloneTrainer, attach
from stratavit.objectives.base import NeedsDatasetPass


@contextlib.contextmanager
def kept_random_state() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's (CPU and CUDA) generators on exit."""
    py, np_state, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_costs(
    module: Any, loader: DataLoader, device: torch.device, precision: str, folder: Path,
    steps: int = 4, warmup: int = 1,
) -> Costs:
    """Seconds per step, extra seconds per epoch and the final save's seconds of ``module`` on ``loader``.

    Args:
        module: the run's freshly built :class:`~stratavit.engine.module.PretrainModule` (not changed).
        loader: the run's training loader (its order is not disturbed: it is a function of the epoch).
        device, precision: where and how the run will train (``"bf16-mixed"``, ``"32-true"``, ...).
        folder: where one checkpoint-sized file is written and removed (the run folder's disk).
    """
    batches = len(loader) if hasattr(loader, "__len__") else 1000
    with kept_random_state():
        probe = copy.deepcopy(module).to(device).train()
        attach(probe, StandaloneTrainer(10_000, batches))
        opt = probe.configure_optimizers()
        it = iter(loader)
        times, teacher_s, batch = [], 0.0, None
        for n in range(warmup + steps):
            t0 = time.perf_counter()
            batch = next(it).to(device)
            with _autocast(device, precision):
                loss, _ = probe.compute_losses(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            probe.update_teacher(n)
            _sync(device)
            if n >= warmup:
                times.append(time.perf_counter() - t0)
        step_s = float(np.median(times))
        save_s = _checkpoint_seconds(probe, opt, folder)
        pass_s = 0.0
        if any(isinstance(o, NeedsDatasetPass) for o in probe.objectives.values()):
            teacher_s = _teacher_forward_seconds(probe, batch, device, precision)
            pass_s = teacher_s * batches  # one teacher forward of every image, every epoch (an upper bound)
        del probe, opt, it
    # the final save is a checkpoint, not a dataset pass
    return Costs(step_s=step_s, epoch_s=save_s + pass_s, fixed_s=save_s, pass_s=pass_s)


def _checkpoint_seconds(module: Any, opt: torch.optim.Optimizer, folder: Path) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".calibration") as fh:
        t0 = time.perf_counter()
        torch.save({"state_dict": module.state_dict(), "optimizer": opt.state_dict()}, fh.name)
        return time.perf_counter() - t0


@torch.no_grad()
def _teacher_forward_seconds(module: Any, batch: Any, device: torch.device, precision: str) -> float:
    """Seconds of one teacher forward of the first global view of ``batch`` (what a dataset pass does per batch)."""
    images = batch.global_views[0].images
    if images.dtype == torch.uint8:  # views.photometric=device: the raw crops; cost alike
        images = images.float()
    levels = sorted({lv for o in module.objectives.values() if isinstance(o, NeedsDatasetPass) for lv in o.teacher_levels()})
    _sync(device)
    t0 = time.perf_counter()
    with _autocast(device, precision):
        module.teacher.backbone(images, levels)
    _sync(device)
    return time.perf_counter() - t0
