"""The geometry leaderboard (robustness/leaderboard.py, robustness/reporting/leaderboard.py) on
synthetic probe results: every column is its statistic of the right per-item values with the
stats module's interval; Spearman's rho against scipy, and its bootstrap interval against a
literal re-implementation that calls scipy on every resample; the claim's verdicts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from robustness.errors import InputError
from robustness.leaderboard import COUNTS_ONLY, compute_leaderboard, curvature_claim_rows, curvature_robustness, item_values, spearman
from robustness.probes.base import ProbeResult
from robustness.registry import lookup
from robustness.reporting.scorecard import _full
from robustness.stats import Interval, bootstrap_statistic

VARIANTS = ["base", "pgd", "cure", "trades", "llr"]
EPS = [0.0, 0.1]


def _results(curvature_scale: dict[str, float], robust_acc: dict[str, float], *, per_image_robust: bool = False, seed: int = 0) -> dict[str, ProbeResult]:
    """Results of every probe the leaderboard reads, for VARIANTS: 200 robust-accuracy images, 60 Hessian images."""
    rng = np.random.default_rng(seed)
    n_images, n_hessian = 200, 60
    robust_arrays: dict[str, torch.Tensor] = {"eps": torch.tensor(EPS)}
    table1: dict[str, torch.Tensor] = {}
    boundary: dict[str, torch.Tensor] = {}
    regions: dict[str, torch.Tensor] = {}
    perceptual: dict[str, torch.Tensor] = {}
    pairs = []
    base_fro2 = rng.lognormal(0.0, 1.0, n_hessian)
    for i, variant in enumerate(VARIANTS):
        correct = torch.as_tensor(rng.random(n_images) < 0.9)
        robust = correct & torch.as_tensor(rng.random(n_images) < robust_acc[variant] / 0.9)
        for prefix, mask in ((variant, robust), (f"{variant}/autoattack", robust & torch.as_tensor(rng.random(n_images) < 0.95))):
            robust_arrays[f"{prefix}/robust_acc"] = torch.tensor([float(correct.double().mean()), float(mask.double().mean())])
            robust_arrays[f"{prefix}/correct"] = correct
            robust_arrays[f"{prefix}/distance"] = torch.full((n_images,), float("nan"))
            if per_image_robust:
                robust_arrays[f"{prefix}/robust"] = torch.stack([correct, mask])
        fro2 = torch.as_tensor(curvature_scale[variant] * base_fro2 * rng.lognormal(0.0, 0.1, n_hessian))
        fro2[i] = float("nan")  # a failed estimate keeps its image's place
        table1[f"{variant}/fro2"] = fro2
        table1[f"{variant}/norm"] = torch.as_tensor(rng.lognormal(-1.0, 0.5, n_hessian))
        boundary[f"{variant}/per_image/curvature"] = torch.as_tensor(rng.normal(0.0, 1.0 + i, 30))
        regions[f"{variant}/per_image/area_fraction"] = torch.as_tensor(rng.random(30))
        perceptual[f"{variant}/correct"] = torch.as_tensor(rng.random(40) < 0.8)
        angle = rng.uniform(-180, 180, 40)
        angle[rng.random(40) < 0.5] = np.nan
        perceptual[f"{variant}/min_angle"] = torch.as_tensor(angle)
        pairs += [{"model": variant, "pair_type": kind, "success": ok, "points": float(points)}
                  for kind in ("natural", "adversarial") for ok, points in zip(rng.random(12) < 0.8, rng.integers(2, 30, 12))]
    attack_meta = {"name": "pgd_linf", "eps": 0.1}
    return {
        "robust_accuracy": ProbeResult("robust_accuracy", robust_arrays, {}, {"eps": EPS, "attack": attack_meta, "attacks": {"pgd_linf": {}, "autoattack": {}}}),
        "table1": ProbeResult("table1", table1, {}, {}),
        "fig2": ProbeResult("boundary_plane", boundary, {}, {}),
        "fig3": ProbeResult("random_plane", regions, {}, {}),
        "paths": ProbeResult("path_connectivity", {}, {"pairs": pairs}, {}),
        "sweep": ProbeResult("perceptual", perceptual, {}, {"items": ["sweep"]}),
    }


ANTI = {"base": 30.0, "pgd": 1.0, "cure": 0.3, "trades": 3.0, "llr": 10.0}
ANTI_ACC = {"base": 0.05, "pgd": 0.55, "cure": 0.7, "trades": 0.45, "llr": 0.25}


def test_spearman_equals_scipys_with_ties_and_along_an_axis() -> None:
    rng = np.random.default_rng(4)
    for _ in range(20):
        a = rng.integers(0, 4, 9).astype(float)  # many ties
        b = rng.normal(size=9)
        assert math.isclose(float(spearman(a, b)), scipy_stats.spearmanr(a, b).statistic, rel_tol=1e-12, abs_tol=1e-12)
    batch_a, batch_b = rng.normal(size=(6, 7)), rng.integers(0, 3, (6, 7)).astype(float)
    expected = [scipy_stats.spearmanr(x, y).statistic for x, y in zip(batch_a, batch_b)]
    assert np.allclose(spearman(batch_a, batch_b), expected, rtol=1e-12, equal_nan=True)
    assert math.isnan(float(spearman(np.ones(5), np.arange(5.0))))


def _literal_interval(curvature: list[np.ndarray], robust: list[np.ndarray], statistic: str, seed: int, resamples: int, paired_robust: bool) -> tuple[float, float]:
    """The bootstrap written out with scipy: one shared draw of curvature images per resample, then
    one of robust images (per variant when unpaired), scipy's rho of the two statistics."""
    rng = np.random.default_rng(seed)
    stat = np.nanmean if statistic == "mean" else np.nanmedian
    n_c = len(curvature[0])
    c_index = rng.integers(0, n_c, size=(resamples, n_c))
    if paired_robust:
        r_index = rng.integers(0, len(robust[0]), size=(resamples, len(robust[0])))
        r_stats = np.array([[r[r_index[k]].mean() for r in robust] for k in range(resamples)])
    else:
        per_variant = [r[rng.integers(0, len(r), size=(resamples, len(r)))].mean(axis=1) for r in robust]
        r_stats = np.stack(per_variant, axis=1)
    rhos = []
    for k in range(resamples):
        c_stats = [stat(c[c_index[k]]) for c in curvature]
        rho = scipy_stats.spearmanr(c_stats, r_stats[k]).statistic
        if np.isfinite(rho):
            rhos.append(rho)
    low, high = np.percentile(rhos, [2.5, 97.5])
    return float(low), float(high)


@pytest.mark.parametrize("statistic", ["mean", "median"])
@pytest.mark.parametrize("per_image_robust", [True, False])
def test_the_claims_interval_equals_a_literal_scipy_bootstrap(statistic: str, per_image_robust: bool) -> None:
    results = _results(ANTI, ANTI_ACC, per_image_robust=per_image_robust)
    curvature = [item_values(results, v, "fro2_mean")[0] for v in VARIANTS]
    robust = [item_values(results, v, "autoattack_acc")[0] for v in VARIANTS]
    assert item_values(results, "base", "autoattack_acc")[1] == ("images" if per_image_robust else COUNTS_ONLY)
    rho, low, high = curvature_robustness(curvature, robust, statistic, seed=3, paired_robust=per_image_robust, resamples=400)
    stat = np.nanmean if statistic == "mean" else np.nanmedian
    assert math.isclose(rho, scipy_stats.spearmanr([stat(c) for c in curvature], [r.mean() for r in robust]).statistic, abs_tol=1e-12)
    expected_low, expected_high = _literal_interval(curvature, robust, statistic, 3, 400, per_image_robust)
    assert math.isclose(low, expected_low, abs_tol=1e-12) and math.isclose(high, expected_high, abs_tol=1e-12)


def test_the_claim_holds_does_not_hold_or_is_inconclusive_by_its_interval() -> None:
    results = _results(ANTI, ANTI_ACC)  # robust accuracy as counts only: resampled per variant
    holds = curvature_claim_rows(results, VARIANTS, seed=0)[0]
    curvature = [item_values(results, v, "fro2_mean")[0] for v in VARIANTS]
    robust = [item_values(results, v, "autoattack_acc")[0] for v in VARIANTS]
    assert (holds["low_mean"], holds["high_mean"]) == curvature_robustness(curvature, robust, "mean", seed=0, paired_robust=False)[1:]
    assert holds["effect_mean"] == pytest.approx(-1.0) and holds["verdict_mean"] == "holds" and holds["verdict_median"] == "holds"
    assert "AutoAttack" in holds["measure"] and holds["expected"] == "rho < 0"
    same_order = {v: 1.0 / s for v, s in ANTI.items()}  # high curvature with high robustness
    assert curvature_claim_rows(_results(same_order, ANTI_ACC), VARIANTS, seed=0)[0]["verdict_mean"] == "does not hold"
    flat = {v: 1.0 for v in VARIANTS}  # every variant alike: the ranks are noise
    noise = curvature_claim_rows(_results(flat, {v: 0.4 for v in VARIANTS}), VARIANTS, seed=0)[0]
    assert noise["verdict_mean"] == "inconclusive" and noise["low_mean"] < 0 < noise["high_mean"]
    # The row renders in the scorecard's table, and a report's scorecard states it.
    shown = _full(holds)
    assert shown["Verdict (mean)"] == "holds" and shown["Items"] == "5 variants"
    from robustness.scorecard import compute_scorecard

    board = compute_leaderboard(results, VARIANTS, seed=0)
    (stated,) = [row for row in compute_scorecard({"leaderboard": board}, 0).tables["scorecard"] if row["source"] == "Leaderboard"]
    assert stated["verdict"] == "holds" and stated["expected_sign"] == -1 and stated["d"] == pytest.approx(-1.0)
    missing = curvature_claim_rows({}, VARIANTS, seed=0)[0]
    assert missing["verdict_mean"] == "not measured" and "no robust_accuracy" in missing["note"]


def test_every_column_is_its_statistic_of_the_right_items() -> None:
    results = _results(ANTI, ANTI_ACC, per_image_robust=True)
    costs = {v: Interval("median", 1.0 + i, 0.9 + i, 1.1 + i, 7, 0, False, 0.95) for i, v in enumerate(VARIANTS)}
    board = compute_leaderboard(results, VARIANTS, seed=5, eps=0.1, costs=costs)
    rows = {row["variant"]: row for row in board.tables["leaderboard"]}
    arrays = {key: np.asarray(value) for name in ("robust_accuracy", "table1", "fig2", "fig3") for key, value in results[name].arrays.items()}
    for variant in VARIANTS:
        row = rows[variant]
        correct = arrays[f"{variant}/correct"].astype(bool)
        expected = {
            "clean_acc": (correct.astype(float), "mean"),
            "pgd_acc": (arrays[f"{variant}/robust"][1].astype(float), "mean"),
            "autoattack_acc": (arrays[f"{variant}/autoattack/robust"][1].astype(float), "mean"),
            "deepfool_median": (arrays[f"{variant}/norm"], "median"),
            "fro2_mean": (arrays[f"{variant}/fro2"], "mean"),
            "fro2_median": (arrays[f"{variant}/fro2"], "median"),
            "curvature": (np.abs(arrays[f"{variant}/per_image/curvature"]), "mean"),
            "area_fraction": (arrays[f"{variant}/per_image/area_fraction"], "mean"),
        }
        for key, (values, statistic) in expected.items():
            interval = bootstrap_statistic(values, statistic, seed=5)
            assert (row[key], row[f"{key}_low"], row[f"{key}_high"]) == (interval.estimate, interval.low, interval.high), (variant, key)
        flips = np.isfinite(results["sweep"].arrays[f"{variant}/min_angle"].numpy())[results["sweep"].arrays[f"{variant}/correct"].numpy()]
        assert row["hue_flip_rate"] == pytest.approx(flips.mean()) and row["hue_flip_rate_n"] == int(results["sweep"].arrays[f"{variant}/correct"].sum())
        points = [p["points"] for p in results["paths"].tables["pairs"] if p["model"] == variant and p["pair_type"] == "adversarial" and p["success"]]
        assert row["path_points"] == pytest.approx(np.mean(points)) and row["path_points_n"] == len(points)
        assert row["fro2_mean_n"] == int(np.isfinite(arrays[f"{variant}/fro2"]).sum())
        assert row["cost"] == costs[variant].estimate and row["cost_low"] == costs[variant].low
        assert row["clean_acc"] == pytest.approx(correct.mean()) and row["notes"] == ""


def test_robust_counts_give_the_per_image_estimate_and_interval() -> None:
    # A 0/1 vector with the right count has the per-image values' bootstrap distribution: the same
    # estimate, and endpoints within the resampling noise (a few hundredths at 200 images, 4000 draws).
    per_image = compute_leaderboard(_results(ANTI, ANTI_ACC, per_image_robust=True), VARIANTS, seed=1, eps=0.1)
    counts = compute_leaderboard(_results(ANTI, ANTI_ACC, per_image_robust=False), VARIANTS, seed=1, eps=0.1)
    for a, b in zip(per_image.tables["leaderboard"], counts.tables["leaderboard"]):
        for key in ("pgd_acc", "autoattack_acc"):
            assert a[key] == pytest.approx(b[key], abs=1e-12), key
            assert abs(a[f"{key}_low"] - b[f"{key}_low"]) <= 0.015 and abs(a[f"{key}_high"] - b[f"{key}_high"]) <= 0.015, key


def test_missing_probes_leave_nan_with_the_reason_and_bad_input_is_refused() -> None:
    results = _results(ANTI, ANTI_ACC)
    del results["paths"], results["sweep"]
    row = compute_leaderboard(results, ["base"], seed=0, eps=0.1).tables["leaderboard"][0]
    assert math.isnan(row["path_points"]) and math.isnan(row["hue_flip_rate"]) and math.isnan(row["cost"])
    assert "no successful adversarial path for base" in row["notes"] and "no hue sweep for base" in row["notes"] and "cost not measured" in row["notes"]
    assert math.isnan(compute_leaderboard(results, ["base"], seed=0, eps=0.25).tables["leaderboard"][0]["pgd_acc"])  # an eps the probe did not run
    with pytest.raises(InputError):
        compute_leaderboard({"x": "not a result"}, ["base"], seed=0)  # type: ignore[dict-item]
    with pytest.raises(InputError):
        compute_leaderboard(results, [], seed=0)


def test_the_reporter_writes_the_tables_and_the_figure(tmp_path: Path) -> None:
    board = compute_leaderboard(_results(ANTI, ANTI_ACC), VARIANTS, seed=0, eps=0.1)
    board.meta["variant_styles"] = {"base": {"title": "Base model", "colour": "#1f77b4"}}  # as the probe stage records them
    artefacts = lookup("reporter", "leaderboard")(board, tmp_path)
    assert [a.kind for a in artefacts] == ["table", "table", "figure"]
    assert all(path.is_file() for artefact in artefacts for path in artefact.paths)
    table = artefacts[0].rows
    assert [row["variant"] for row in table][0] == "Base model" and len(table) == len(VARIANTS)
    assert table[1]["clean accuracy"].count("[") == 1 and table[1]["cost per step (x plain)"] == "n/a"
    # Every statistic on screen, in two tables of at most eight columns.
    shown = {column for artefact in artefacts[:2] for column in artefact.display[0]}
    assert {c["title"] for c in board.meta["columns"].values()} <= shown
    assert all(len(artefact.display[0]) <= 8 for artefact in artefacts[:2])


def test_a_reduced_leaderboard_digits_runs_end_to_end(tmp_path: Path) -> None:
    """experiment=leaderboard_digits under debug=rehearsal, three variants (a rank correlation's
    least): every variant trained, every section probed, the leaderboard first in the report."""
    import csv

    from omegaconf import open_dict

    from helpers import compose, hydra_initialized
    from robustness.stages import run

    overrides = ["debug=rehearsal", "logger=csv", f"paths.artifacts_dir={tmp_path / 'store'}", f"paths.data_dir={tmp_path / 'data'}",
                 "variants=[base,trades,input_gradient_norm]"]
    cfg = compose("leaderboard_digits", overrides)
    with open_dict(cfg):
        cfg.report.leaderboard.cost_rounds = 2
        # AutoAttack's reference ensemble spends minutes on a barely trained model's few robust
        # images (FAB and Square run to their budgets): its first component only, here.
        cfg.report.sections.robust_accuracy.overrides = ["probe.eps=[0.0,0.1]", "probe.extra_attacks=[{name: autoattack, version: custom, attacks: [apgd-ce]}]"]
    with hydra_initialized():
        outcome = run(cfg, tmp_path / "board", overrides=overrides)
    board = tmp_path / "board"
    report = (board / "report.md").read_text()
    assert report.index("## Leaderboard") < report.index("## Robust accuracy at the recipe's budget")
    with open(board / "leaderboard.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["variant"] for row in rows] == ["Base model", "TRADES", "Input-gradient norm"]
    for row in rows:
        for column in ("clean accuracy", "PGD robust accuracy", "AutoAttack robust accuracy", "||H||_F^2 mean", "cost per step (x plain)"):
            assert row[column] != "n/a", (row["variant"], column)
    assert (board / "leaderboard_curvature_vs_robustness.png").stat().st_size > 0
    # The claim across defences is a row of the report's scorecard.
    claim = next(row for row in outcome.results["leaderboard"].tables["claims"])
    scorecard = next(a for a in outcome.artefacts if a.name == "scorecard").rows
    stated = next(row for row in scorecard if row["Source"] == "Leaderboard")
    assert stated["Claim"] == claim["claim"] == "lower curvature goes with higher robustness across defences"
    assert stated["Verdict (mean)"] == claim["verdict_mean"] in ("holds", "does not hold", "inconclusive")
