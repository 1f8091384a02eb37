"""Intervals over seeds and the verdict of a recipe against the base.

* :func:`estimate`: mean, sample standard deviation (n - 1) and the Student t interval
  ``mean ± t_{1-α/2, n-1} · sd / √n`` of one recipe's values of one metric, one value per seed.
* :func:`compare`: the interval of the difference *recipe − base* and its verdict. When both have
  the same seeds (and at least 2) the comparison is **paired**: the t interval of the per-seed
  differences (n − 1 degrees of freedom). Otherwise **Welch's** interval:
  ``Δmean ± t_{1-α/2, ν} · √(s₁²/n₁ + s₂²/n₂)`` with the Welch–Satterthwaite ν. The verdict is
  ``better`` when the interval lies above 0, ``worse`` below 0 (reversed for a metric where lower
  is better), else ``inconclusive``; ``inconclusive (1 seed)`` when either side has fewer than 2
  values, ``inconclusive (identical)`` when every difference is exactly 0. A difference with no
  spread at all (zero variance, non-zero mean) has an interval of width 0 and so is decisive:
  that is what the t interval says, and it only happens when every seed moved the metric by the
  same amount.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from stratavit.ablation.tdist import t_quantile

__all__ = ["IDENTICAL", "LEVEL", "NO_DATA", "ONE_SEED", "Comparison", "Estimate", "compare", "estimate", "t_factor"]

LEVEL = 0.95
"""Confidence level of every interval and verdict."""
ONE_SEED = "inconclusive (1 seed)"
IDENTICAL = "inconclusive (identical)"
NO_DATA = "no data"
_ZERO = 1e-12  # relative: a standard deviation this small next to the values is exactly zero spread


@dataclass(frozen=True)
class Estimate:
    """One recipe's values of one metric over seeds: ``mean ± half_width`` (None with fewer than 2 values)."""

    n: int
    mean: float | None
    sd: float | None
    half_width: float | None

    @property
    def low(self) -> float | None:
        return None if self.mean is None or self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.mean is None or self.half_width is None else self.mean + self.half_width


@dataclass(frozen=True)
class Comparison:
    """The difference recipe − base of one metric: ``diff ± half_width`` by ``test`` (``paired`` / ``welch``)."""

    verdict: str
    test: str | None = None
    diff: float | None = None
    half_width: float | None = None
    df: float | None = None

    @property
    def low(self) -> float | None:
        return None if self.diff is None or self.half_width is None else self.diff - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.diff is None or self.half_width is None else self.diff + self.half_width


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, sd


def _is_zero(sd: float, scale: float) -> bool:
    return sd <= _ZERO * max(1.0, abs(scale))


def t_factor(n: int, level: float = LEVEL) -> float:
    """The factor of the two-sided ``level`` t interval of ``n`` values: ``t_{(1+level)/2, n-1}``."""
    return t_quantile(0.5 + level / 2, n - 1)


def estimate(values: Sequence[float], level: float = LEVEL) -> Estimate:
    """Mean, sd (n − 1) and the half-width of the two-sided Student t interval at ``level``."""
    n = len(values)
    if n == 0:
        return Estimate(0, None, None, None)
    mean, sd = _mean_sd(values)
    if n == 1:
        return Estimate(1, mean, None, None)
    return Estimate(n, mean, sd, t_factor(n, level) * sd / math.sqrt(n))


def _verdict(low: float, high: float, higher_is_better: bool, words: tuple[str, str]) -> str:
    up, down = words if higher_is_better else words[::-1]
    if low > 0:
        return up
    if high < 0:
        return down
    return "inconclusive"


def compare(
    values: Mapping[int, float], base: Mapping[int, float], *, higher_is_better: bool = True,
    level: float = LEVEL, words: tuple[str, str] = ("better", "worse"),
) -> Comparison:
    """Recipe ``values`` vs ``base`` values (both keyed by seed): paired when the seeds match, else Welch.

    ``words``: the verdicts when the interval lies above / below 0 for a higher-is-better metric
    (``("higher", "lower")`` for a throughput that is reported, not judged).
    """
    if not values or not base:
        return Comparison(NO_DATA)
    if len(values) < 2 or len(base) < 2:
        return Comparison(ONE_SEED, diff=_mean_sd(list(values.values()))[0] - _mean_sd(list(base.values()))[0])
    if set(values) == set(base):
        diffs = [values[s] - base[s] for s in sorted(values)]
        n = len(diffs)
        diff, sd = _mean_sd(diffs)
        if all(d == 0 for d in diffs):
            return Comparison(IDENTICAL, "paired", 0.0, 0.0, n - 1)
        half = 0.0 if _is_zero(sd, diff) else t_factor(n, level) * sd / math.sqrt(n)
        return Comparison(_verdict(diff - half, diff + half, higher_is_better, words), "paired", diff, half, n - 1)
    (m1, s1), (m2, s2) = _mean_sd(list(values.values())), _mean_sd(list(base.values()))
    v1, v2 = s1 * s1 / len(values), s2 * s2 / len(base)
    diff = m1 - m2
    if _is_zero(math.sqrt(v1 + v2), max(abs(m1), abs(m2))):
        if diff == 0:
            return Comparison(IDENTICAL, "welch", 0.0, 0.0, None)
        return Comparison(_verdict(diff, diff, higher_is_better, words), "welch", diff, 0.0, None)
    df = (v1 + v2) ** 2 / (v1 * v1 / (len(values) - 1) + v2 * v2 / (len(base) - 1))
    half = t_quantile(0.5 + level / 2, df) * math.sqrt(v1 + v2)
    return Comparison(_verdict(diff - half, diff + half, higher_is_better, words), "welch", diff, half, df)
