"""Statistics a reviewer accepts: mean, std and a 95% interval over seeds; Welch's t-test; ties.

Pure functions of numbers (numpy + scipy, no pandas, no TensorFlow), so every rule a report
applies is testable on hand-made values.

    >>> s = describe([0.81, 0.82, 0.80])
    >>> round(s.mean, 3), round(s.std, 3), round(s.ci_low, 3), round(s.ci_high, 3)
    (0.81, 0.01, 0.785, 0.835)
    >>> p = welch_p([0.81, 0.82, 0.80], [0.71, 0.72, 0.70])
    >>> significant(p)
    True
    >>> tie_set({"full": [0.81, 0.82, 0.80], "partial": [0.80, 0.83, 0.79], "scratch": [0.50, 0.51, 0.52]}, "full")
    ['full', 'partial']

Conventions: a sample is the test accuracy of each confirmation seed of one cell. Fewer than two
seeds give no spread, so std, the interval and every p-value are NaN, and NaN is never significant:
one seed cannot show that a difference is more than seed-to-seed noise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats as _scipy

ALPHA = 0.05  # significance level of every test in the report
CONFIDENCE = 0.95  # level of the per-cell intervals (two-sided)


@dataclass(frozen=True)
class Describe:
    """Mean, sample std (ddof=1) and a t-interval of one cell's seeds; NaN where n is too small."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


def _finite(values: Iterable[float] | None) -> np.ndarray:
    array = np.asarray([] if values is None else list(values), dtype=float)
    return array[np.isfinite(array)]


def t_interval(mean: float, std: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """mean ± t_{(1+confidence)/2, n-1} * std / sqrt(n); (NaN, NaN) when n < 2 or std is not finite."""
    if n is None or not math.isfinite(n) or n < 2 or not math.isfinite(mean) or not math.isfinite(std):
        return math.nan, math.nan
    half = float(_scipy.t.ppf(0.5 + confidence / 2, int(n) - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


def describe(values: Iterable[float] | None, confidence: float = CONFIDENCE) -> Describe:
    """Summary of one cell's per-seed values (NaNs dropped). Mean is NaN without values; std and
    interval are NaN with fewer than two."""
    x = _finite(values)
    n = len(x)
    mean = float(x.mean()) if n else math.nan
    std = float(x.std(ddof=1)) if n >= 2 else math.nan
    low, high = t_interval(mean, std, n, confidence)
    return Describe(n, mean, std, low, high)


def welch_p(a: Iterable[float] | None, b: Iterable[float] | None) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances) between two sets of seeds.

    NaN when either side has fewer than two values, or when both sides are constant and equal
    (no evidence either way). Two constant, different sides give p = 0 (scipy's answer)."""
    x, y = _finite(a), _finite(b)
    if len(x) < 2 or len(y) < 2:
        return math.nan
    with warnings.catch_warnings():
        # Nearly identical seeds make scipy warn about precision; the p-value is still the answer.
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(_scipy.ttest_ind(x, y, equal_var=False).pvalue)


def welch_p_from_stats(mean_a: float, std_a: float, n_a: int, mean_b: float, std_b: float, n_b: int) -> float:
    """The same test from each side's mean, sample std (ddof=1) and count: identical to `welch_p`
    on the seeds behind them. For tables that kept only the summary numbers."""
    numbers = (mean_a, std_a, n_a, mean_b, std_b, n_b)
    if any(v is None or not math.isfinite(v) for v in numbers) or n_a < 2 or n_b < 2:
        return math.nan
    if std_a == 0 and std_b == 0:  # scipy would divide 0 by 0: decide as welch_p does
        return 0.0 if mean_a != mean_b else math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(_scipy.ttest_ind_from_stats(mean_a, std_a, int(n_a), mean_b, std_b, int(n_b), equal_var=False).pvalue)


def significant(p: float, alpha: float = ALPHA) -> bool:
    """p < alpha; a NaN p (too few seeds) is never significant."""
    return p is not None and math.isfinite(p) and p < alpha


def tie_set(samples: Mapping[str, Iterable[float] | None], winner: str, alpha: float = ALPHA) -> list[str]:
    """The winner and every other strategy that Welch's test cannot tell apart from it
    (p >= alpha, or no p at all because a side has fewer than two seeds). Keeps `samples`' order.

    A verdict is decisive only when this has one member: every other strategy is significantly
    worse than the winner."""
    best = samples[winner]
    return [name for name, values in samples.items() if name == winner or not significant(welch_p(best, values), alpha)]


def rank_agreement(scores: Iterable[float], outcomes: Iterable[float]) -> tuple[float, float]:
    """(Kendall's tau, Spearman's rho) between a cheap score and the outcome it should predict:
    1 when the score ranks every item as the outcome does. NaN with fewer than two pairs, or when
    either side is constant (no ranking to agree with)."""
    pairs = [
        (float(a), float(b))
        for a, b in zip(scores, outcomes)
        if a is not None and b is not None and math.isfinite(float(a)) and math.isfinite(float(b))
    ]
    if len(pairs) < 2:
        return math.nan, math.nan
    x, y = (np.array(side) for side in zip(*pairs))
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    return float(_scipy.kendalltau(x, y).statistic), float(_scipy.spearmanr(x, y).statistic)
