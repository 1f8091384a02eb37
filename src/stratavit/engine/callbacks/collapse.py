"""The collapse monitor: indicators of an embedding batch, a monitor that warns once when they
fall, and the Lightning callback that runs them during training (:class:`CollapseCallback`).

Two cheap statistics of embeddings ``z`` (N, D), computed during training on the teacher's CLS
embeddings of the batch (no extra forward):

- :func:`rankme`: RankMe, the effective rank of ``z`` (Garrido et al., "RankMe: Assessing the
  downstream performance of pretrained self-supervised representations by their rank", ICML 2023).
  It is ``1`` for a complete collapse (all rows parallel) and at most ``min(N, D)``.
- :func:`per_dim_std`: the mean over dimensions of the per-dimension standard deviation of the
  L2-normalised embeddings (SimSiam, Chen & He 2021, section 4.1). Isotropic embeddings give
  ``1/√D``; a collapse to one vector gives ``0``.

:class:`CollapseMonitor` keeps the last few values and logs one actionable warning per run when
both the current and the previous ``patience - 1`` checks fell below a threshold.

:class:`CollapseCallback` computes them on the steps Lightning writes to the loggers (every
``train.log_every_n_steps``), from the teacher embedding the training step returns
(:data:`TEACHER_EMBEDDING`), and logs them as ``collapse/*``.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from stratavit.config import ConfigError, TrainConfig
from stratavit.distributed import gather_concat, rank

if TYPE_CHECKING:
    from stratavit.objectives.base import ViewFeatures

log = logging.getLogger(__name__)

RANKME_EPS = 1e-7
"""The ``ε`` of RankMe, the value used in the paper: it keeps ``log p_k`` finite when a singular
value is exactly zero; it raises the rank by a factor of about ``exp(min(N, D) · ε · |log ε|)``
at most, i.e. < 0.1 % for ``min(N, D) ≤ 512``."""

# Defaults of the monitor (also the defaults of the ``train.collapse_*`` config fields).
RANK_FRACTION = 0.02
"""Warn when RankMe < this fraction of ``min(N, D)`` (or < :data:`RANK_FLOOR`). A complete
collapse has RankMe ≈ 1, i.e. 1/384 = 0.3 % of the maximum rank of a ViT-S CLS (384 dims, batch
≥ 384). The teacher CLS of a freshly initialised ViT is far above 2 % (measured on CIFAR-10: 26 %
for ViT-S/16 at 224 px, 16-30 % for the 32-dim test ViT, about 20 % after 60 DINO steps), so
2 % (≈ 8 of 384 dimensions) flags only a complete or near complete collapse."""
RANK_FLOOR = 1.5
"""RankMe below this is flagged whatever ``min(N, D)`` is, so that small batches or embeddings
(``min(N, D)`` < 1/RANK_FRACTION = 50, where 2 % is below the collapsed value 1) still flag a
complete collapse. RankMe is 1.5 when one direction holds 6/7 of the singular-value mass and
one other direction the rest."""
STD_THRESHOLD = 0.05
"""Warn when ``per-dim std × √D`` < this. Isotropic embeddings give 1, a collapse to one vector 0.
The value is at most ``sqrt(1 − c)``, ``c`` the mean cosine similarity of the embeddings of
different images, with equality when their variance is spread evenly over the dimensions (it is
``sqrt(k (1 − c) / D)`` when the variance sits in ``k`` dimensions). Below 0.05 the embeddings are
nearly parallel (c > 0.9975) or vary along about one dimension of 384. Measured on CIFAR-10: a
fresh ViT-S/16 0.80, the fresh 32-dim test ViT 0.41, the same after 60 DINO steps 0.5."""
PATIENCE = 3
"""Warn only after this many consecutive checks below a threshold (a single odd batch does not)."""


def _check_2d(z: Tensor, name: str) -> None:
    if z.ndim != 2:
        raise ValueError(f"{name}: expected embeddings of shape (N, D), got {tuple(z.shape)}")


def singular_value_entropy_rank(sigma: Tensor, eps: float = RANKME_EPS) -> Tensor:
    """RankMe from singular values ``sigma`` (K,) ≥ 0: ``exp(−Σ p_k log p_k)``, ``p_k = σ_k/‖σ‖₁ + ε``.

    Returns a 0-d float tensor. An all-zero ``sigma`` gives ``p_k = ε`` and a rank ≈ 1.
    """
    sigma = sigma.double()
    p = sigma / sigma.sum().clamp_min(torch.finfo(torch.float64).tiny) + eps
    return torch.exp(-(p * p.log()).sum())


@torch.no_grad()
def rankme(z: Tensor, eps: float = RANKME_EPS) -> Tensor:
    """RankMe effective rank of embeddings ``z`` (N, D); a 0-d float64 tensor in ``[≈1, min(N, D)]``.

    The singular values ``σ`` of ``z`` (not centred, as in the paper) are normalised to
    ``p_k = σ_k / ‖σ‖₁ + ε`` and the rank is the exponential of their entropy. Examples: a rank-1
    matrix gives ≈ 1, an N×D matrix with orthonormal columns (or rows) gives ``min(N, D)``.
    Non-finite entries give NaN.
    """
    _check_2d(z, "rankme")
    z = z.detach().float()
    if not bool(torch.isfinite(z).all()):
        return torch.tensor(float("nan"), dtype=torch.float64, device=z.device)
    return singular_value_entropy_rank(torch.linalg.svdvals(z), eps)


@torch.no_grad()
def per_dim_std(z: Tensor) -> tuple[Tensor, Tensor]:
    """SimSiam's collapse indicator of embeddings ``z`` (N, D), N ≥ 2.

    Each row is L2-normalised, the (unbiased) standard deviation over the N rows is taken per
    dimension and averaged over the D dimensions.

    Returns:
        ``(std, std · √D)`` as 0-d float tensors: ``std`` ≈ 1/√D for isotropic embeddings and 0
        for collapsed ones; the second is the same relative to 1/√D (≈ 1 isotropic, 0 collapsed).
        NaN when N < 2.
    """
    _check_2d(z, "per_dim_std")
    n, d = z.shape
    if n < 2:
        nan = torch.tensor(float("nan"), device=z.device)
        return nan, nan.clone()
    zn = F.normalize(z.detach().float(), dim=1)
    std = zn.std(dim=0, correction=1).mean()
    return std, std * math.sqrt(d)


def collapse_metrics(z: Tensor) -> dict[str, float]:
    """All indicators of ``z`` (N, D) as floats, keyed as they are logged (without ``collapse/``).

    ``rankme``, ``rankme_frac`` (RankMe / min(N, D)), ``std`` and ``std_norm`` (std · √D).
    """
    _check_2d(z, "collapse_metrics")
    r = float(rankme(z))
    std, std_norm = per_dim_std(z)
    return {
        "rankme": r,
        "rankme_frac": r / max(1, min(z.shape)),
        "std": float(std),
        "std_norm": float(std_norm),
    }


@dataclass
class CollapseCheck:
    """One check of the monitor: the step and the indicators of that step's batch."""

    step: int
    rankme: float
    rankme_frac: float
    std_norm: float
    below: bool
    """True when a value was below its threshold."""


class CollapseMonitor:
    """Keeps the last checks and warns once (via ``logging``) when the embeddings collapse.

    A check is *below* when RankMe < ``max(rank_fraction · min(N, D), RANK_FLOOR)`` or
    ``std_norm < std_threshold``. The monitor warns when the last ``patience`` checks were all below, and only once per monitor (one
    per training process; a resumed run may warn again). NaN values (a non-finite step) count as
    neither below nor healthy: they are skipped.

    Args:
        rank_fraction: threshold on RankMe / min(N, D), in [0, 1].
        std_threshold: threshold on per-dim std × √D, in [0, 1].
        patience: consecutive checks below a threshold before warning, ≥ 1.
        history: number of checks kept (for the message and for callers), ≥ ``patience``.
    """

    def __init__(
        self,
        rank_fraction: float = RANK_FRACTION,
        std_threshold: float = STD_THRESHOLD,
        patience: int = PATIENCE,
        history: int = 20,
    ) -> None:
        if not 0.0 <= rank_fraction <= 1.0:
            raise ConfigError(f"train.collapse_rank_fraction must be in [0, 1], got {rank_fraction}")
        if not 0.0 <= std_threshold <= 1.0:
            raise ConfigError(f"train.collapse_std_threshold must be in [0, 1], got {std_threshold}")
        if patience < 1:
            raise ConfigError(f"train.collapse_patience must be >= 1, got {patience}")
        self.rank_fraction = rank_fraction
        self.std_threshold = std_threshold
        self.patience = patience
        self.history: deque[CollapseCheck] = deque(maxlen=max(history, patience))
        self.warned = False
        self.warned_at: int | None = None

    def rank_threshold(self, max_rank: float) -> float:
        """RankMe below which a check of a batch with ``min(N, D) = max_rank`` is flagged."""
        return max(self.rank_fraction * max_rank, RANK_FLOOR)

    def is_below(self, metrics: dict[str, float]) -> bool:
        """True when ``metrics`` (as from :func:`collapse_metrics`) cross a threshold."""
        max_rank = metrics["rankme"] / metrics["rankme_frac"] if metrics["rankme_frac"] > 0 else 1.0
        return metrics["rankme"] < self.rank_threshold(max_rank) or metrics["std_norm"] < self.std_threshold

    def update(self, step: int, metrics: dict[str, float]) -> bool:
        """Record one check (``metrics`` as from :func:`collapse_metrics`); True if it warned now."""
        values = (metrics["rankme"], metrics["rankme_frac"], metrics["std_norm"])
        if not all(math.isfinite(v) for v in values):
            return False
        below = self.is_below(metrics)
        self.history.append(CollapseCheck(step, *values, below=below))
        recent = list(self.history)[-self.patience :]
        if self.warned or len(recent) < self.patience or not all(c.below for c in recent):
            return False
        self.warned, self.warned_at = True, step
        log.warning(self.message(recent))
        return True

    def message(self, recent: list[CollapseCheck]) -> str:
        last = recent[-1]
        max_rank = last.rankme / last.rankme_frac if last.rankme_frac > 0 else float("nan")
        return (
            f"step {last.step}: the teacher's embeddings look collapsed for the last {len(recent)} checks: "
            f"RankMe {last.rankme:.2f} of at most {max_rank:.0f} (warns below {self.rank_threshold(max_rank):.2f}), "
            f"per-dim std × √D {last.std_norm:.3f} (1 = isotropic, warns below {self.std_threshold}). "
            "Try: a lower optim.base_lr or longer optim.warmup_epochs; optim.clip_grad (e.g. 3.0); a larger "
            "data.batch_size (or more devices); a slower teacher (teacher.momentum closer to 1, e.g. 0.996); "
            "for DINO/iBOT heads keep the teacher sharpened and centred (objectives.<name>.teacher_temp at "
            "most 0.07, warmed up from 0.04; center_momentum about 0.9). The values are logged as collapse/* "
            "in metrics.csv; this warning is shown once per run (train.collapse_monitor=false turns it off)."
        )


TEACHER_EMBEDDING = "teacher_embedding"
"""Key of the training step's outputs that :class:`CollapseCallback` reads (see :func:`teacher_embedding`)."""


@torch.no_grad()
def teacher_embedding(teacher: ViewFeatures) -> Tensor:
    """What the monitor reads of a step: the teacher's CLS at its deepest level, on the first
    global view only (one embedding per image), (B, C) on this process."""
    cls = teacher.global_[max(teacher.global_)].cls
    return cls[: cls.shape[0] // teacher.n_global]


class CollapseCallback(L.Callback):
    """Runs a :class:`CollapseMonitor` on the teacher embeddings of training steps.

    On every step that Lightning writes to the loggers (every ``trainer.log_every_n_steps``; steps
    skipped for a non-finite loss are not checked), in ``on_train_batch_end``: the step's
    :data:`TEACHER_EMBEDDING` is gathered over processes (a collective, so every process checks the
    same steps), its indicators are logged as ``collapse/*`` with ``collapse/alert`` (1 when a
    threshold is crossed), and the rank-0 process feeds the monitor, which warns once.
    """

    def __init__(self, monitor: CollapseMonitor) -> None:
        self.monitor = monitor

    @classmethod
    def from_config(cls, train: TrainConfig) -> CollapseCallback | None:
        """The callback ``train.collapse_*`` ask for; None with ``train.collapse_monitor=false``."""
        if not train.collapse_monitor:
            return None
        return cls(CollapseMonitor(train.collapse_rank_fraction, train.collapse_std_threshold, train.collapse_patience))

    @staticmethod
    def is_due(trainer: L.Trainer) -> bool:
        """True after the optimiser steps whose metrics Lightning writes (its ``log_every_n_steps``).

        In ``on_train_batch_end`` the step that just ran is ``global_step - 1``; Lightning writes
        the metrics of step ``s`` when ``(s + 1) % log_every_n_steps == 0``.
        """
        n = trainer.log_every_n_steps
        return n > 0 and trainer.global_step % n == 0

    def check(self, z: Tensor, step: int) -> dict[str, float]:
        """The logged values of this process's embeddings ``z`` (B, C) gathered over processes
        (a collective), after feeding the monitor (rank 0) with them."""
        with torch.no_grad():
            z_all = gather_concat(z.float())
            with torch.autocast(z_all.device.type, enabled=False):  # SVD in fp32 under bf16 training
                metrics = collapse_metrics(z_all)
        below = self.monitor.is_below(metrics)
        if rank() == 0:
            self.monitor.update(step, metrics)
        return {**{f"collapse/{k}": v for k, v in metrics.items()}, "collapse/alert": float(below)}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not outputs or TEACHER_EMBEDDING not in outputs or not self.is_due(trainer):
            return
        logs = self.check(outputs[TEACHER_EMBEDDING], int(trainer.global_step) - 1)
        pl_module.log_dict(logs, batch_size=batch.batch_size)


__all__ = [
    "PATIENCE",
    "RANKME_EPS",
    "RANK_FLOOR",
    "RANK_FRACTION",
    "STD_THRESHOLD",
    "TEACHER_EMBEDDING",
    "CollapseCallback",
    "CollapseCheck",
    "CollapseMonitor",
    "collapse_metrics",
    "per_dim_std",
    "rankme",
    "singular_value_entropy_rank",
    "teacher_embedding",
]
