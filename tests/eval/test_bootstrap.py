"""The paired bootstrap interval (eval/bootstrap.py) against a direct NumPy statement, and its coverage."""

from __future__ import annotations

import numpy as np
import pytest

from nextquill_jax.eval.bootstrap import PairedDifference, no_width, paired_bootstrap


def direct_statement(a, b, resamples, seed, level):
    """One resample at a time: N indices with replacement, the mean difference, then the percentiles."""
    rng = np.random.default_rng(seed)
    n = len(a)
    means = []
    for _ in range(resamples):
        idx = rng.integers(0, n, size=n)
        means.append(np.mean([a[i] - b[i] for i in idx]))
    return np.percentile(means, [100 * (1 - level) / 2, 100 * (1 + level) / 2])


def test_equals_the_direct_statement():
    rng = np.random.default_rng(4)
    a, b = rng.normal(0.3, 1.0, 57), rng.normal(0.1, 1.0, 57)
    got = paired_bootstrap(a, b, resamples=1500, seed=9, level=0.9)
    low, high = direct_statement(a, b, 1500, 9, 0.9)
    assert got.mean == pytest.approx(np.mean(a - b), abs=1e-12)
    assert (got.low, got.high) == pytest.approx((low, high), abs=1e-12)
    assert got.examples == 57 and got.level == 0.9


def test_pairing_removes_the_examples_own_spread():
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 5.0, 400)  # large per-example variation shared by both variants
    a, b = difficulty + 0.2 + rng.normal(0, 0.3, 400), difficulty + rng.normal(0, 0.3, 400)
    paired = paired_bootstrap(a, b, resamples=2000)
    assert paired.significant and paired.low > 0.1 and paired.high < 0.3
    assert not paired_bootstrap(b, b).significant  # no difference: the interval is [0, 0]


def test_covers_the_true_difference_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(200):
        a, b = rng.normal(0.5, 1.0, 60), rng.normal(0.3, 1.0, 60)
        interval = paired_bootstrap(a, b, resamples=1000, seed=trial)
        covered += interval.low <= 0.2 <= interval.high
    assert 0.88 <= covered / 200 <= 0.99


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match="resamples >= 1"):
        paired_bootstrap([1.0], [2.0], resamples=0)
    with pytest.raises(ValueError, match="equal, non-empty"):  # it returned a NaN interval
        paired_bootstrap([], [])
    for level in (0.0, 1.0):  # a 100% interval is the whole line, not the resamples' range
        with pytest.raises(ValueError, match="0 < level < 1"):
            paired_bootstrap([1.0, 2.0], [2.0, 2.0], level=level)


def test_the_defaults_are_2000_resamples_seed_0_and_a_95_percent_interval():
    rng = np.random.default_rng(7)
    a, b = rng.normal(0.2, 1.0, 23), rng.normal(0.0, 1.0, 23)
    got = paired_bootstrap(a, b)
    low, high = direct_statement(a, b, 2000, 0, 0.95)
    assert (got.low, got.high) == pytest.approx((low, high), abs=1e-12)
    assert got.level == 0.95


def test_per_example_values_must_be_one_dimensional():
    with pytest.raises(ValueError, match="1-D"):
        paired_bootstrap([[1.0, 2.0]], [[0.5, 1.0]])


def test_describe_signs_every_number():
    d = PairedDifference(mean=0.0123, low=-0.004, high=0.021, examples=3, level=0.95)
    assert d.describe() == "+0.0123 [-0.0040, +0.0210]"
    assert d.describe(2) == "+0.01 [-0.00, +0.02]"


def test_no_width_allows_float64_rounding_only():
    """An interval is of no width within a relative 1e-9 (0.1 + 0.2 against 0.3); one of a relative 1e-6 has
    width."""
    assert no_width(0.1 + 0.2, 0.3) and no_width(2.0, 2.0)
    assert abs((0.1 + 0.2) - 0.3) / 0.3 < 1e-9  # the premise: a few ulps
    assert not no_width(1.0, 1.0 + 1e-6)
    assert not no_width(0.01, 0.01 * (1 + 1e-4))
    assert PairedDifference(0.01, 0.01, 0.01 * (1 + 1e-4), 5, 0.95).has_width


def test_a_non_finite_baseline_value_is_refused():
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="finite"):
            paired_bootstrap([1.0, 2.0], [1.0, bad])


def test_an_interval_below_0_is_significant_and_one_across_0_is_not():
    """Significance is the interval excluding 0 on either side (a variant reliably worse counts too)."""
    assert PairedDifference(-0.2, -0.3, -0.1, 9, 0.95).significant
    assert PairedDifference(0.2, 0.1, 0.3, 9, 0.95).significant
    assert not PairedDifference(0.0, -0.1, 0.1, 9, 0.95).significant
    rng = np.random.default_rng(3)
    worse = paired_bootstrap(rng.normal(0.0, 0.1, 50), rng.normal(1.0, 0.1, 50), resamples=500)
    assert worse.high < 0 and worse.significant


def test_width_is_that_of_the_interval_not_its_distance_from_the_mean():
    """An interval [0.1, 0.2] has width even when its mean sits at one end; [0.2, 0.2] has none."""
    assert PairedDifference(0.1, 0.1, 0.2, 4, 0.95).has_width
    assert not PairedDifference(0.15, 0.2, 0.2, 4, 0.95).has_width


def test_no_width_is_relative_to_the_values_not_absolute():
    """math.isclose with a relative 1e-9 only: two large values a relative 1e-12 apart have no width; 0 and
    1e-12 (a difference no relative tolerance of 0 allows) have width."""
    assert no_width(1e6, 1e6 * (1 + 1e-12))
    assert abs(1e6 * (1 + 1e-12) - 1e6) > 1e-9  # the premise: more than an absolute 1e-9 apart
    assert not no_width(0.0, 1e-12)
