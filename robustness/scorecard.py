"""The claim scorecard: each claim of the seed report, tested over many samples.

:func:`compute_scorecard` takes the results a report collected (keyed by probe name; a result is
recognised by its ``probe`` field, so several results of one probe, e.g. Figure 2's and Figure 4's
``boundary_plane``, may be passed under any keys) and returns one row per claim: the statistic
under each of the two variants the claim compares, the effect ``statistic(b) - statistic(a)``
under the mean and under the median, each with a seeded bootstrap 95% interval (paired over
images where both variants saw the same images, over independent samples where they did not,
e.g. natural and adversarial path pairs), the verdict, and the seed report's own number where
it gives one.

The headline verdict is the mean's (:data:`HEADLINE`): the seed report states means, and the
colour-flip claims compare proportions, which only a mean measures (the median of 0/1 flips is 0
or 1). The median's effect and verdict stay in every row as a check against a few extreme images.

For the forest plot every claim's mean effect is also put on one scale: divided by the pooled
standard deviation of its two groups (Cohen's d with the average-variance denominator), its
interval divided by the same number, so the interval keeps its sign and its verdict.

Path pairs are counted once: the Figure 5-6 and 7-8 sections search the first pairs of Table 2's
section again, and a pair (model, type, index, endpoints) seen in two results is one sample.

Verdicts (:mod:`robustness.stats`): a claim that predicts a sign *holds* when the whole
interval has that sign, *does not hold* when the whole interval has the other sign, and is
*inconclusive* when it contains 0. The one claim of equality (Figure 9: colour changes flip the
robust models as often as the base model) holds when the interval of the difference in flip
rates lies within +-``FLIP_RATE_MARGIN``, fixed here before any run. A claim whose probe or
variant is missing from the results is *not measured*. Nothing here is tuned to a result.

What is read from each probe (the other probes' owners keep these names):

* ``boundary_plane``: ``{variant}/per_image/curvature`` (one value per image, same images for all);
* ``random_plane``: ``{variant}/per_image/area_fraction``;
* ``table1`` (else ``hessian_norm`` and ``min_perturbation``): ``{variant}/fro2`` and ``{variant}/norm``;
* ``path_connectivity``: ``tables["pairs"]`` rows (``model``, ``pair_type``, ``success``, ``points``,
  ``deviation``) and, for the explained variance, ``{variant}/{pair_type}/pair_explained_variance_ratio``
  (one row per successful path) when present, else the one figure path's
  ``{variant}/{pair_type}/explained_variance_ratio``;
* ``perceptual``: ``{variant}/correct`` and ``{variant}/min_angle`` (NaN where no rotation flips the image).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from robustness.errors import InputError
from robustness.stats import STATISTICS, all_hold, bootstrap_difference, equivalence_verdict, ordering, verdict
from robustness.probes.base import ProbeResult

# Figure 9's claim is one of equality: flip rates within 10 percentage points count as "as often".
FLIP_RATE_MARGIN = 0.10
NOT_MEASURED = "not measured"
# The statistic whose verdict a row's ``verdict`` is (see the module docstring for why the mean).
HEADLINE = "mean"
HEADLINE_RULE = (
    "A claim's verdict is that of the mean: the seed report states means, and the colour-flip claims compare "
    "proportions, which only a mean measures. The median's effect and verdict are kept beside it as a check "
    "against a few extreme images."
)
# What makes a path pair one sample: sections that reuse the same pairs give the same values here.
PAIR_IDENTITY = ("model", "pair_type", "pair", "start_index", "end_index", "start_class", "end_class", "class")

# Values of one claim: (values under a, values under b, paired?, what the items are), or None
# with the reason when the results lack them.
Values = tuple[np.ndarray, np.ndarray, bool, str]
Extractor = Callable[[Sequence[ProbeResult], str, str], "Values | str"]


@dataclass(frozen=True)
class Claim:
    """One claim: ``statistic(b) - statistic(a)`` of ``measure`` should have ``expected_sign`` (None: be about 0)."""

    source: str
    text: str
    measure: str
    a: str
    b: str
    expected_sign: int | None
    extract: Extractor
    seed_report: str = ""


def _array(result: ProbeResult, key: str) -> np.ndarray | None:
    value = result.arrays.get(key)
    return None if value is None else np.asarray(value.double() if hasattr(value, "double") else value, dtype=np.float64)


def _find(results: Sequence[ProbeResult], key: str) -> tuple[ProbeResult, np.ndarray] | None:
    for result in results:
        values = _array(result, key)
        if values is not None:
            return result, values
    return None


def _per_image_pair(key: str, transform: Callable[[np.ndarray], np.ndarray] = lambda v: v) -> Extractor:
    """Paired per-image values ``{variant}/<key>`` of both variants, from one result or two results on the same images."""

    def extract(results: Sequence[ProbeResult], a: str, b: str) -> Values | str:
        found_a, found_b = _find(results, f"{a}/{key}"), _find(results, f"{b}/{key}")
        missing = [v for v, f in ((a, found_a), (b, found_b)) if f is None]
        if missing:
            return f"no per-image {key} for {', '.join(missing)}"
        (result_a, values_a), (result_b, values_b) = found_a, found_b  # type: ignore[misc]
        if result_a is not result_b and not _same_images(result_a, result_b):
            return f"{a} and {b} were measured on different images"
        if values_a.shape != values_b.shape:
            return f"{a} and {b} have {len(values_a)} and {len(values_b)} images"
        return transform(values_a), transform(values_b), True, "images"

    return extract


def _same_images(first: ProbeResult, second: ProbeResult) -> bool:
    keys = ("dataset", "split", "num_images", "direction_seed", "stats_resolution", "extent")
    if any(first.meta.get(k) != second.meta.get(k) for k in keys):
        return False
    labels = [r.arrays.get("per_image/label", r.arrays.get("labels")) for r in (first, second)]
    return all(label is not None for label in labels) and np.array_equal(np.asarray(labels[0]), np.asarray(labels[1]))


def unique_pairs(results: Sequence[ProbeResult], model: str) -> list[tuple[dict[str, Any], np.ndarray | None]]:
    """Each path pair of ``model`` once, with its path's explained-variance ratios (None where not saved).

    A pair is its :data:`PAIR_IDENTITY`; the result with the most pairs is read first, and a later
    result adds only the pairs it has not seen. The ratios of a result's successful paths are its
    ``{model}/{pair_type}/pair_explained_variance_ratio`` rows, in the order of those paths.
    """
    seen: dict[tuple[Any, ...], tuple[dict[str, Any], np.ndarray | None]] = {}
    for result in sorted(results, key=lambda r: -len(r.tables.get("pairs", []))):
        rows = [row for row in result.tables.get("pairs", []) if row.get("model") == model]
        ratios: dict[int, np.ndarray] = {}
        for pair_type in dict.fromkeys(row.get("pair_type") for row in rows):
            successful = [i for i, row in enumerate(rows) if row.get("pair_type") == pair_type and row.get("success")]
            per_path = _array(result, f"{model}/{pair_type}/pair_explained_variance_ratio")
            if per_path is not None and len(per_path) == len(successful):
                ratios.update(zip(successful, np.atleast_2d(per_path)))
        for i, row in enumerate(rows):
            seen.setdefault(tuple(row.get(key) for key in PAIR_IDENTITY), (row, ratios.get(i)))
    return list(seen.values())


def _path_pairs(measure: str) -> Extractor:
    """Per successful path, ``measure`` for natural (a) and adversarial (b) pairs of one model (unpaired), each pair once."""

    def extract(results: Sequence[ProbeResult], a: str, b: str) -> Values | str:
        model = _model_of(a)
        rows = [row for row, _ in unique_pairs(results, model)]
        if not rows:
            return f"no path pairs for model {model}"
        groups = []
        for pair_type in (_type_of(a), _type_of(b)):
            values = [float(row[measure]) for row in rows if row.get("pair_type") == pair_type and row.get("success")]
            if not values:
                return f"no successful {pair_type} path for model {model}"
            groups.append(np.asarray(values, dtype=np.float64))
        return groups[0], groups[1], False, "paths"

    return extract


def _first_component_share(results: Sequence[ProbeResult], a: str, b: str) -> Values | str:
    """Share of a path's variance in its first principal component (smaller: variance decays more slowly)."""
    groups = []
    for side in (a, b):
        model, pair_type = _model_of(side), _type_of(side)
        paths = [(row, ratio) for row, ratio in unique_pairs(results, model) if row.get("pair_type") == pair_type and row.get("success")]
        if paths and all(ratio is not None for _, ratio in paths):
            groups.append(np.asarray([ratio[0] for _, ratio in paths], dtype=np.float64))
            continue
        one = _find(results, f"{model}/{pair_type}/explained_variance_ratio")
        if one is None:
            return f"no explained variance for {model}'s {pair_type} paths"
        groups.append(one[1][:1])
    return groups[0], groups[1], False, "paths"


def _flips(results: Sequence[ProbeResult], a: str, b: str) -> Values | str:
    """Per image correctly classified by both models: 1 if some hue rotation flips its label, else 0."""
    # Only the hue sweep searches each image's smallest flipping rotation; a Figure 9 section
    # alone leaves it NaN for every image, which would read as "never flips".
    swept = [result for result in results if "sweep" in result.meta.get("items", ("sweep",))]
    if not swept:
        return "no hue sweep result (the perceptual_sweep section measures the flips)"
    arrays = {}
    for variant in (a, b):
        correct, angle = _find(swept, f"{variant}/correct"), _find(swept, f"{variant}/min_angle")
        if correct is None or angle is None:
            return f"no colour flips for {variant}"
        arrays[variant] = (correct[1].astype(bool), np.isfinite(angle[1]).astype(np.float64))
    (correct_a, flip_a), (correct_b, flip_b) = arrays[a], arrays[b]
    if correct_a.shape != correct_b.shape:
        return f"{a} and {b} were measured on different images"
    both = correct_a & correct_b
    nan = np.full(both.shape, np.nan)
    return np.where(both, flip_a, nan), np.where(both, flip_b, nan), True, "images correct under both"


def _model_of(side: str) -> str:
    return side.split(":")[0]


def _type_of(side: str) -> str:
    return side.split(":")[1]


# The probes each claim reads, in order of preference.
_SOURCES = {
    "curvature": ("boundary_plane",),
    "area": ("random_plane",),
    "fro2": ("table1", "hessian_norm"),
    "norm": ("table1", "min_perturbation"),
    "paths": ("path_connectivity",),
    "flips": ("perceptual",),
}


def claims(path_models: Sequence[str] = ("base",)) -> list[tuple[str, Claim]]:
    """Every claim of the seed report, with the probe family it reads."""
    abs_curvature = _per_image_pair("per_image/curvature", np.abs)
    area = _per_image_pair("per_image/area_fraction")
    fro2, norm = _per_image_pair("fro2"), _per_image_pair("norm")
    out: list[tuple[str, Claim]] = [
        ("curvature", Claim("Figure 2", "adversarial training flattens the boundary near samples", "|curvature| (1/l2)", "base", "adversarial", -1, abs_curvature)),
        ("area", Claim("Figure 3", "regions around samples are wider for the adversarial model", "area fraction of the sample's class", "base", "adversarial", +1, area)),
        ("curvature", Claim("Figure 4", "CURE flattens the boundary more than adversarial training", "|curvature| (1/l2)", "adversarial", "cure", -1, abs_curvature)),
        ("area", Claim("Figure 4", "CURE makes regions more uniform than adversarial training", "area fraction of the sample's class", "adversarial", "cure", +1, area)),
        ("fro2", Claim("Table 1", "adversarial training lowers ‖H‖_F²", "‖H‖_F²", "base", "adversarial", -1, fro2, "5.5 → 1.1")),
        ("fro2", Claim("Table 1", "CURE lowers ‖H‖_F² below adversarial training", "‖H‖_F²", "adversarial", "cure", -1, fro2, "1.1 → 6.4e-4")),
        ("norm", Claim("Table 1", "adversarial training enlarges the smallest perturbation", "‖r‖₂", "base", "adversarial", +1, norm, "0.67 → 0.80")),
        ("norm", Claim("Table 1", "CURE enlarges the smallest perturbation beyond adversarial training", "‖r‖₂", "adversarial", "cure", +1, norm, "0.80 → 5.6")),
    ]
    for model in path_models:
        out += [
            ("paths", Claim("Table 2", f"adversarial pairs need more points than natural pairs ({model})", "points on the path", f"{model}:natural", f"{model}:adversarial", +1, _path_pairs("points"))),
            ("paths", Claim("Table 2", f"adversarial paths deviate more than natural ones ({model})", "normalised deviation", f"{model}:natural", f"{model}:adversarial", +1, _path_pairs("deviation"))),
            ("paths", Claim("Figures 6/8", f"explained variance decays more slowly for adversarial paths ({model})", "variance share of the first component", f"{model}:natural", f"{model}:adversarial", -1, _first_component_share)),
        ]
    out += [
        ("flips", Claim("Figure 9", "colour changes flip the adversarial model as often as the base model", "flipped by a hue rotation", "base", "adversarial", None, _flips)),
        ("flips", Claim("Figure 9", "colour changes flip the CURE model as often as the base model", "flipped by a hue rotation", "base", "cure", None, _flips)),
    ]
    return out


# Table 1's orderings, each the conjunction of two pairwise claims above.
ORDERINGS = {
    "‖H‖_F²": ("cure < adversarial < base", "5.5 / 1.1 / 6.4e-4 (base / adversarial / cure)"),
    "‖r‖₂": ("base < adversarial < cure", "0.67 / 0.80 / 5.6 (base / adversarial / cure)"),
}


def _results_for(results: Mapping[str, ProbeResult], family: str) -> list[ProbeResult]:
    for probe in _SOURCES[family]:
        found = [result for result in results.values() if result.probe == probe]
        if found:
            return found
    return []


def _row(claim: Claim, values: Values | str, seed: int) -> dict[str, Any]:
    row: dict[str, Any] = {
        "source": claim.source,
        "claim": claim.text,
        "measure": claim.measure,
        "a": claim.a,
        "b": claim.b,
        "expected": {1: "b > a", -1: "b < a", None: f"|b - a| <= {FLIP_RATE_MARGIN:g}"}[claim.expected_sign],
        "expected_sign": claim.expected_sign or 0,
        "seed_report": claim.seed_report,
    }
    if isinstance(values, str):
        return {**row, **{f"verdict_{s}": NOT_MEASURED for s in STATISTICS}, "verdict": NOT_MEASURED, "n_a": 0, "n_b": 0, "items": "", "note": values}
    a, b, paired, items = values
    notes = []
    kept_a, kept_b = (a[np.isfinite(a) & np.isfinite(b)], b[np.isfinite(a) & np.isfinite(b)]) if paired else (a[np.isfinite(a)], b[np.isfinite(b)])
    for statistic in STATISTICS:
        interval = bootstrap_difference(a, b, statistic, paired=paired, seed=seed)
        stat = np.mean if statistic == "mean" else np.median
        row.update(
            {
                f"a_{statistic}": float(stat(kept_a)) if len(kept_a) else math.nan,
                f"b_{statistic}": float(stat(kept_b)) if len(kept_b) else math.nan,
                f"effect_{statistic}": interval.estimate,
                f"low_{statistic}": interval.low,
                f"high_{statistic}": interval.high,
                f"verdict_{statistic}": verdict(interval, claim.expected_sign) if claim.expected_sign else equivalence_verdict(interval, FLIP_RATE_MARGIN),
            }
        )
        row["n_a"], row["n_b"] = interval.n_a, interval.n_b
        if not interval.defined:
            notes.append(f"no interval for the {statistic} (fewer than 2 {items} per variant)")
    row["verdict"] = row[f"verdict_{HEADLINE}"]
    row.update(standardised_effect(kept_a, kept_b, row["effect_mean"], row["low_mean"], row["high_mean"], FLIP_RATE_MARGIN if claim.expected_sign is None else None))
    if not math.isfinite(row["pooled_sd"]) or row["pooled_sd"] == 0:
        notes.append("no standardised effect (the two groups have no spread)")
    row["items"] = items + ("" if paired else " (independent samples)")
    row["note"] = "; ".join(dict.fromkeys(notes))
    return row


def pooled_sd(a: np.ndarray, b: np.ndarray) -> float:
    """The pooled standard deviation of two groups, sqrt(((n_a - 1) s_a^2 + (n_b - 1) s_b^2) / (n_a + n_b - 2)); NaN below two values in all."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    dof = len(a) + len(b) - 2
    if dof < 1:
        return math.nan
    squares = sum(float(((g - g.mean()) ** 2).sum()) for g in (a, b) if len(g))
    return math.sqrt(squares / dof)


def standardised_effect(a: np.ndarray, b: np.ndarray, effect: float, low: float, high: float, margin: float | None = None) -> dict[str, float]:
    """The mean effect and its interval over the pooled spread of the two groups (:func:`pooled_sd`).

    ``d = effect / s``, ``[low / s, high / s]``: one positive scale factor per claim, so the
    standardised interval contains 0 exactly when the raw one does. ``d_margin`` is an equivalence
    margin on the same scale (NaN for a claim that predicts a sign). All NaN when ``s`` is 0 or undefined.
    """
    spread = pooled_sd(a, b)
    usable = math.isfinite(spread) and spread > 0
    scale = (lambda value: float(value) / spread if usable and math.isfinite(value) else math.nan)
    return {
        "pooled_sd": spread,
        "d": scale(effect),
        "d_low": scale(low),
        "d_high": scale(high),
        "d_margin": scale(margin) if margin is not None else math.nan,
    }


def _ordering_rows(rows: list[dict[str, Any]], results: Mapping[str, ProbeResult]) -> list[dict[str, Any]]:
    out = []
    for measure, (expected, seed_numbers) in ORDERINGS.items():
        steps = [row for row in rows if row["source"] == "Table 1" and row["measure"] == measure]
        row: dict[str, Any] = {"source": "Table 1", "claim": f"ordering {expected}", "measure": measure, "a": "", "b": "", "expected": expected, "seed_report": seed_numbers}
        key = "fro2" if measure == "‖H‖_F²" else "norm"
        found = _results_for(results, key)
        for statistic in STATISTICS:
            row[f"verdict_{statistic}"] = all_hold([step[f"verdict_{statistic}"] for step in steps]) if all(step[f"verdict_{statistic}"] != NOT_MEASURED for step in steps) else NOT_MEASURED
            estimates = {}
            for variant in ("base", "adversarial", "cure"):
                hit = _find(found, f"{variant}/{key}")
                if hit is not None:
                    values = hit[1][np.isfinite(hit[1])]
                    estimates[variant] = float(np.mean(values) if statistic == "mean" else np.median(values)) if len(values) else math.nan
            row[f"observed_{statistic}"] = ordering(estimates) if estimates else ""
        row["verdict"] = row[f"verdict_{HEADLINE}"]
        row["note"] = "holds when both steps hold; observed_*: the variants by the statistic, smallest first"
        out.append(row)
    return out


def compute_scorecard(results: Mapping[str, ProbeResult], seed: int) -> ProbeResult:
    """One row per claim of the seed report (see the module docstring), from the results of a report's sections."""
    if not isinstance(results, Mapping) or any(not isinstance(r, ProbeResult) for r in results.values()):
        raise InputError("compute_scorecard needs a mapping of probe name -> ProbeResult", "pass the ProbeResults the report's sections produced")
    path_results = _results_for(results, "paths")
    path_models = sorted({row["model"] for result in path_results for row in result.tables.get("pairs", [])}, key=_variant_order) or ["base"]
    rows = [_row(claim, (claim.extract(found, claim.a, claim.b) if (found := _results_for(results, family)) else f"no {' or '.join(_SOURCES[family])} result"), int(seed)) for family, claim in claims(path_models)]
    rows += _ordering_rows(rows, results)
    meta = {
        "seed": int(seed),
        "probes": sorted({result.probe for result in results.values()}),
        "interval": "seeded percentile bootstrap, 95%: over images where both variants saw the same images (paired), else over each group's items",
        "flip_rate_margin": FLIP_RATE_MARGIN,
        "headline": {"statistic": HEADLINE, "rule": HEADLINE_RULE},
        "standardised": "d = effect of the mean / pooled standard deviation of the two groups; its interval is the mean's over the same number",
        "variant_styles": _variant_styles(results),
        "methods": (
            "Each claim compares a statistic (mean, and median) of one per-item measure under two variants a and b; the effect is "
            "statistic(b) - statistic(a) with a seeded percentile-bootstrap 95% interval (4000 resamples), paired over images when "
            "both variants were measured on the same images, over independent samples for path pairs. A claim that predicts a sign "
            "holds when the whole interval has that sign, does not hold when it has the other sign, and is inconclusive when it "
            f"contains 0; Figure 9's claim of equal flip rates holds when the interval lies within +-{FLIP_RATE_MARGIN:g}. "
            "Table 1's orderings hold when both of their steps hold. "
            f"{HEADLINE_RULE} Path pairs that several sections searched count once. The forest plot divides each mean effect "
            "and its interval by the pooled standard deviation of the claim's two groups (Cohen's d)."
        ),
    }
    return ProbeResult("scorecard", arrays={}, tables={"scorecard": rows}, meta=meta)


def _variant_styles(results: Mapping[str, ProbeResult]) -> dict[str, Any]:
    """Every variant's title and colour that the results recorded (the scorecard's figures use them too)."""
    styles: dict[str, Any] = {}
    for result in results.values():
        for variant, style in (result.meta.get("variant_styles") or {}).items():
            styles.setdefault(variant, style)
    return styles


def _variant_order(variant: str) -> tuple[int, str]:
    return ({"base": 0, "adversarial": 1, "cure": 2}.get(variant, 3), variant)
