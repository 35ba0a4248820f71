"""Paired bootstrap confidence intervals for a difference between two variants on the same examples.

For per-example values a_i (a variant) and b_i (the baseline) on the same N examples, the statistic is the
mean difference d̄ = mean(a_i − b_i). Each of `resamples` resamples draws N example indices with replacement
(one seeded NumPy generator) and takes the mean difference over them; the interval is the percentile
interval of those means at `level` (Efron & Tibshirani, ch. 13). Pairing keeps the examples' own difficulty
out of the interval. A conclusion holds only where the interval excludes 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def no_width(low: float, high: float) -> bool:
    """Whether the interval [low, high] has no width, up to the rounding of float64 (a relative 1e-9): equal
    values computed along different paths (0.1 + 0.2 and 0.3) leave an interval of a few ulps, which says no
    more than one of none. Such an interval says nothing of the uncertainty, so no verdict rests on it."""
    return math.isclose(low, high, rel_tol=1e-9)


@dataclass(frozen=True)
class PairedDifference:
    """mean(variant − baseline) over `examples` pairs and its percentile bootstrap interval [low, high]."""

    mean: float
    low: float
    high: float
    examples: int
    level: float

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0. An interval of no width (`no_width`: every pair's difference is
        the same, as with one example) excludes 0 by this test while saying nothing; callers that give a
        verdict check `has_width` first."""
        return not self.low <= 0.0 <= self.high

    @property
    def has_width(self) -> bool:
        """Whether the interval is wider than float64 rounding (not `no_width`)."""
        return not no_width(self.low, self.high)

    def describe(self, digits: int = 4) -> str:
        """e.g. "+0.0123 [+0.0040, +0.0210]"."""
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def paired_bootstrap(
    variant: Sequence[float],
    baseline: Sequence[float],
    *,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedDifference:
    """The mean per-example difference `variant − baseline` with its paired bootstrap interval.

    Args:
        variant, baseline: [N] per-example values on the same examples, in the same order.
        resamples: bootstrap resamples (>= 1,000 for a 95% interval).
        seed: the generator's seed (the interval is a deterministic function of the inputs and the seed).
        level: the interval's coverage, in (0, 1).

    Raises:
        ValueError: unequal or empty inputs, non-finite values, resamples < 1, or a level outside (0, 1).
    """
    a, b = np.asarray(variant, np.float64), np.asarray(baseline, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(
            f"need two equal, non-empty 1-D sequences of per-example values, got {a.shape}, {b.shape}"
        )
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("per-example values must be finite")
    if resamples < 1 or not 0 < level < 1:
        raise ValueError(f"need resamples >= 1 and 0 < level < 1, got {resamples}, {level}")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(resamples, diff.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return PairedDifference(float(diff.mean()), float(low), float(high), int(diff.size), level)
