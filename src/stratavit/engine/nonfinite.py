"""Steps with a non-finite loss are skipped, by every process together.

Under DDP every process must take the same decision: a process that skips its backward while
another runs it leaves the gradient all-reduce waiting for it or, worse, pairs it with the next
step's, and the replicas drift apart. So the processes first all-reduce a finite flag (MIN): if the
loss is non-finite on any of them, all of them skip the step.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import Tensor

from stratavit.distributed import is_distributed

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss."""


def finite_on_every_process(loss: Tensor) -> bool:
    """True if ``loss`` is finite on this process and on every other (a collective: all call it)."""
    flag = torch.isfinite(loss.detach()).all().to(torch.int32)
    if is_distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


class NonFiniteGuard:
    """Counts the skipped steps and raises :class:`NonFiniteLossError` after ``max_streak`` in a row.

    Args:
        max_streak: consecutive skipped steps that stop the run (``train.max_nonfinite_steps``).
    """

    def __init__(self, max_streak: int) -> None:
        self.max_streak = max_streak
        self.streak = 0
        self.skipped = 0
        """Steps skipped in this run so far (restored from checkpoints by the module)."""

    def step_ok(self, loss: Tensor, step: int) -> bool:
        """Whether step ``step`` with this process's ``loss`` may update the model (collective).

        A skipped step is counted and logged; the ``max_streak``-th skipped step in a row raises,
        on every process.
        """
        if finite_on_every_process(loss):
            self.streak = 0
            return True
        self.skipped += 1
        self.streak += 1
        where = f"non-finite loss ({loss.item()})" if not torch.isfinite(loss).all() else "non-finite loss on another process"
        log.warning("step %d: %s; skipping the step", step, where)
        if self.streak >= self.max_streak:
            raise NonFiniteLossError(
                f"{self.streak} consecutive steps had a non-finite loss (last: {loss.item()}). "
                "Lower optim.base_lr, set optim.clip_grad, or check the data; the last good "
                "checkpoint is kept in the run folder."
            )
        return False
