"""Has the evaluated backbone moved from its initialisation? A run of a few steps has not.

An EMA teacher with momentum 0.99+ keeps 1 - 0.99^N of its initialisation's weight after N
steps, and warm-up keeps the student's own steps tiny: a run stopped after a few steps has a
teacher whose numbers are those of a random network, and nothing else says so. The check is
exact and cheap: training seeds torch with ``train.seed`` before it builds the backbone, so
:func:`~stratavit.backbones.export.random_backbone` with the same seed rebuilds the very
initial weights (the random-init baseline is that model), and the relative distance
``||theta - theta_0|| / ||theta_0||`` over every floating-point tensor says how far the weights
went. Measured on 2 CPU cores: a tiny ViT after 3, 30 and 100 MoCo v3 steps at batch 16 moved
1.4e-7, 3.7e-6 and 4.4e-5; the demo (468 steps) 0.10. Below :data:`BARELY_MOVED` (1e-3) the
evaluation warns. Where the initialisation is not reproduced (another stratavit version, other
initialisers) the distance is of order 1 and nothing is said.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["BARELY_MOVED", "Movement", "relative_change"]

BARELY_MOVED = 1e-3
"""Relative weight change from the initialisation below which the evaluation warns."""


@dataclass(frozen=True)
class Movement:
    """How far the evaluated weights are from the run's initialisation."""

    relative_change: float
    steps: int | None
    weights: str  # "teacher" or "student"

    def warning(self) -> str | None:
        """The one-line warning when the weights have barely moved, else None."""
        if not self.relative_change < BARELY_MOVED:
            return None
        steps = "steps unknown" if self.steps is None else f"{self.steps} step{'s' if self.steps != 1 else ''}"
        return (
            f"the {self.weights} has barely moved from its initialisation ({steps}; relative change "
            f"{self.relative_change:.1e}); these numbers are those of a random network"
        )

    def to_dict(self) -> dict[str, object]:
        return {"relative_change": self.relative_change, "steps": self.steps, "weights": self.weights,
                "barely_moved_below": BARELY_MOVED}


@torch.no_grad()
def relative_change(model: nn.Module, init: nn.Module) -> float | None:
    """``||theta - theta_0|| / ||theta_0||`` over the floating-point tensors both state dicts hold
    with the same shape; None when the architectures differ."""
    now, then = model.state_dict(), init.state_dict()
    if now.keys() != then.keys():
        return None
    num = den = 0.0
    for key, a in now.items():
        b = then[key]
        if not a.is_floating_point() or a.shape != b.shape:
            if a.shape != b.shape:
                return None
            continue
        a64, b64 = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
        num += float((a64 - b64).pow(2).sum())
        den += float(b64.pow(2).sum())
    if den == 0.0:
        return None
    value = math.sqrt(num / den)
    return value if math.isfinite(value) else None
