"""Schedules as plain per-step arrays (as in DINO): index with the global step."""

from __future__ import annotations

import numpy as np


def cosine_schedule(
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
    warmup_includes_end: bool = False,
) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_steps``, then cosine to ``final``.

    The cosine part is ``final + (base − final)(1 + cos(π t / n)) / 2`` for ``t = 0 .. n−1`` over the
    ``n = total − warmup`` remaining steps. ``warmup_includes_end``: the warm-up is
    ``linspace(start, base, W)`` with its end point (DINO's ``cosine_scheduler``: step W−1 is at
    ``base``); otherwise ``start + (base − start) · t / W`` (MoCo v3: ``base`` is first reached at step W).

    Returns:
        (total_steps,) float64 array; value ``i`` is used at optimiser step ``i``.
    """
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    warm = (
        np.linspace(warmup_start, base, warmup_steps, endpoint=warmup_includes_end) if warmup_steps else np.empty(0)
    )
    n = total_steps - warmup_steps
    t = np.arange(n) / max(n, 1)
    cos = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t))
    return np.concatenate([warm, cos])


def momentum_schedule(m0: float, m_end: float, total_steps: int) -> np.ndarray:
    """EMA momentum ``m(t) = m_end − (m_end − m0)(1 + cos(π t/T))/2`` (MoCo v3 / DINO), (total_steps,)."""
    return cosine_schedule(m0, m_end, total_steps)
