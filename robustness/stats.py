"""Bootstrap confidence intervals for the difference between two model variants.

A claim such as "adversarial training flattens the boundary" compares one number per image
under two variants. :func:`bootstrap_difference` resamples the images (or, for unpaired
samples such as different path pairs, each group on its own) and returns the percentile
interval of ``statistic(b) - statistic(a)``. Seeded: the same inputs and seed give the same
interval on every machine (numpy's PCG64 generator).

Pure numpy; no plotting, no models.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from robustness.errors import InputError

STATISTICS = ("mean", "median")
VERDICTS = ("holds", "does not hold", "inconclusive")
# Resamples per interval: the percentile endpoints then move by well under 1% of the
# interval's width from one seed to another.
DEFAULT_RESAMPLES = 4000


@dataclass(frozen=True)
class Interval:
    """``estimate`` = statistic(b) - statistic(a) on the data; ``[low, high]`` its bootstrap interval.

    ``n_a`` and ``n_b`` count the finite values used (equal when paired; ``n_b`` is 0 for the
    one-sample interval of :func:`bootstrap_statistic`, whose ``estimate`` is the statistic
    itself); ``level`` is the interval's nominal coverage. With fewer than two values per group there is no interval and
    ``low``/``high`` are NaN.
    """

    statistic: str
    estimate: float
    low: float
    high: float
    n_a: int
    n_b: int
    paired: bool
    level: float

    @property
    def defined(self) -> bool:
        return math.isfinite(self.low) and math.isfinite(self.high)

    def contains_zero(self) -> bool:
        return self.defined and self.low <= 0.0 <= self.high

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_and_stderr(values: Sequence[float] | np.ndarray | Any) -> tuple[float, float]:
    """Mean of the finite values and its standard error (sample standard deviation / sqrt(n));
    NaN where there are none (the error also where there is only one)."""
    data = np.asarray(values.double() if hasattr(values, "double") else values, dtype=np.float64).reshape(-1)
    data = data[np.isfinite(data)]
    if len(data) == 0:
        return math.nan, math.nan
    stderr = float(data.std(ddof=1) / math.sqrt(len(data))) if len(data) > 1 else math.nan
    return float(data.mean()), stderr


def _statistic(values: np.ndarray, statistic: str) -> np.ndarray:
    """The statistic along the last axis."""
    return values.mean(axis=-1) if statistic == "mean" else np.median(values, axis=-1)


def _as_vector(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise InputError(f"{what} must be one value per item (1-D), got shape {array.shape}")
    return array


def _check(statistic: str, level: float, resamples: int) -> None:
    if statistic not in STATISTICS:
        raise InputError(f"statistic must be one of {', '.join(STATISTICS)}, got '{statistic}'")
    if not 0.0 < level < 1.0:
        raise InputError(f"the interval's level must lie in (0, 1), got {level}", "e.g. 0.95")
    if isinstance(resamples, bool) or int(resamples) < 1:
        raise InputError(f"resamples must be a positive integer, got {resamples}", f"e.g. {DEFAULT_RESAMPLES}")


def _percentiles(draws: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(draws, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_statistic(
    values: Sequence[float] | np.ndarray, statistic: str = "mean", *, seed: int = 0, resamples: int = DEFAULT_RESAMPLES, level: float = 0.95
) -> Interval:
    """Percentile bootstrap interval of one group's mean or median (non-finite values dropped)."""
    _check(statistic, level, resamples)
    values = _as_vector(values, "values")
    values = values[np.isfinite(values)]
    nan = float("nan")
    if len(values) == 0:
        return Interval(statistic, nan, nan, nan, 0, 0, False, level)
    estimate = float(_statistic(values, statistic))
    if len(values) < 2:
        return Interval(statistic, estimate, nan, nan, len(values), 0, False, level)
    draws = _statistic(values[np.random.default_rng(int(seed)).integers(0, len(values), size=(int(resamples), len(values)))], statistic)
    return Interval(statistic, estimate, *_percentiles(draws, level), len(values), 0, False, level)


def bootstrap_difference(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    statistic: str = "mean",
    *,
    paired: bool = True,
    seed: int = 0,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
) -> Interval:
    """Percentile bootstrap interval of ``statistic(b) - statistic(a)``.

    ``paired``: ``a[i]`` and ``b[i]`` are the same item (image) under two variants; items where
    either value is not finite are dropped, and each resample draws items, keeping pairs
    together. Unpaired: each group drops its own non-finite values and is resampled on its own.
    For the mean the paired difference of means equals the mean of the differences; for the
    median it is the difference of the two medians (not the median of the differences), which is
    what a table of medians compares.
    """
    _check(statistic, level, resamples)
    a, b = _as_vector(a, "a"), _as_vector(b, "b")
    if paired:
        if a.shape != b.shape:
            raise InputError(f"paired values need one value per item in each group, got {len(a)} and {len(b)}", "pass paired=False for independent samples")
        keep = np.isfinite(a) & np.isfinite(b)
        a, b = a[keep], b[keep]
    else:
        a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    nan = float("nan")
    if len(a) == 0 or len(b) == 0:
        return Interval(statistic, nan, nan, nan, len(a), len(b), paired, level)
    estimate = float(_statistic(b, statistic) - _statistic(a, statistic))
    if len(a) < 2 or len(b) < 2:
        return Interval(statistic, estimate, nan, nan, len(a), len(b), paired, level)

    rng = np.random.default_rng(int(seed))
    if paired:
        index = rng.integers(0, len(a), size=(int(resamples), len(a)))
        draws = _statistic(b[index], statistic) - _statistic(a[index], statistic)
    else:
        draws = _statistic(b[rng.integers(0, len(b), size=(int(resamples), len(b)))], statistic) - _statistic(
            a[rng.integers(0, len(a), size=(int(resamples), len(a)))], statistic
        )
    return Interval(statistic, estimate, *_percentiles(draws, level), len(a), len(b), paired, level)


def ordering(estimates: dict[str, float]) -> str:
    """Variants from smallest to largest estimate, e.g. ``"cure < adversarial < base"`` (NaN last, as ``?``)."""
    finite = sorted((value, name) for name, value in estimates.items() if math.isfinite(value))
    missing = [name for name, value in estimates.items() if not math.isfinite(value)]
    text = " < ".join(name for _, name in finite)
    return text + "".join(f", {name} ?" for name in missing)


def verdict(interval: Interval, expected_sign: int) -> str:
    """Whether an interval supports a claim that predicts the sign of ``b - a``.

    ``expected_sign`` +1: the claim says ``b`` is larger; -1: smaller. The claim holds when the
    whole interval has that sign, does not hold when the whole interval has the other sign, and
    is inconclusive when the interval contains 0 (or there is no interval).
    """
    if expected_sign not in (-1, 1):
        raise InputError(f"expected_sign must be +1 or -1, got {expected_sign}")
    if not interval.defined or interval.contains_zero():
        return "inconclusive"
    return "holds" if (interval.low > 0) == (expected_sign > 0) else "does not hold"


def equivalence_verdict(interval: Interval, margin: float) -> str:
    """Whether an interval supports a claim that ``a`` and ``b`` are about equal.

    Holds when the whole interval lies within ``[-margin, margin]``; does not hold when it
    excludes 0 (a difference is shown); inconclusive otherwise (an interval that contains 0 but
    is too wide to show the two are close).
    """
    if not margin > 0:
        raise InputError(f"the equivalence margin must be positive, got {margin}")
    if not interval.defined:
        return "inconclusive"
    if -margin <= interval.low and interval.high <= margin:
        return "holds"
    if not interval.contains_zero():
        return "does not hold"
    return "inconclusive"


def all_hold(verdicts: Sequence[str]) -> str:
    """The verdict of a conjunction (an ordering of three variants is two pairwise claims)."""
    unknown = sorted(set(verdicts) - set(VERDICTS))
    if unknown:
        raise InputError(f"unknown verdict(s): {', '.join(unknown)}", f"verdicts are {', '.join(VERDICTS)}")
    if "does not hold" in verdicts:
        return "does not hold"
    if verdicts and all(v == "holds" for v in verdicts):
        return "holds"
    return "inconclusive"
