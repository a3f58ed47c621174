"""Statistics over prompts: means with 95% intervals, and paired comparisons of two models.

Intervals over prompts are normal approximations, ``mean +- 1.96 * sd / sqrt(n)`` with the
sample sd (ddof = 1) over prompts; a single observation gives a zero-width interval. Scores come
as [N] or [N, k] (k samples per prompt): a prompt counts once, with the mean of its k. Paired
comparisons (win rate, gain) take two models' scores on the same prompts. Intervals over a few
seeds (``seeds_ci95``) use Student's t.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from scipy.stats import t as student_t

Z95 = 1.96
NAN = float("nan")


class Interval(NamedTuple):
    """An estimate with its 95% interval."""

    value: float
    lo: float
    hi: float


class Paired(NamedTuple):
    """One model against another on the same prompts: paired win rate and mean gain."""

    win_rate: Interval
    gain: Interval


def mean_ci95(x) -> Interval:
    """``(mean, lo, hi)`` with ``lo, hi = mean -+ 1.96 * sd / sqrt(n)`` (sample sd, ddof = 1)."""
    x = np.asarray(x, np.float64).reshape(-1)
    if x.size == 0:
        return Interval(NAN, NAN, NAN)
    mean = float(x.mean())
    half = Z95 * float(x.std(ddof=1)) / math.sqrt(x.size) if x.size > 1 else 0.0
    return Interval(mean, mean - half, mean + half)


def seeds_ci95(x) -> Interval:
    """``(mean, lo, hi)`` over a handful of runs (seeds): Student's t interval, ``mean -+
    t(0.975, n - 1) * sd / sqrt(n)``; with 3 seeds t = 4.30, not the 1.96 of ``mean_ci95``,
    which only holds for many observations. One run gives a zero-width interval."""
    x = np.asarray(x, np.float64).reshape(-1)
    if x.size == 0:
        return Interval(NAN, NAN, NAN)
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, mean, mean)
    half = float(student_t.ppf(0.975, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return Interval(mean, mean - half, mean + half)


def per_prompt(x) -> np.ndarray:
    """[N] per-prompt means of scores (or outcomes) shaped [N] or [N, k samples per prompt]."""
    x = np.asarray(x, np.float64)
    return x.reshape(len(x), -1).mean(axis=1)


def win_rate(scores_a, scores_b) -> Interval:
    """Paired win rate of a over b, with its CI over prompts: each pair of samples scores 1 if a >
    b, 0.5 if equal, 0 if less; scores are [N] or [N, k] (the k pairs of a prompt are averaged)."""
    a, b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"win_rate needs paired scores, got shapes {a.shape} and {b.shape}")
    return mean_ci95(per_prompt(np.where(a > b, 1.0, np.where(a == b, 0.5, 0.0))))


def paired(scores, ref_scores) -> Paired:
    """The paired win rate and gain (mean per-prompt difference) of ``scores`` over
    ``ref_scores`` on the same prompts ([N] or [N, k]), each an ``Interval``."""
    a, b = np.asarray(scores, np.float64), np.asarray(ref_scores, np.float64)
    return Paired(win_rate(a, b), mean_ci95(per_prompt(a - b)))


def none_if_nan(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def jsonable(row: dict[str, Any]) -> dict[str, Any]:
    """Floats as plain floats with NaN as None, for summary.json."""
    return {k: none_if_nan(v) if isinstance(v, float) else v for k, v in row.items()}
