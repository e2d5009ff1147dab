"""The paired bootstrap (robustness.stats) and the claim scorecard built on it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from robustness.errors import InputError
from robustness.stats import Interval, all_hold, bootstrap_difference, equivalence_verdict, verdict

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
    from robustness.stats import bootstrap_statistic

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
    from robustness.stats import ordering

    assert ordering({"base": 5.5, "adversarial": 1.1, "cure": 6.4e-4}) == "cure < adversarial < base"
    assert ordering({"base": 1.0, "cure": float("nan")}) == "base, cure ?"


# ---------------------------------------------------------------- the scorecard


import csv  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Sequence  # noqa: E402

import torch  # noqa: E402

from robustness.probes.base import ProbeResult  # noqa: E402
from robustness.scorecard import FLIP_RATE_MARGIN, compute_scorecard  # noqa: E402
from robustness.reporting import scorecard as scorecard_report  # noqa: E402

N = 60
PLANE_META = {"dataset": "digits", "split": "test", "num_images": N, "direction_seed": 0, "stats_resolution": 101, "extent": 2.0}


def _plane(probe: str, key: str, values: dict[str, np.ndarray], labels: np.ndarray | None = None) -> ProbeResult:
    arrays = {f"{v}/per_image/{key}": torch.as_tensor(x) for v, x in values.items()}
    arrays["per_image/label"] = torch.as_tensor(np.zeros(N, dtype=np.int64) if labels is None else labels)
    return ProbeResult(probe, arrays, {}, {**PLANE_META, "variants": list(values)})


def _rows(result: ProbeResult) -> dict[tuple[str, str, str], dict]:
    """Rows by (source, a, b); where a source has two claims on one pair (Figure 4), the first (the boundary's)."""
    rows: dict[tuple[str, str, str], dict] = {}
    for row in result.tables["scorecard"]:
        rows.setdefault((row["source"], row["a"], row["b"]), row)
    return rows


def _table1(fro2: dict[str, np.ndarray], norm: dict[str, np.ndarray]) -> ProbeResult:
    arrays = {f"{v}/fro2": torch.as_tensor(x) for v, x in fro2.items()} | {f"{v}/norm": torch.as_tensor(x) for v, x in norm.items()}
    arrays["labels"] = torch.zeros(N, dtype=torch.long)
    return ProbeResult("table1", arrays, {}, {"variants": list(fro2)})


def test_each_claim_gets_the_paired_interval_of_its_per_image_values_and_the_verdict_it_implies() -> None:
    rng = np.random.default_rng(0)
    base = rng.lognormal(0.0, 1.0, N) * rng.choice([-1.0, 1.0], N)  # signed: the claim is about |curvature|
    adversarial = 0.5 * np.abs(base) * rng.choice([-1.0, 1.0], N)
    cure = np.abs(adversarial) * rng.uniform(0.7, 1.3, N)  # no systematic change
    curvature = _plane("boundary_plane", "curvature", {"base": base, "adversarial": adversarial, "cure": cure})
    area = _plane("random_plane", "area_fraction", {"base": np.full(N, 0.6), "adversarial": np.full(N, 0.4), "cure": np.full(N, 0.7)})
    result = compute_scorecard({"boundary_plane": curvature, "random_plane": area}, seed=3)
    rows = _rows(result)

    fig2 = rows[("Figure 2", "base", "adversarial")]
    expected = bootstrap_difference(np.abs(base), np.abs(adversarial), "mean", seed=3)
    assert (fig2["effect_mean"], fig2["low_mean"], fig2["high_mean"]) == pytest.approx((expected.estimate, expected.low, expected.high))
    assert fig2["effect_mean"] == pytest.approx(-0.5 * np.abs(base).mean())
    assert fig2["a_median"] == pytest.approx(np.median(np.abs(base)))
    assert fig2["verdict_mean"] == fig2["verdict_median"] == "holds" and fig2["n_a"] == N
    # Wider for the adversarial model is predicted; narrower was measured.
    assert rows[("Figure 3", "base", "adversarial")]["verdict_mean"] == "does not hold"
    assert rows[("Figure 3", "base", "adversarial")]["effect_median"] == pytest.approx(-0.2)
    fig4_curvature = [r for r in result.tables["scorecard"] if r["source"] == "Figure 4" and "boundary" in r["claim"]][0]
    assert fig4_curvature["low_mean"] < 0 < fig4_curvature["high_mean"] and fig4_curvature["verdict_mean"] == "inconclusive"
    # No table1, path or perceptual result: those claims are not measured, and say why.
    table1_rows = [r for r in result.tables["scorecard"] if r["source"] == "Table 1"]
    assert {r["verdict_mean"] for r in table1_rows} == {"not measured"}
    assert "no table1 or hessian_norm result" in table1_rows[0]["note"]


def test_table1_ordering_can_hold_under_the_median_and_fail_under_the_mean() -> None:
    rng = np.random.default_rng(1)
    cure = rng.lognormal(np.log(0.8), 0.3, N)
    adversarial = cure * 2.0 * rng.lognormal(0.0, 0.05, N)
    base = adversarial * 3.0 * rng.lognormal(0.0, 0.05, N)
    cure_mean_skewed = cure.copy()
    cure_mean_skewed[:3] = 5000.0  # three images dominate CURE's mean, as in the seed's 90.6 vs 1.71
    norm = {"base": np.full(N, 0.5) + rng.normal(0, 0.01, N), "adversarial": np.full(N, 0.8) + rng.normal(0, 0.01, N), "cure": np.full(N, 1.2) + rng.normal(0, 0.01, N)}
    result = compute_scorecard({"table1": _table1({"base": base, "adversarial": adversarial, "cure": cure_mean_skewed}, norm)}, seed=0)
    (fro2_order,) = [r for r in result.tables["scorecard"] if r["claim"] == "ordering cure < adversarial < base"]
    assert fro2_order["verdict_median"] == "holds"
    # A resample can miss all three images (probability (57/60)^60, about 5%): the mean's step is inconclusive.
    assert fro2_order["verdict_mean"] == "inconclusive"
    assert fro2_order["observed_median"] == "cure < adversarial < base"
    assert fro2_order["observed_mean"] == "adversarial < base < cure"
    cure_mean_skewed[:12] = 5000.0  # a fifth of the images: the mean's ordering is reversed
    result_12 = compute_scorecard({"table1": _table1({"base": base, "adversarial": adversarial, "cure": cure_mean_skewed}, norm)}, seed=0)
    (fro2_order_12,) = [r for r in result_12.tables["scorecard"] if r["claim"] == "ordering cure < adversarial < base"]
    assert (fro2_order_12["verdict_mean"], fro2_order_12["verdict_median"]) == ("does not hold", "holds")
    (norm_order,) = [r for r in result.tables["scorecard"] if r["claim"] == "ordering base < adversarial < cure"]
    assert norm_order["verdict_mean"] == norm_order["verdict_median"] == "holds"
    seeds = {r["claim"]: r["seed_report"] for r in result.tables["scorecard"] if r["source"] == "Table 1"}
    assert seeds["adversarial training lowers ‖H‖_F²"] == "5.5 → 1.1"


def test_results_of_one_probe_from_two_sections_are_paired_only_on_the_same_images() -> None:
    rng = np.random.default_rng(2)
    base, adversarial = rng.uniform(1, 2, N), rng.uniform(0.1, 0.2, N)
    fig2 = _plane("boundary_plane", "curvature", {"base": base, "adversarial": adversarial})
    fig4 = _plane("boundary_plane", "curvature", {"cure": adversarial * 0.5})
    rows = _rows(compute_scorecard({"boundary_plane": fig2, "boundary_plane/fig4": fig4}, seed=0))
    assert rows[("Figure 4", "adversarial", "cure")]["effect_mean"] == pytest.approx(-0.5 * adversarial.mean())
    other_images = _plane("boundary_plane", "curvature", {"cure": adversarial}, labels=np.arange(N))
    rows = _rows(compute_scorecard({"a": fig2, "b": other_images}, seed=0))
    assert rows[("Figure 4", "adversarial", "cure")]["verdict_mean"] == "not measured"
    assert "different images" in rows[("Figure 4", "adversarial", "cure")]["note"]


def test_path_claims_compare_independent_natural_and_adversarial_pairs() -> None:
    pairs = [{"model": "base", "pair_type": "natural", "pair": i, "success": True, "points": p, "deviation": 0.1 * p} for i, p in enumerate((3, 3, 4, 3, 5, 4))]
    pairs += [{"model": "base", "pair_type": "adversarial", "pair": i, "success": True, "points": p, "deviation": 0.1 * p} for i, p in enumerate((6, 8, 7, 9, 6, 7, 8))]
    pairs += [{"model": "base", "pair_type": "adversarial", "pair": 7, "success": False, "points": float("nan"), "deviation": float("nan")}]
    arrays = {"base/natural/explained_variance_ratio": torch.tensor([0.9, 0.1]), "base/adversarial/explained_variance_ratio": torch.tensor([0.6, 0.3])}
    paths = ProbeResult("path_connectivity", arrays, {"pairs": pairs}, {"variants": ["base"]})
    rows = _rows(compute_scorecard({"path_connectivity": paths}, seed=0))
    points = [r for r in rows.values() if r["measure"] == "points on the path"][0]
    assert (points["n_a"], points["n_b"]) == (6, 7)  # the failed path is left out
    assert points["effect_mean"] == pytest.approx(np.mean([6, 8, 7, 9, 6, 7, 8]) - np.mean([3, 3, 4, 3, 5, 4]))
    assert points["verdict_mean"] == "holds" and "independent" in points["items"]
    # One path per pair type: the numbers, but no interval.
    share = [r for r in rows.values() if r["source"] == "Figures 6/8"][0]
    assert share["effect_mean"] == pytest.approx(-0.3, abs=1e-6)
    assert share["verdict_mean"] == "inconclusive" and "no interval" in share["note"]


def test_colour_flip_claims_are_equivalence_claims_over_images_both_models_get_right() -> None:
    correct = np.ones(N, dtype=bool)
    correct[:10] = False
    base_angle = np.where(np.arange(N) % 2 == 0, 30.0, np.nan)  # half the images flip
    arrays = {
        "base/correct": torch.as_tensor(correct), "base/min_angle": torch.as_tensor(base_angle),
        "adversarial/correct": torch.as_tensor(correct), "adversarial/min_angle": torch.as_tensor(base_angle),
        "cure/correct": torch.ones(N, dtype=torch.bool), "cure/min_angle": torch.full((N,), float("nan")),
    }
    rows = _rows(compute_scorecard({"perceptual": ProbeResult("perceptual", arrays, {}, {})}, seed=0))
    same = rows[("Figure 9", "base", "adversarial")]
    assert same["n_a"] == N - 10 and same["effect_mean"] == 0.0 and same["verdict_mean"] == "holds"
    never = rows[("Figure 9", "base", "cure")]
    assert never["effect_mean"] == pytest.approx(-0.5) and never["verdict_mean"] == "does not hold"
    assert never["expected"] == f"|b - a| <= {FLIP_RATE_MARGIN:g}"


def test_colour_flip_claims_read_the_hue_sweep_not_figure_9s_section() -> None:
    """Figure 9's section draws one image and searches no flipping angle: its min_angle is all NaN."""
    correct = torch.ones(N, dtype=torch.bool)
    unsearched = {f"{v}/{k}": (correct if k == "correct" else torch.full((N,), float("nan"))) for v in ("base", "adversarial", "cure") for k in ("correct", "min_angle")}
    flips = torch.where(torch.arange(N) % 4 == 0, 20.0, float("nan"))
    swept = {**{f"{v}/correct": correct for v in ("base", "adversarial", "cure")},
             "base/min_angle": flips, "adversarial/min_angle": flips, "cure/min_angle": torch.full((N,), 45.0)}
    results = {
        "fig9_perceptual": ProbeResult("perceptual", unsearched, {}, {"items": ["figure9"]}),
        "perceptual_sweep": ProbeResult("perceptual", swept, {}, {"items": ["sweep"]}),
    }
    rows = _rows(compute_scorecard(results, seed=0))
    assert rows[("Figure 9", "base", "adversarial")]["a_mean"] == pytest.approx(0.25)
    assert rows[("Figure 9", "base", "cure")]["effect_mean"] == pytest.approx(0.75)
    only_figure = _rows(compute_scorecard({"fig9_perceptual": results["fig9_perceptual"]}, seed=0))
    assert "hue sweep" in only_figure[("Figure 9", "base", "cure")]["note"]


def test_scorecard_table_keeps_its_columns_through_a_saved_result(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    area = _plane("random_plane", "area_fraction", {"base": rng.uniform(0, 0.5, N), "adversarial": rng.uniform(0.5, 1, N)})
    result = compute_scorecard({"random_plane": area}, seed=0)
    result.save(tmp_path / "saved")
    artefact, forest = scorecard_report.draw(ProbeResult.load(tmp_path / "saved"), tmp_path / "out")
    assert artefact.kind == "table" and forest.kind == "figure"
    with open(tmp_path / "out" / "scorecard.csv", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0])[:6] == ["Source", "Claim", "Measure", "a → b", "Expected", "Items"]
    fig3 = [row for row in table if row["Source"] == "Figure 3"][0]
    assert fig3["Verdict (mean)"] == "holds" and fig3["Items"] == f"{N} images"
    assert fig3["mean 95% CI"].startswith("[") and "Methods:" in (tmp_path / "out" / "scorecard.md").read_text(encoding="utf-8")
    assert {row["Source"] for row in table} >= {"Figure 2", "Figure 3", "Figure 4", "Table 1", "Table 2", "Figures 6/8", "Figure 9"}
    # Every Markdown row has as many cells as the header, although measures such as |curvature| contain "|".
    lines = [line for line in (tmp_path / "out" / "scorecard.md").read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    cells = {len(line.replace("\\|", "").split("|")) for line in lines}
    assert len(cells) == 1 and len(lines) == len(table) + 2


def _pair_rows(pair_type: str, values: Sequence[float], start: int = 0, model: str = "base") -> list[dict]:
    """Rows as path_connectivity writes them: pair index, endpoints (image indices and classes), outcome."""
    rows = []
    for i, points in enumerate(values):
        ok = np.isfinite(points)
        rows.append({"model": model, "pair_type": pair_type, "pair": i, "class": i % 10, "start_index": start + 2 * i, "end_index": start + 2 * i + 1,
                     "start_class": i % 10, "end_class": i % 10, "success": bool(ok), "points": points, "deviation": 0.01 * points if ok else float("nan")})
    return rows


def _paths_result(natural: Sequence[float], adversarial: Sequence[float], ratios: dict[str, np.ndarray]) -> ProbeResult:
    arrays = {f"base/{t}/pair_explained_variance_ratio": torch.as_tensor(r) for t, r in ratios.items()}
    return ProbeResult("path_connectivity", arrays, {"pairs": _pair_rows("natural", natural) + _pair_rows("adversarial", adversarial, start=1000)}, {"variants": ["base"]})


def test_path_pairs_that_several_sections_searched_count_once() -> None:
    """Figures 5-6 and 7-8 search Table 2's first pairs again: the scorecard must not count them twice."""
    rng = np.random.default_rng(7)
    natural = rng.integers(2, 6, 18).astype(float)
    adversarial = rng.integers(5, 12, 30).astype(float)
    adversarial[4] = np.nan  # one failed path: 29 successes, as in the default report
    ratio_natural = np.column_stack([rng.uniform(0.8, 1.0, 18), rng.uniform(0.0, 0.1, 18)])
    ratio_adversarial = np.column_stack([rng.uniform(0.4, 0.7, 29), rng.uniform(0.1, 0.3, 29)])
    table2 = _paths_result(natural, adversarial, {"natural": ratio_natural, "adversarial": ratio_adversarial})
    fig5_6 = _paths_result(natural[:3], [], {"natural": ratio_natural[:3]})
    fig7_8 = _paths_result([], adversarial[:3], {"adversarial": ratio_adversarial[:3]})
    # The sections come in report order: the figures' before Table 2's.
    rows = compute_scorecard({"path_connectivity": fig5_6, "07_fig7_8/path_connectivity": fig7_8, "08_table2/path_connectivity": table2}, seed=2).tables["scorecard"]
    points = next(r for r in rows if r["measure"] == "points on the path")
    assert (points["n_a"], points["n_b"]) == (18, 29)
    alone = bootstrap_difference(natural, adversarial, "mean", paired=False, seed=2)
    assert (points["effect_mean"], points["low_mean"], points["high_mean"]) == pytest.approx((alone.estimate, alone.low, alone.high), abs=1e-12)
    share = next(r for r in rows if r["source"] == "Figures 6/8")
    assert (share["n_a"], share["n_b"]) == (18, 29)
    assert share["effect_mean"] == pytest.approx(ratio_adversarial[:, 0].mean() - ratio_natural[:, 0].mean(), abs=1e-12)
    # A pair with the same index but other endpoints is another pair, and counts.
    other = _paths_result([3.0], [], {"natural": ratio_natural[:1]})
    other.tables["pairs"][0]["end_index"] = 999
    rows = compute_scorecard({"a": table2, "b": other}, seed=2).tables["scorecard"]
    assert next(r for r in rows if r["measure"] == "points on the path")["n_a"] == 19


def test_standardised_effect_is_the_mean_effect_over_the_pooled_standard_deviation() -> None:
    from robustness.scorecard import pooled_sd, standardised_effect

    # Closed form: s_a^2 = 2 (n 2), s_b^2 = 4 (n 3), pooled (1 * 2 + 2 * 4) / 3.
    assert pooled_sd(np.array([0.0, 2.0]), np.array([1.0, 3.0, 5.0])) == pytest.approx(math.sqrt(10 / 3), abs=1e-15)
    assert math.isnan(pooled_sd(np.array([1.0]), np.array([2.0])))
    assert math.isnan(standardised_effect(np.full(5, 1.0), np.full(5, 1.0), 0.0, 0.0, 0.0)["d"])

    rng = np.random.default_rng(8)
    base, adversarial = rng.uniform(0.2, 0.6, N), rng.uniform(0.3, 0.9, N)
    area = _plane("random_plane", "area_fraction", {"base": base, "adversarial": adversarial})
    row = _rows(compute_scorecard({"random_plane": area}, seed=0))[("Figure 3", "base", "adversarial")]
    literal = math.sqrt(((N - 1) * base.var(ddof=1) + (N - 1) * adversarial.var(ddof=1)) / (2 * N - 2))
    assert row["pooled_sd"] == pytest.approx(literal, rel=1e-12)
    assert (row["d"], row["d_low"], row["d_high"]) == pytest.approx((row["effect_mean"] / literal, row["low_mean"] / literal, row["high_mean"] / literal), rel=1e-12)
    assert row["d_low"] > 0 and row["verdict"] == row["verdict_mean"] == "holds" and math.isnan(row["d_margin"])


def test_equivalence_claims_carry_their_margin_on_the_standardised_scale_and_the_mean_decides() -> None:
    correct = torch.ones(N, dtype=torch.bool)
    flips = np.where(np.arange(N) % 3 == 0, 10.0, np.nan)
    arrays = {f"{v}/correct": correct for v in ("base", "adversarial", "cure")}
    arrays |= {"base/min_angle": torch.as_tensor(flips), "adversarial/min_angle": torch.as_tensor(np.roll(flips, 1)), "cure/min_angle": torch.as_tensor(flips)}
    result = compute_scorecard({"perceptual": ProbeResult("perceptual", arrays, {}, {"items": ["sweep"]})}, seed=0)
    row = _rows(result)[("Figure 9", "base", "adversarial")]
    flipped_a, flipped_b = np.isfinite(flips).astype(float), np.isfinite(np.roll(flips, 1)).astype(float)
    literal = math.sqrt((flipped_a.var(ddof=1) + flipped_b.var(ddof=1)) / 2)
    assert row["d_margin"] == pytest.approx(FLIP_RATE_MARGIN / literal, rel=1e-12)
    assert row["expected_sign"] == 0 and row["verdict"] == row["verdict_mean"]
    assert result.meta["headline"]["statistic"] == "mean" and "mean" in result.meta["headline"]["rule"]
