"""The geometry leaderboard: every defence side by side, from the results of a report's probes.

:func:`compute_leaderboard` takes the results a report's sections produced (keyed by anything;
a result is recognised by its ``probe`` field, as the scorecard does) and returns one row per
variant, every statistic with a seeded percentile-bootstrap 95% interval over its items:

=====================  ===================  ==============================================
column                 probe                per-item values, statistic
=====================  ===================  ==============================================
clean_acc              robust_accuracy      ``{v}/correct`` per image; mean
pgd_acc                robust_accuracy      robust at the leaderboard's eps under the main attack; mean
autoattack_acc         robust_accuracy      the same under the extra attack ``autoattack``; mean
deepfool_median        table1               ``{v}/norm``, DeepFool's ||r||_2 per image; median
fro2_mean, fro2_median table1               ``{v}/fro2``, ||H||_F^2 per image; mean, median
curvature              boundary_plane       ``|{v}/per_image/curvature|``; mean
area_fraction          random_plane         ``{v}/per_image/area_fraction``; mean
path_points            path_connectivity    points of each successful adversarial path; mean
hue_flip_rate          perceptual (sweep)   1 if a hue rotation flips a correctly classified image; mean
cost                   (measured)           step time over a plain step's per round; median
=====================  ===================  ==============================================

The robust accuracy probe keeps per-image robustness as ``{v}/robust`` (eps x images) where it
provides it; otherwise the fraction at the eps, times the number of images, gives the count of
robust images, and a 0/1 vector with that count has the per-image values' bootstrap distribution
of the mean (the same estimate; its order says nothing about which image is which, so the claim
then resamples it per variant).

:func:`curvature_claim_rows` states the claim "lower curvature goes with higher robustness across
defences" in the scorecard's row format (``robustness/scorecard.py``): the Spearman rank
correlation, across the variants, of ||H||_F^2 (its mean over images, and its median) with robust
accuracy (AutoAttack's where every variant has it, else the main attack's), with a bootstrap
interval: each resample draws the images of each probe again, the same draw for every variant
where the variants saw the same images, and recomputes every variant's statistic and the
correlation. The claim holds when the whole interval is below 0, does not hold when it is above 0,
and is inconclusive otherwise. Nothing here is tuned to a result: the measures, statistics and
rule were fixed before any leaderboard was run.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from robustness.errors import InputError
from robustness.probes.base import ProbeResult
from robustness.stats import DEFAULT_RESAMPLES, Interval, bootstrap_statistic

CLAIM = "lower curvature goes with higher robustness across defences"
NOT_MEASURED = "not measured"


@dataclass(frozen=True)
class Column:
    """One statistic of the table: its key, what the table calls it, and the statistic over items."""

    key: str
    title: str
    statistic: str


COLUMNS = (
    Column("clean_acc", "clean accuracy", "mean"),
    Column("pgd_acc", "PGD robust accuracy", "mean"),
    Column("autoattack_acc", "AutoAttack robust accuracy", "mean"),
    Column("deepfool_median", "DeepFool median ||r||_2", "median"),
    Column("fro2_mean", "||H||_F^2 mean", "mean"),
    Column("fro2_median", "||H||_F^2 median", "median"),
    Column("curvature", "boundary |curvature|", "mean"),
    Column("area_fraction", "region area fraction", "mean"),
    Column("path_points", "adversarial path points", "mean"),
    Column("hue_flip_rate", "hue flip rate", "mean"),
    Column("cost", "cost per step (x plain)", "median"),
)


def _array(result: ProbeResult, key: str) -> np.ndarray | None:
    value = result.arrays.get(key)
    if value is None:
        return None
    return np.asarray(value.double() if hasattr(value, "double") else value, dtype=np.float64)


def _of_probe(results: Mapping[str, ProbeResult], probe: str, where: Callable[[ProbeResult], bool] = lambda r: True) -> list[ProbeResult]:
    return [result for result in results.values() if result.probe == probe and where(result)]


def _first(results: Sequence[ProbeResult], key: str) -> np.ndarray | None:
    for result in results:
        values = _array(result, key)
        if values is not None:
            return values
    return None


def _eps_index(result: ProbeResult, eps: float | None) -> int | None:
    grid = [float(e) for e in result.meta.get("eps", [])]
    if not grid:
        return None
    if eps is None:
        return int(np.argmax(grid))
    matches = [i for i, e in enumerate(grid) if math.isclose(e, eps, rel_tol=1e-9, abs_tol=1e-12)]
    return matches[0] if matches else None


def robust_per_image(result: ProbeResult, prefix: str, eps: float | None) -> np.ndarray | None:
    """0/1 per image: robust at ``eps`` (default: the probe's largest) under the attack ``prefix``
    names (``{variant}`` for the main attack, ``{variant}/{attack}`` for an extra one)."""
    index = _eps_index(result, eps)
    if index is None:
        return None
    robust = _array(result, f"{prefix}/robust")
    if robust is not None:
        return np.atleast_2d(robust)[index].astype(np.float64)
    fractions = _array(result, f"{prefix}/robust_acc")
    correct = _array(result, f"{prefix}/correct")
    if fractions is None or correct is None:
        return None
    n = len(correct)
    count = int(round(float(np.atleast_1d(fractions)[index]) * n))
    return (np.arange(n) < count).astype(np.float64)


#: What the items of a robust-accuracy column are when the probe kept only the fraction: a 0/1
#: vector with the right count, whose order says nothing about which image is which.
COUNTS_ONLY = "images (counts only)"


def _autoattack_prefix(result: ProbeResult, variant: str) -> str | None:
    for label in (result.meta.get("attacks") or {}):
        if label == "autoattack" and label != (result.meta.get("attack") or {}).get("name"):
            return f"{variant}/{label}"
    if (result.meta.get("attack") or {}).get("name") == "autoattack":
        return variant
    return None


def item_values(results: Mapping[str, ProbeResult], variant: str, key: str, eps: float | None = None) -> tuple[np.ndarray, str] | str:
    """``(values per item, what the items are)`` of column ``key`` for ``variant``, or why there are none."""
    if key in ("clean_acc", "pgd_acc", "autoattack_acc"):
        found = _of_probe(results, "robust_accuracy")
        if not found:
            return "no robust_accuracy result"
        result = found[0]
        if key == "clean_acc":
            correct = _array(result, f"{variant}/correct")
            return (correct.astype(np.float64), "images") if correct is not None else f"no clean accuracy for {variant}"
        prefix = variant if key == "pgd_acc" else _autoattack_prefix(result, variant)
        if prefix is None:
            return "no AutoAttack in the robust_accuracy result"
        robust = robust_per_image(result, prefix, eps)
        if robust is None:
            return f"no robust accuracy for {variant} at eps {eps}"
        return robust, "images" if _array(result, f"{prefix}/robust") is not None else COUNTS_ONLY
    if key in ("deepfool_median", "fro2_mean", "fro2_median"):
        found = _of_probe(results, "table1") or _of_probe(results, "hessian_norm" if key.startswith("fro2") else "min_perturbation")
        values = _first(found, f"{variant}/{'norm' if key == 'deepfool_median' else 'fro2'}")
        return (values, "images") if values is not None else f"no {'||r||_2' if key == 'deepfool_median' else '||H||_F^2'} for {variant}"
    if key == "curvature":
        values = _first(_of_probe(results, "boundary_plane"), f"{variant}/per_image/curvature")
        return (np.abs(values), "images") if values is not None else f"no boundary curvature for {variant}"
    if key == "area_fraction":
        values = _first(_of_probe(results, "random_plane"), f"{variant}/per_image/area_fraction")
        return (values, "images") if values is not None else f"no region area for {variant}"
    if key == "path_points":
        rows = [row for result in _of_probe(results, "path_connectivity") for row in result.tables.get("pairs", [])
                if row.get("model") == variant and row.get("pair_type") == "adversarial" and row.get("success")]
        return (np.asarray([float(row["points"]) for row in rows]), "paths") if rows else f"no successful adversarial path for {variant}"
    if key == "hue_flip_rate":
        swept = _of_probe(results, "perceptual", lambda r: "sweep" in r.meta.get("items", ("sweep",)))
        correct, angle = _first(swept, f"{variant}/correct"), _first(swept, f"{variant}/min_angle")
        if correct is None or angle is None:
            return f"no hue sweep for {variant}"
        return np.isfinite(angle[correct.astype(bool)]).astype(np.float64), "images classified correctly"
    raise InputError(f"unknown leaderboard column '{key}'", f"choose one of: {', '.join(c.key for c in COLUMNS)}")


def compute_leaderboard(
    results: Mapping[str, ProbeResult],
    variants: Sequence[str],
    seed: int,
    *,
    eps: float | None = None,
    costs: Mapping[str, Interval] | None = None,
) -> ProbeResult:
    """One row per variant: ``<key>``, ``<key>_low``, ``<key>_high`` and ``<key>_n`` for every column
    (NaN and the reason in ``notes`` where a probe did not measure it), plus the claim's rows."""
    if not isinstance(results, Mapping) or any(not isinstance(r, ProbeResult) for r in results.values()):
        raise InputError("compute_leaderboard needs a mapping of name -> ProbeResult", "pass the ProbeResults the report's sections produced")
    if not variants:
        raise InputError("the leaderboard needs at least one variant", "list them under variants=[...]")
    rows = []
    for variant in variants:
        row: dict[str, Any] = {"variant": variant}
        notes = []
        for column in COLUMNS:
            if column.key == "cost":
                interval = (costs or {}).get(variant)
                if interval is None:
                    notes.append("cost not measured")
                items = "rounds"
            else:
                found = item_values(results, variant, column.key, eps)
                interval, items = (None, "") if isinstance(found, str) else (bootstrap_statistic(found[0], column.statistic, seed=seed), found[1])
                if isinstance(found, str):
                    notes.append(found)
            nan = math.nan
            row[column.key] = interval.estimate if interval else nan
            row[f"{column.key}_low"] = interval.low if interval else nan
            row[f"{column.key}_high"] = interval.high if interval else nan
            row[f"{column.key}_n"] = interval.n_a if interval else 0
        row["notes"] = "; ".join(dict.fromkeys(notes))
        rows.append(row)
    claim = curvature_claim_rows(results, variants, seed, eps=eps)
    styles = {name: style for result in results.values() for name, style in (result.meta.get("variant_styles") or {}).items() if name in variants}
    meta = {
        "variants": list(variants),
        "variant_styles": styles,
        "seed": int(seed),
        "eps": eps,
        "columns": {c.key: {"title": c.title, "statistic": c.statistic} for c in COLUMNS},
        "interval": "seeded percentile bootstrap, 95%, over each column's items (images, paths, or timing rounds)",
        "probes": sorted({result.probe for result in results.values()}),
        "methods": __doc__.split("\n\n")[0].replace("\n", " "),
    }
    return ProbeResult("leaderboard", arrays={}, tables={"leaderboard": rows, "claims": claim}, meta=meta)


# ------------------------------------------------------------------------------------------------
# The claim: Spearman correlation of curvature and robust accuracy across the variants


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, ties sharing their average rank (1-based)."""
    order = np.argsort(values, axis=-1, kind="stable")
    ranks = np.empty_like(values, dtype=np.float64)
    sorted_values = np.take_along_axis(values, order, axis=-1)
    positions = np.arange(1, values.shape[-1] + 1, dtype=np.float64)
    out_sorted = np.broadcast_to(positions, values.shape).copy()
    # Average the positions within each run of equal values.
    for row in np.ndindex(values.shape[:-1]):
        v, r = sorted_values[row], out_sorted[row]
        start = 0
        for end in range(1, len(v) + 1):
            if end == len(v) or v[end] != v[start]:
                r[start:end] = r[start:end].mean()
                start = end
    np.put_along_axis(ranks, order, out_sorted, axis=-1)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman's rank correlation of ``a`` and ``b`` along the last axis (the Pearson correlation
    of their average ranks); NaN where either is constant."""
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    ra = ra - ra.mean(axis=-1, keepdims=True)
    rb = rb - rb.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((ra * ra).sum(axis=-1) * (rb * rb).sum(axis=-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ra * rb).sum(axis=-1) / np.where(denominator > 0, denominator, 1.0), np.nan)


def _statistic(values: np.ndarray, statistic: str) -> np.ndarray:
    """Over the last axis, NaN items left out (a failed measurement keeps its image's place)."""
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN resample gives NaN, and is dropped
        return np.nanmean(values, axis=-1) if statistic == "mean" else np.nanmedian(values, axis=-1)


def _resampled(groups: Sequence[np.ndarray], statistic: str, paired: bool, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """(resamples, variants): each variant's statistic over a resample of its items: one draw of
    item indices shared by every variant where ``paired`` (the same images, in the same order),
    else one draw per variant, in the variants' order."""
    if paired:
        if len({len(group) for group in groups}) != 1:
            raise InputError(f"paired items need the same number per variant, got {[len(g) for g in groups]}")
        index = rng.integers(0, len(groups[0]), size=(resamples, len(groups[0])))
        return np.stack([_statistic(group[index], statistic) for group in groups], axis=1)
    return np.stack([_statistic(group[rng.integers(0, len(group), size=(resamples, len(group)))], statistic) for group in groups], axis=1)


def curvature_robustness(
    curvature: Sequence[np.ndarray],
    robust: Sequence[np.ndarray],
    statistic: str,
    *,
    seed: int,
    paired_curvature: bool = True,
    paired_robust: bool = True,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """``(rho, low, high)``: Spearman's rho across variants of ``statistic`` of each variant's
    per-image curvature (NaN: not measured) and the mean of its per-image robustness, and the
    percentile interval of rho over resamples of the images.

    Each resample draws the curvature images (one draw for all variants where
    ``paired_curvature``), then the robustness images (likewise with ``paired_robust``), from
    ``numpy.random.default_rng(seed)`` in that order. Resamples where either side is constant
    across variants (rho undefined) are left out.
    """
    curvature = [np.asarray(c, dtype=np.float64) for c in curvature]
    robust = [np.asarray(r, dtype=np.float64) for r in robust]
    rho = float(spearman(np.asarray([_statistic(c, statistic) for c in curvature]), np.asarray([_statistic(r, "mean") for r in robust])))
    rng = np.random.default_rng(int(seed))
    curvature_draws = _resampled(curvature, statistic, paired_curvature, rng, resamples)
    robust_draws = _resampled(robust, "mean", paired_robust, rng, resamples)
    draws = spearman(curvature_draws, robust_draws)
    draws = draws[np.isfinite(draws)]
    if len(draws) == 0:
        return rho, math.nan, math.nan
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(draws, [tail, 100.0 - tail])
    return rho, float(low), float(high)


def _claim_verdict(low: float, high: float) -> str:
    if not (math.isfinite(low) and math.isfinite(high)) or low <= 0.0 <= high:
        return "inconclusive"
    return "holds" if high < 0 else "does not hold"


def curvature_claim_rows(results: Mapping[str, ProbeResult], variants: Sequence[str], seed: int, *, eps: float | None = None) -> list[dict[str, Any]]:
    """The claim as one row of the scorecard's format (see the module docstring)."""
    robust_key = "autoattack_acc" if all(not isinstance(item_values(results, v, "autoattack_acc", eps), str) for v in variants) else "pgd_acc"
    attack = "AutoAttack" if robust_key == "autoattack_acc" else "PGD"
    row: dict[str, Any] = {
        "source": "Leaderboard",
        "claim": CLAIM,
        "measure": f"Spearman rho across variants of ||H||_F^2 (a) and {attack} robust accuracy (b)",
        "a": "||H||_F^2",
        "b": f"{attack} robust accuracy",
        "expected": "rho < 0",
        "seed_report": "",
    }
    curvature = [item_values(results, v, "fro2_mean", eps) for v in variants]
    robust = [item_values(results, v, robust_key, eps) for v in variants]
    missing = [found for found in (*curvature, *robust) if isinstance(found, str)]
    if missing or len(variants) < 3:
        note = "; ".join(dict.fromkeys(missing)) if missing else f"a rank correlation needs at least 3 variants, got {len(variants)}"
        return [{**row, "verdict_mean": NOT_MEASURED, "verdict_median": NOT_MEASURED, "n_a": 0, "n_b": 0, "items": "", "note": note}]
    curvature_values = [c[0] for c in curvature]  # type: ignore[index]
    robust_values = [r[0] for r in robust]  # type: ignore[index]
    paired_robust = all(r[1] == "images" for r in robust)  # type: ignore[index]
    for statistic in ("mean", "median"):
        rho, low, high = curvature_robustness(curvature_values, robust_values, statistic, seed=seed, paired_robust=paired_robust)
        row.update({f"a_{statistic}": "", f"b_{statistic}": "", f"effect_{statistic}": rho, f"low_{statistic}": low, f"high_{statistic}": high,
                    f"verdict_{statistic}": _claim_verdict(low, high)})
    row.update({"n_a": len(variants), "n_b": len(variants), "items": "variants",
                "note": f"mean and median: the statistic of ||H||_F^2 over images; every variant at its own clean accuracy ({', '.join(variants)})"
                + ("" if paired_robust else "; robust accuracy kept as counts only, so its images are resampled per variant")})
    return [row]
