"""The paired bootstrap (robustness.geometry.stats) and the claim scorecard built on it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from robustness.errors import InputError
from robustness.geometry.stats import Interval, all_hold, bootstrap_difference, equivalence_verdict, verdict

Z95 = 1.959963984540054


def test_paired_mean_interval_matches_the_normal_approximation_for_large_n() -> None:
    rng = np.random.default_rng(1)
    n = 4000
    a = rng.normal(0.0, 2.0, n)
    b = a + rng.normal(0.3, 1.0, n)  # shared per-image part: only the differences' spread matters
    interval = bootstrap_difference(a, b, "mean", seed=3)
    d = b - a
    half = Z95 * d.std(ddof=1) / math.sqrt(n)
    assert interval.estimate == pytest.approx(d.mean(), abs=1e-12)
    assert interval.low == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert interval.high == pytest.approx(d.mean() + half, abs=0.1 * half)
    assert interval.n_a == interval.n_b == n and interval.paired


def test_median_difference_interval_matches_the_asymptotic_standard_error() -> None:
    # Independent N(0, 1) values: each sample median has variance (pi / 2) / n, so their
    # difference has standard error sqrt(pi / n).
    rng = np.random.default_rng(2)
    n = 4000
    a, b = rng.normal(size=n), rng.normal(size=n)
    interval = bootstrap_difference(a, b, "median", seed=5)
    half = Z95 * math.sqrt(math.pi / n)
    assert interval.estimate == pytest.approx(np.median(b) - np.median(a), abs=1e-12)
    assert (interval.high - interval.low) / 2 == pytest.approx(half, rel=0.12)


def test_unpaired_interval_uses_both_groups_variances_and_sizes() -> None:
    rng = np.random.default_rng(3)
    a, b = rng.normal(1.0, 1.0, 3000), rng.normal(1.5, 3.0, 1500)
    interval = bootstrap_difference(a, b, "mean", paired=False, seed=7)
    half = Z95 * math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    assert (interval.high - interval.low) / 2 == pytest.approx(half, rel=0.1)
    assert (interval.n_a, interval.n_b, interval.paired) == (3000, 1500, False)


def test_pairing_removes_the_shared_per_image_spread() -> None:
    rng = np.random.default_rng(4)
    a = rng.lognormal(0.0, 1.5, 200)
    b = a * 1.1
    paired = bootstrap_difference(a, b, "mean", seed=0)
    unpaired = bootstrap_difference(a, b, "mean", paired=False, seed=0)
    assert paired.low > 0  # every image grew by 10%
    assert unpaired.contains_zero()
    assert paired.high - paired.low < 0.5 * (unpaired.high - unpaired.low)


def test_percentile_interval_covers_the_true_difference_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(5)
    covered = 0
    trials = 300
    for trial in range(trials):
        a = rng.normal(0.0, 1.0, 60)
        b = a + rng.normal(0.5, 1.0, 60)
        interval = bootstrap_difference(a, b, "mean", seed=trial, resamples=1000)
        covered += interval.low <= 0.5 <= interval.high
    # Binomial(300, 0.95) lies in [273, 295] with probability > 0.999; percentile intervals
    # at n = 60 undercover by about a percent.
    assert 270 <= covered <= 296


def test_seeded_and_exact_for_a_constant_shift() -> None:
    a = np.linspace(0.0, 1.0, 50)
    first = bootstrap_difference(a, a ** 2, "median", seed=11)
    assert first == bootstrap_difference(a, a ** 2, "median", seed=11)
    assert first != bootstrap_difference(a, a ** 2, "median", seed=12)
    shifted = bootstrap_difference(a, a + 2.0, "mean", seed=0)
    assert (shifted.estimate, shifted.low, shifted.high) == pytest.approx((2.0, 2.0, 2.0), abs=1e-12)


def test_non_finite_values_drop_their_pair_or_their_own_value() -> None:
    a = np.array([1.0, np.nan, 3.0, 4.0, 5.0])
    b = np.array([2.0, 2.0, np.inf, 5.0, 6.0])
    paired = bootstrap_difference(a, b, "mean")
    assert (paired.n_a, paired.n_b) == (3, 3)
    assert paired.estimate == pytest.approx(1.0)
    unpaired = bootstrap_difference(a, b, "mean", paired=False)
    assert (unpaired.n_a, unpaired.n_b) == (4, 4)
    assert unpaired.estimate == pytest.approx(np.mean([2.0, 2.0, 5.0, 6.0]) - np.mean([1.0, 3.0, 4.0, 5.0]))
    lonely = bootstrap_difference([1.0], [2.0])
    assert lonely.estimate == 1.0 and not lonely.defined


def test_bad_arguments_are_input_errors() -> None:
    with pytest.raises(InputError, match="statistic"):
        bootstrap_difference([1.0, 2.0], [1.0, 2.0], "mode")
    with pytest.raises(InputError, match="paired"):
        bootstrap_difference([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(InputError, match="level"):
        bootstrap_difference([1.0, 2.0], [1.0, 2.0], level=95)


def _interval(low: float, high: float) -> Interval:
    return Interval("mean", (low + high) / 2, low, high, 10, 10, True, 0.95)


def test_verdicts_follow_the_interval_and_the_predicted_sign() -> None:
    assert verdict(_interval(0.1, 0.3), +1) == "holds"
    assert verdict(_interval(0.1, 0.3), -1) == "does not hold"
    assert verdict(_interval(-0.3, -0.1), -1) == "holds"
    assert verdict(_interval(-0.1, 0.3), +1) == "inconclusive"
    assert verdict(_interval(float("nan"), float("nan")), +1) == "inconclusive"
    assert equivalence_verdict(_interval(-0.05, 0.08), 0.1) == "holds"
    assert equivalence_verdict(_interval(-0.05, 0.3), 0.1) == "inconclusive"
    assert equivalence_verdict(_interval(0.2, 0.3), 0.1) == "does not hold"
    assert all_hold(["holds", "holds"]) == "holds"
    assert all_hold(["holds", "inconclusive"]) == "inconclusive"
    assert all_hold(["inconclusive", "does not hold"]) == "does not hold"


def test_one_sample_interval_matches_the_standard_error_of_the_mean() -> None:
    from robustness.geometry.stats import bootstrap_statistic

    values = np.random.default_rng(6).exponential(2.0, 5000)
    interval = bootstrap_statistic(values, "mean", seed=1)
    half = Z95 * values.std(ddof=1) / math.sqrt(len(values))
    assert interval.estimate == pytest.approx(values.mean())
    assert (interval.low, interval.high) == pytest.approx((values.mean() - half, values.mean() + half), abs=0.1 * half)
    median = bootstrap_statistic(values, "median", seed=1)
    # Median of Exp(scale 2) is 2 ln 2, its density there 1/4: standard error 1 / (2 f sqrt(n)) = 2 / sqrt(n).
    assert (median.high - median.low) / 2 == pytest.approx(Z95 * 2 / math.sqrt(len(values)), rel=0.12)
    assert median.low < 2 * math.log(2) < median.high


def test_ordering_names_variants_from_smallest_to_largest() -> None:
    from robustness.geometry.stats import ordering

    assert ordering({"base": 5.5, "adversarial": 1.1, "cure": 6.4e-4}) == "cure < adversarial < base"
    assert ordering({"base": 1.0, "cure": float("nan")}) == "base, cure ?"
