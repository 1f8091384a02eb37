"""The statistics of `stratavit ablate`, against hand-computed values: the t quantile (no scipy),
mean ± t interval over seeds, paired vs Welch comparisons and the verdict rules."""

from __future__ import annotations

import math

import pytest

from stratavit.ablation.stats import IDENTICAL, NO_DATA, ONE_SEED, compare, estimate, t_factor
from stratavit.ablation.tdist import regularized_beta, t_cdf, t_quantile

# two-sided 95 % (p = 0.975) and 99 % (p = 0.995) quantiles from printed t tables
T_TABLE = [
    (0.975, 1, 12.706), (0.975, 2, 4.303), (0.975, 3, 3.182), (0.975, 4, 2.776), (0.975, 5, 2.571),
    (0.975, 10, 2.228), (0.975, 30, 2.042), (0.975, 120, 1.980), (0.995, 1, 63.657), (0.995, 4, 4.604),
    (0.95, 2, 2.920), (0.95, 9, 1.833),
]


@pytest.mark.parametrize("p, df, expected", T_TABLE)
def test_t_quantile_matches_the_table(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=5e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-expected, abs=5e-4)  # symmetric
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-10)  # the inverse of the CDF


def test_t_limits_and_fractional_df():
    assert t_quantile(0.5, 3) == 0.0 and t_cdf(0.0, 7) == pytest.approx(0.5)
    assert t_quantile(0.975, math.inf) == pytest.approx(1.959964, abs=1e-6)  # the normal
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959966, abs=1e-5)
    assert t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/pi
    assert t_cdf(1.0, 2) == pytest.approx(0.5 + 1 / (2 * math.sqrt(3)))  # df 2: 1/2 + t/(2 sqrt(2 + t^2))
    assert t_quantile(0.975, 4) > t_quantile(0.975, 4.5) > t_quantile(0.975, 5)  # Welch's df is fractional
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)
    with pytest.raises(ValueError):
        t_quantile(0.9, 0)


def test_regularized_beta_closed_forms():
    for x in (0.1, 0.5, 0.93):
        assert regularized_beta(1, 1, x) == pytest.approx(x)  # uniform
        assert regularized_beta(2.5, 1, x) == pytest.approx(x ** 2.5)  # I_x(a, 1) = x^a
        assert regularized_beta(1, 3, x) == pytest.approx(1 - (1 - x) ** 3)  # I_x(1, b) = 1 - (1-x)^b
    assert regularized_beta(7, 7, 0.5) == pytest.approx(0.5)
    assert regularized_beta(2, 3, 0.0) == 0.0 and regularized_beta(2, 3, 1.0) == 1.0


def test_estimate_mean_sd_and_interval_n2_n3_n5():
    e = estimate([1.0, 3.0])  # mean 2, sd sqrt(2), half = 12.706 * sqrt(2) / sqrt(2)
    assert (e.n, e.mean) == (2, 2.0) and e.sd == pytest.approx(math.sqrt(2))
    assert e.half_width == pytest.approx(12.7062, abs=1e-4) and e.low == pytest.approx(2 - 12.7062, abs=1e-4)
    e = estimate([1.0, 2.0, 3.0])  # sd 1, half = 4.303 / sqrt(3)
    assert e.mean == 2.0 and e.sd == pytest.approx(1.0) and e.half_width == pytest.approx(4.3027 / math.sqrt(3), abs=1e-4)
    e = estimate([1.0, 2.0, 3.0, 4.0, 5.0])  # sd sqrt(2.5), half = 2.776 * sqrt(2.5) / sqrt(5)
    assert e.sd == pytest.approx(math.sqrt(2.5)) and e.half_width == pytest.approx(2.7764 * math.sqrt(0.5), abs=1e-4)
    assert t_factor(5) == pytest.approx(2.7764, abs=1e-4)


def test_estimate_one_value_zero_variance_and_none():
    one = estimate([42.0])
    assert (one.n, one.mean, one.sd, one.half_width, one.low) == (1, 42.0, None, None, None)
    flat = estimate([7.0, 7.0, 7.0])
    assert flat.sd == 0.0 and flat.half_width == 0.0 and flat.low == flat.high == 7.0
    assert estimate([]).mean is None


def test_paired_comparison_sees_what_welch_does_not():
    recipe = {0: 10.0, 1: 20.0, 2: 30.0}
    base = {0: 9.0, 1: 18.5, 2: 29.0}  # differences 1, 1.5, 1: mean 7/6, sd 0.288675
    paired = compare(recipe, base)
    assert paired.test == "paired" and paired.df == 2
    assert paired.diff == pytest.approx(7 / 6)
    assert paired.half_width == pytest.approx(4.302653 * 0.2886751 / math.sqrt(3), abs=1e-5)  # 0.7172
    assert paired.verdict == "better" and paired.low > 0
    # the same numbers from different seeds: Welch, and the seed-to-seed spread (sd 10) swamps a 1.2 gap
    welch = compare(recipe, {3: 9.0, 4: 18.5, 5: 29.0})
    assert welch.test == "welch" and welch.verdict == "inconclusive"
    assert welch.diff == pytest.approx(7 / 6) and welch.low < 0 < welch.high


def test_welch_interval_by_hand():
    a = {0: 1.0, 1: 2.0, 2: 3.0}  # mean 2, var 1
    b = {0: 4.0, 1: 6.0, 2: 8.0, 3: 10.0}  # mean 7, var 20/3
    v1, v2 = 1 / 3, (20 / 3) / 4
    df = (v1 + v2) ** 2 / (v1 ** 2 / 2 + v2 ** 2 / 3)  # Welch–Satterthwaite: 4.0755
    c = compare(a, b)
    assert c.test == "welch" and c.df == pytest.approx(df) and c.df == pytest.approx(4.0755, abs=1e-4)
    assert c.diff == pytest.approx(-5.0)
    assert c.half_width == pytest.approx(t_quantile(0.975, df) * math.sqrt(v1 + v2))
    assert 2.571 < c.half_width / math.sqrt(2) < 2.776  # between the df 5 and df 4 quantiles
    assert c.verdict == "worse" and c.high < 0


def test_verdict_rules_one_seed_zero_variance_direction_and_words():
    assert compare({0: 90.0}, {0: 10.0}).verdict == ONE_SEED  # 1 seed: never decisive, however large the gap
    assert compare({0: 90.0, 1: 91.0}, {0: 10.0}).verdict == ONE_SEED  # the base has 1 seed
    assert compare({}, {0: 1.0, 1: 2.0}).verdict == NO_DATA
    same = compare({0: 5.0, 1: 6.0}, {0: 5.0, 1: 6.0})
    assert same.verdict == IDENTICAL and same.half_width == 0.0
    # every seed moved the metric by exactly +2: zero spread, a zero-width interval, decisive
    shift = compare({0: 12.0, 1: 14.0, 2: 13.0}, {0: 10.0, 1: 12.0, 2: 11.0})
    assert shift.verdict == "better" and shift.half_width == 0.0 and shift.diff == pytest.approx(2.0)
    assert compare({0: 3.0, 1: 3.0}, {2: 5.0, 3: 5.0}).verdict == "worse"  # Welch with no spread on either side
    assert compare({0: 3.0, 1: 3.0}, {2: 3.0, 3: 3.0}).verdict == IDENTICAL
    # lower-is-better reverses; "higher"/"lower" words for reported, unjudged numbers
    assert compare({0: 12.0, 1: 14.0, 2: 13.0}, {0: 10.0, 1: 12.0, 2: 11.0}, higher_is_better=False).verdict == "worse"
    assert compare({0: 12.0, 1: 14.0, 2: 13.0}, {0: 10.0, 1: 12.0, 2: 11.0}, words=("higher", "lower")).verdict == "higher"
    noisy = compare({0: 11.0, 1: 9.0, 2: 12.0}, {0: 10.0, 1: 10.0, 2: 10.0})  # differences 1, -1, 2
    assert noisy.verdict == "inconclusive" and noisy.low < 0 < noisy.high
