"""harness.stats: intervals, Welch's t-test and tie sets on hand-made numbers, checked against scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from harness import stats


def test_describe_mean_std_and_t_interval():
    s = stats.describe([0.81, 0.82, 0.80])
    assert s.n == 3 and s.mean == pytest.approx(0.81) and s.std == pytest.approx(0.01)
    # mean ± t_{0.975, 2} * std / sqrt(3), t_{0.975, 2} = 4.302653
    half = 4.302652729911275 * 0.01 / math.sqrt(3)
    assert (s.ci_low, s.ci_high) == (pytest.approx(0.81 - half), pytest.approx(0.81 + half))
    low, high = scipy_stats.t.interval(0.95, 2, loc=0.81, scale=scipy_stats.sem([0.81, 0.82, 0.80]))
    assert (s.ci_low, s.ci_high) == (pytest.approx(low), pytest.approx(high))


def test_describe_needs_two_seeds_for_a_spread():
    one = stats.describe([0.7])
    assert one.n == 1 and one.mean == 0.7
    assert math.isnan(one.std) and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    none = stats.describe([])
    assert none.n == 0 and math.isnan(none.mean)
    assert stats.describe([0.5, math.nan, 0.7]).n == 2  # NaNs (a seed without a score) are dropped
    assert all(math.isnan(x) for x in stats.t_interval(0.7, 0.1, 1))
    assert all(math.isnan(x) for x in stats.t_interval(0.7, math.nan, 5))


def test_welch_matches_scipy_on_known_numbers():
    a, b = [0.81, 0.82, 0.80], [0.79, 0.78, 0.80]
    p = stats.welch_p(a, b)
    assert p == pytest.approx(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-12)
    # By hand: t = 0.02 / sqrt(0.01**2/3 + 0.01**2/3) = 2.449, Welch df = 4 -> p = 0.0705
    assert p == pytest.approx(0.070484, abs=1e-6)
    assert not stats.significant(p)
    # Unequal variances and sizes: Welch's df differs from Student's, and so does p.
    c, d = [0.90, 0.91, 0.92, 0.93], [0.70, 0.85, 0.95]
    welch = stats.welch_p(c, d)
    assert welch == pytest.approx(scipy_stats.ttest_ind(c, d, equal_var=False).pvalue, rel=1e-12)
    assert welch != pytest.approx(scipy_stats.ttest_ind(c, d, equal_var=True).pvalue, rel=1e-3)


def test_welch_from_summary_numbers_is_the_same_test():
    a, b = [0.90, 0.91, 0.92, 0.93], [0.70, 0.85, 0.95]
    from_stats = stats.welch_p_from_stats(np.mean(a), np.std(a, ddof=1), 4, np.mean(b), np.std(b, ddof=1), 3)
    assert from_stats == pytest.approx(stats.welch_p(a, b), rel=1e-9)
    assert math.isnan(stats.welch_p_from_stats(0.9, math.nan, 1, 0.8, 0.01, 3))
    assert stats.welch_p_from_stats(0.9, 0.0, 3, 0.8, 0.0, 3) == 0.0 == stats.welch_p([0.75] * 3, [0.5] * 3)
    assert math.isnan(stats.welch_p_from_stats(0.9, 0.0, 3, 0.9, 0.0, 3))
    assert math.isnan(stats.welch_p([0.75] * 3, [0.75] * 3))


def test_fewer_than_two_seeds_give_no_p_and_nothing_is_significant():
    assert math.isnan(stats.welch_p([0.9], [0.1, 0.2, 0.3]))
    assert math.isnan(stats.welch_p([0.9, 0.91], [0.1]))
    assert math.isnan(stats.welch_p(None, [0.1, 0.2]))
    assert not stats.significant(math.nan) and not stats.significant(None)
    assert stats.significant(0.049) and not stats.significant(0.05)


def test_tie_set():
    samples = {"full": [0.81, 0.82, 0.80], "partial": [0.80, 0.83, 0.79], "features": [0.60, 0.61, 0.62], "scratch": [0.85]}
    # partial: within noise; features: significantly worse; scratch: one seed, so it cannot be ruled out.
    assert stats.tie_set(samples, "full") == ["full", "partial", "scratch"]
    clear = {"full": [0.81, 0.82, 0.80], "features": [0.60, 0.61, 0.62]}
    assert stats.tie_set(clear, "full") == ["full"]


def test_rank_agreement_is_kendall_and_spearman_and_nan_without_a_ranking():
    import scipy.stats

    from harness.stats import rank_agreement

    scores, accuracy = [1.0, 2.0, 3.0, 4.0], [0.5, 0.7, 0.6, 0.9]
    tau, rho = rank_agreement(scores, accuracy)
    assert tau == pytest.approx(scipy.stats.kendalltau(scores, accuracy).statistic)
    assert rho == pytest.approx(scipy.stats.spearmanr(scores, accuracy).statistic)
    assert rank_agreement([1, 2], [0.2, 0.9]) == pytest.approx((1.0, 1.0))
    assert all(math.isnan(v) for v in rank_agreement([1.0], [0.5]))  # one pair: no ranking
    assert all(math.isnan(v) for v in rank_agreement([1, 2, 3], [0.5, 0.5, 0.5]))  # constant outcome
    assert all(math.isnan(v) for v in rank_agreement([1, float("nan")], [0.5, 0.6]))
