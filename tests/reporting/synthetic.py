"""A reduced report without training: seeded synthetic ProbeResults of every probe, shaped as the
probes write them, drawn by the real reporters and rendered by the real documents.

:func:`build_report` lays out the default report's sections (plus one for the single-column
Table 1 probes, which the default report leaves out), so that every reporter, every figure and
table kind, the scorecard and its forest plot appear. Its numbers are made up; its structure is
the probes' (the tests that use it check each reporter ran).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustness.probes.base import ProbeResult
from robustness.probes.path_connectivity import table2_rows
from robustness.probes.table1 import intervals
from robustness.registry import lookup
from robustness.reporting.document import ReportHeader, Section, render_html, render_markdown
from robustness.scorecard import compute_scorecard
from robustness.stats import ordering

VARIANTS = ["base", "adversarial", "pgd", "cure"]
# As the probe stage records them from each regularizer's config; "tv" stands for a published model (no colour).
STYLES = {
    "base": {"title": "Base model", "colour": "#1f77b4"},
    "adversarial": {"title": "Adversarial training", "colour": "#d62728"},
    "pgd": {"title": "PGD training", "colour": "#ff7f0e"},
    "cure": {"title": "CURE training", "colour": "#2ca02c"},
    "tv": {"title": "tv"},
}
CLASSES = [str(c) for c in range(10)]
N_IMAGES = 40
GRID = 41


def _meta(variants: list[str], **extra: Any) -> dict[str, Any]:
    return {"variants": variants, "variant_styles": {v: STYLES[v] for v in variants}, "dataset": "digits", "split": "test", **extra}


def training_shift() -> ProbeResult:
    rows = [
        {"variant": "base", "starts_from": "random init", "clean_acc_start": math.nan, "clean_acc": 0.9978, "adv_set_acc_start": math.nan, "adv_set_acc": 0.1, "weight_change": math.nan, "epochs": 10},
        {"variant": "adversarial", "starts_from": "base", "clean_acc_start": 0.9978, "clean_acc": 0.9911, "adv_set_acc_start": 0.1, "adv_set_acc": 0.31, "weight_change": 0.0412, "epochs": 3},
        {"variant": "pgd", "starts_from": "random init", "clean_acc_start": math.nan, "clean_acc": 0.9822, "adv_set_acc_start": math.nan, "adv_set_acc": 0.52, "weight_change": math.nan, "epochs": 10},
        {"variant": "cure", "starts_from": "random init", "clean_acc_start": math.nan, "clean_acc": 0.9644, "adv_set_acc_start": math.nan, "adv_set_acc": 0.6, "weight_change": math.nan, "epochs": -1},
    ]
    return ProbeResult("training_shift", {}, {"training_shift": rows},
                       _meta(VARIANTS, images=450, whole_split=True, adversarial_set_of="adversarial", adversarial_set_size=500))


def _grid(curvature: float, sample_class: int, other: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    coords = torch.linspace(-2.0, 2.0, GRID, dtype=torch.float64)
    boundary = 0.6 + curvature * coords ** 2
    labels = torch.where(coords[:, None] < boundary[None, :], sample_class, other)
    labels[: GRID // 6, : GRID // 5] = (sample_class + 2) % 10  # a third region in one corner
    return coords.float(), boundary.float(), labels


def boundary_plane(variants: list[str], rng: np.random.Generator) -> ProbeResult:
    arrays: dict[str, torch.Tensor] = {"per_image/label": torch.as_tensor(rng.integers(0, 10, N_IMAGES))}
    rows = []
    curvature = {"base": 0.35, "adversarial": 0.12, "pgd": 0.08, "cure": 0.05}
    for variant in variants:
        coords, boundary, labels = _grid(curvature[variant], 1, 7)
        arrays |= {f"{variant}/labels": labels, f"{variant}/coords": coords, f"{variant}/boundary": boundary,
                   f"{variant}/fit_window": coords.abs() <= 1.0, f"{variant}/coeffs": torch.tensor([0.6, 0.0, curvature[variant]])}
        per_image = rng.lognormal(np.log(curvature[variant]), 0.6, N_IMAGES) * rng.choice([-1.0, 1.0], N_IMAGES)
        arrays[f"{variant}/per_image/curvature"] = torch.as_tensor(per_image)
        rows.append({"variant": variant, "sample_class": "1", "attack": "deepfool", "attack_success": True, "attack_distance": 0.62,
                     "boundary_distance": 0.6, "curvature": 2 * curvature[variant], "curvature_x_distance": 1.2 * curvature[variant],
                     "slope": 0.001, "fit_rmse": 0.004, "fit_columns": 21})
    meta = _meta(variants, class_names=CLASSES, sample_index=0, true_label=1, direction_seed=0, resolution=GRID, extent=2.0,
                 stats_resolution=31, attack={"name": "deepfool"}, half_width=1.66, num_images=N_IMAGES,
                 methods="The deepfool attack moves the sample out of its predicted class; synthetic numbers for the reporting tests.")
    return ProbeResult("boundary_plane", arrays, {"curvature": rows}, meta)


def random_plane(variants: list[str], rng: np.random.Generator, labels_from: ProbeResult | None = None) -> ProbeResult:
    coords, _, _ = _grid(0.0, 1, 7)
    arrays: dict[str, torch.Tensor] = {"coords": coords, "per_image/label": (labels_from.arrays["per_image/label"] if labels_from else torch.as_tensor(rng.integers(0, 10, N_IMAGES)))}
    share = {"base": 0.45, "adversarial": 0.7, "pgd": 0.72, "cure": 0.85}
    rows = []
    for variant in variants:
        arrays[f"{variant}/labels"] = _grid(0.6 * (1 - share[variant]), 1, 4)[2]
        arrays[f"{variant}/per_image/area_fraction"] = torch.as_tensor(np.clip(rng.normal(share[variant], 0.15, N_IMAGES), 0, 1))
        rows.append({"variant": variant, "sample_class": "1", "num_classes": 3, "area_fraction": share[variant]})
    meta = _meta(variants, class_names=CLASSES, sample_index=0, true_label=1, direction_seed=0, resolution=GRID, extent=1.0,
                 stats_resolution=31, half_width=4.21, num_images=N_IMAGES, methods="Two orthonormal Gaussian directions from seed 0 (synthetic).")
    return ProbeResult("random_plane", arrays, {"regions": rows}, meta)


def _fro2_norm(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    level = {"base": (5.5, 0.67), "adversarial": (1.1, 0.8), "pgd": (0.9, 0.95), "cure": (1.3, 1.4)}
    return {v: (rng.lognormal(np.log(f), 0.5, N_IMAGES), rng.lognormal(np.log(r), 0.2, N_IMAGES)) for v, (f, r) in level.items()}


def table1(values: dict[str, tuple[np.ndarray, np.ndarray]]) -> ProbeResult:
    arrays: dict[str, torch.Tensor] = {"labels": torch.zeros(N_IMAGES, dtype=torch.long)}
    rows = []
    for variant, (fro2, norm) in values.items():
        norm = norm.copy()
        norm[-1] = math.nan  # one image where the attack failed
        arrays |= {f"{variant}/fro2": torch.as_tensor(fro2), f"{variant}/norm": torch.as_tensor(norm)}
        rows.append({"variant": variant, **intervals("fro2", torch.as_tensor(fro2), 0), "fro2_stderr": float(fro2.std(ddof=1) / math.sqrt(len(fro2))),
                     **intervals("norm", torch.as_tensor(norm), 0), "norm_stderr": float(np.nanstd(norm, ddof=1) / math.sqrt(len(norm) - 1)),
                     "relative_mean": float(np.nanmean(norm) / 4.2), "found": N_IMAGES - 1, "accuracy": 0.99, "images": N_IMAGES})
    order = [{"measure": m, "statistic": s, "ordering": ordering({r["variant"]: r[f"{m}_{s}"] for r in rows})} for m in ("fro2", "norm") for s in ("mean", "median")]
    meta = _meta(list(values), estimator="exact", num_samples=8, hessian_method="8 Gaussian v per image, exact Hessian-vector products",
                 attack="deepfool (synthetic)", num_images=N_IMAGES, seed=0, interval="seeded percentile bootstrap over images, 95%")
    return ProbeResult("table1", arrays, {"table1": rows, "ordering": order}, meta)


def hessian_norm(values: dict[str, tuple[np.ndarray, np.ndarray]]) -> ProbeResult:
    rows = [{"variant": v, "fro2_mean": float(f.mean()), "fro2_stderr": float(f.std(ddof=1) / math.sqrt(len(f))), "fro2_median": float(np.median(f)),
             "mc_stderr_mean": 0.01, "accuracy": 0.99, "images": N_IMAGES} for v, (f, _) in values.items()]
    arrays = {f"{v}/fro2": torch.as_tensor(f) for v, (f, _) in values.items()}
    return ProbeResult("hessian_norm", arrays, {"hessian_norm": rows},
                       _meta(list(values), method="8 Gaussian v per image", estimator="exact", num_samples=8, num_images=N_IMAGES))


def min_perturbation(values: dict[str, tuple[np.ndarray, np.ndarray]]) -> ProbeResult:
    rows = [{"variant": v, "norm_mean": float(r.mean()), "norm_stderr": float(r.std(ddof=1) / math.sqrt(len(r))), "relative_mean": float(r.mean() / 4.2),
             "relative_stderr": 0.002, "found": N_IMAGES, "images": N_IMAGES, "accuracy": 0.99} for v, (_, r) in values.items()]
    arrays = {f"{v}/norm": torch.as_tensor(r) for v, (_, r) in values.items()}
    return ProbeResult("min_perturbation", arrays, {"min_perturbation": rows}, _meta(list(values), attack="deepfool (synthetic)", num_images=N_IMAGES))


def curvature_profile(rng: np.random.Generator) -> ProbeResult:
    k, arrays, rows = 6, {}, []
    for variant, top in zip(VARIANTS, (4.0, 0.9, 0.7, 0.05)):
        values = -np.sort(-np.abs(rng.normal(top, top / 4, (8, k))) * np.geomspace(1, 0.05, k), axis=1)
        values[:, -1] *= -1  # a negative eigenvalue, as finite differences give
        arrays[f"{variant}/eigenvalues"] = torch.as_tensor(values)
        rows.append({"variant": variant, "lambda_1": float(values[:, 0].mean()), "lambda_k": float(values[:, -1].mean()), "k": k,
                     "sum_lambda_sq": float((values ** 2).sum(1).mean()), "accuracy": 0.99, "images": 8})
    return ProbeResult("curvature_profile", arrays, {"curvature_profile": rows},
                       _meta(VARIANTS, estimator="exact", method="Lanczos, 12 iterations per image", num_images=8, seed=0))


def robust_accuracy() -> ProbeResult:
    eps = [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3]
    rows = []
    for variant, clean, decay in zip(VARIANTS + ["tv"], (0.9978, 0.9911, 0.9822, 0.9644, 0.95), (18.0, 9.0, 4.0, 5.0, 12.0)):
        for attack, factor in (("pgd_linf", 1.0), ("autoattack", 1.15)):
            rows += [{"variant": variant, "attack": attack, "eps": e, "clean_acc": clean, "robust_acc": clean * math.exp(-decay * factor * e)} for e in eps]
    meta = _meta(VARIANTS + ["tv"], attack={"name": "pgd_linf"}, attack_kind="fixed-epsilon", norm="linf", attacks={"pgd_linf": {}, "autoattack": {}},
                 n_images=60, eps=eps)
    return ProbeResult("robust_accuracy", {"eps": torch.tensor(eps)}, {"robust_accuracy": rows}, meta)


def _pairs(variant: str, pair_type: str, count: int, rng: np.random.Generator, failed: set[int]) -> list[dict[str, Any]]:
    rows = []
    for i in range(count):
        ok = i not in failed
        points = int(rng.integers(2, 5) if pair_type == "natural" else rng.integers(4, 12))
        rows.append({"model": variant, "pair_type": pair_type, "pair": i, "class": i % 10, "class_name": str(i % 10), "start_index": 2 * i,
                     "end_index": 2 * i + 1, "start_class": i % 10, "end_class": (i + 3) % 10, "check": "certified",
                     "status": "certified" if ok else "failed", "success": ok, "reason": "" if ok else "1 segment(s) over probe.max_pieces",
                     "points": points if ok else math.nan, "deviation": (1e-3 if pair_type == "natural" else 0.02) * points * rng.uniform(0.5, 1.5) if ok else math.nan,
                     "length_ratio": 1.01 if ok else math.nan, "depth": 3, "evaluations": 410, "pieces": 90, "bound_checks": 12, "seconds": 0.4})
    return rows


def path_connectivity(pair_types: list[str], counts: dict[str, int], draw: list[str], rng: np.random.Generator) -> ProbeResult:
    variants = ["base", "cure"]
    pairs: list[dict[str, Any]] = []
    arrays: dict[str, torch.Tensor] = {}
    figure_paths: dict[str, dict[str, Any]] = {}
    for variant in variants:
        for pair_type in pair_types:
            rows = _pairs(variant, pair_type, counts[pair_type], rng, {4} if pair_type == "adversarial" else set())
            pairs += rows
            ok = [r for r in rows if r["success"]]
            ratios = np.sort(rng.dirichlet(np.full(10, 0.4), len(ok)), axis=1)[:, ::-1].copy()
            arrays[f"{variant}/{pair_type}/pair_explained_variance_ratio"] = torch.as_tensor(ratios)
            chosen = max(ok, key=lambda r: (r["deviation"], r["points"]))
            t = np.linspace(0, 1, 100)
            arrays[f"{variant}/{pair_type}/projection"] = torch.as_tensor(np.column_stack([t, 0.1 * np.sin(3 * t), 0.05 * np.cos(5 * t)]))
            arrays[f"{variant}/{pair_type}/vertex_projection"] = torch.as_tensor(np.column_stack([t[::20], 0.1 * np.sin(3 * t[::20]), 0.05 * np.cos(5 * t[::20])]))
            arrays[f"{variant}/{pair_type}/explained_variance_ratio"] = torch.as_tensor(ratios[ok.index(chosen)])
            figure_paths.setdefault(variant, {})[pair_type] = {k: chosen[k] for k in ("pair", "class", "class_name", "points", "deviation")}
    meta = _meta(variants, pair_types=pair_types, options={"draw": draw}, figure_paths=figure_paths, seed=0)
    return ProbeResult("path_connectivity", arrays, {"pairs": pairs, "table2": table2_rows(pairs)}, meta)


def perceptual(items: list[str], rng: np.random.Generator) -> ProbeResult:
    variants = VARIANTS
    angles = torch.arange(0.0, 360.0, 30.0)
    arrays: dict[str, torch.Tensor] = {"angles": angles, "labels": torch.zeros(N_IMAGES, dtype=torch.long)}
    image = torch.zeros(3, 8, 8)
    image[0, 2:6, 2:6] = 1.0
    arrays["figure/original"], arrays["figure/recoloured"] = image, image.roll(1, dims=0)
    top_rows, summary = [], []
    for n, variant in enumerate(variants):
        flips = rng.uniform(0, 0.4 - 0.08 * n, len(angles))
        flips[0] = 0.0
        arrays[f"{variant}/flip_rate"], arrays[f"{variant}/accuracy"] = torch.as_tensor(flips), torch.as_tensor(0.99 - flips)
        correct = rng.uniform(size=N_IMAGES) < 0.95
        min_angle = np.where(rng.uniform(size=N_IMAGES) < 0.5 - 0.1 * n, rng.uniform(20, 180, N_IMAGES), np.nan)
        arrays |= {f"{variant}/correct": torch.as_tensor(correct), f"{variant}/min_angle": torch.as_tensor(min_angle),
                   f"{variant}/colour_l2": torch.as_tensor(rng.uniform(1, 3, N_IMAGES)), f"{variant}/l2_attack_norm": torch.as_tensor(rng.uniform(0.4, 1.5, N_IMAGES))}
        arrays[f"figure/{variant}/top_idx"] = torch.tensor([[1, 7, 4], [7, 1, 4]])
        arrays[f"figure/{variant}/top_prob"] = torch.tensor([[0.97, 0.02, 0.01], [0.6, 0.35, 0.05]])
        for version, classes, probs in (("original", ("1", "7", "4"), (0.97, 0.02, 0.01)), ("recoloured", ("7", "1", "4"), (0.6, 0.35, 0.05))):
            top_rows += [{"variant": variant, "image": version, "rank": r + 1, "class": c, "probability": p} for r, (c, p) in enumerate(zip(classes, probs))]
        summary.append({"variant": variant, "accuracy": 0.99, "correct": int(correct.sum()), "flip_rate_mean": float(flips[1:].mean()), "flip_rate_max": float(flips.max()),
                        "angle_of_max": float(angles[int(flips.argmax())]), "flipped_by_rotation": float(np.isfinite(min_angle).mean()),
                        "min_angle_median": float(np.nanmedian(min_angle)), "compared": 30, "colour_l2_mean": 2.0, "l2_attack_mean": 0.9, "l2_ratio": 2.2,
                        "attack": "pgd_linf", "attack_success_rate": 0.8, "attack_l2_mean": 1.1})
    sweep = [{"variant": v, "angle": float(a), "flip_rate": float(f), "accuracy": float(acc)} for v in variants
             for a, f, acc in zip(angles, arrays[f"{v}/flip_rate"], arrays[f"{v}/accuracy"])]
    tables: dict[str, list[dict[str, Any]]] = {}
    if "sweep" in items:
        tables |= {"perceptual_summary": summary, "perceptual_sweep": sweep}
    if "figure9" in items:
        tables["fig9_top_k"] = top_rows
    meta = _meta(variants, dataset="colour_digits", class_names=CLASSES, num_images=N_IMAGES, whole_split=False, items=items, region="all",
                 angle_step=30.0, search={"step": 30.0, "tol": 2.0, "max_angle": 180.0}, l2_attack="deepfool (synthetic)", attack="pgd_linf (synthetic)",
                 figure={"index": 3, "angle": 90.0, "label": "1", "models_fooled": 2}, seed=0)
    return ProbeResult("perceptual", arrays, tables, meta)


def sections_and_results(seed: int = 0) -> list[tuple[str, list[ProbeResult]]]:
    """(section title, its results), in the default report's order, plus the single-column Table 1 probes."""
    rng = np.random.default_rng(seed)
    fig2 = boundary_plane(["base", "adversarial", "pgd"], rng)
    fig3 = random_plane(["base", "adversarial", "pgd"], rng, labels_from=fig2)
    fig4 = [boundary_plane(["cure"], rng), random_plane(["cure"], rng, labels_from=fig2)]
    fig4[0].arrays["per_image/label"] = fig2.arrays["per_image/label"]
    # Figure 4's regions left unmeasured per image: its scorecard claim shows "not measured".
    del fig4[1].arrays["cure/per_image/area_fraction"]
    values = _fro2_norm(rng)
    return [
        ("How far each variant moved from the model its training started from", [training_shift()]),
        ("Figure 2 - decision boundary near a fixed image, base vs adversarially trained", [fig2]),
        ("Figure 3 - decision regions around the same image in a random plane", [fig3]),
        ("Figure 4 - the CURE model's boundary and regions", fig4),
        ("Table 1 - squared Frobenius norm of the input Hessian and minimal perturbation size", [table1(values)]),
        ("Table 1, column by column - the single-column probes", [hessian_norm(values), min_perturbation(values)]),
        ("Curvature profile - top eigenvalues of the input Hessian (CURE paper)", [curvature_profile(rng)]),
        ("Robust accuracy of every variant under attack", [robust_accuracy()]),
        ("Figures 5 and 6 - a path between two natural images of one class", [path_connectivity(["natural"], {"natural": 3}, ["figures"], np.random.default_rng(11))]),
        ("Figures 7 and 8 - a path between two adversarial images in one region", [path_connectivity(["adversarial"], {"adversarial": 3}, ["figures"], np.random.default_rng(12))]),
        ("Table 2 - complexity of paths between natural and adversarial pairs",
         [path_connectivity(["natural", "adversarial", "noise"], {"natural": 18, "adversarial": 30, "noise": 4}, ["table2"], np.random.default_rng(13))]),
        ("Figure 9 - a perceptual (colour) attack", [perceptual(["figure9"], rng)]),
        ("Hue sweep - flip rate and accuracy against hue rotation", [perceptual(["sweep"], np.random.default_rng(14))]),
    ]


HEADER = ReportHeader(
    dataset="digits",
    models=[("base", 0.9978), ("adversarial", 0.9911), ("pgd", 0.9822), ("cure", 0.9644), ("tv", None)],
    command="python -m robustness experiment=report_digits logger=csv paths.output_dir=/tmp/a/very/long/output/folder/name/that/must/wrap/somewhere",
    seconds=487.0,
    versions={"robustness": "0.1.0", "torch": "2.14.1", "lightning": "2.5", "python": "3.11"},
)


def build_report(out_dir: Path, seed: int = 0, header: ReportHeader | None = HEADER) -> tuple[Path, Path, list[Section], set[str]]:
    """Draw every synthetic result with its reporter and write report.md and report.html into ``out_dir``.

    Returns the two paths, the sections, and the names of the reporters that ran.
    """
    out_dir = Path(out_dir)
    sections: list[Section] = []
    results: dict[str, ProbeResult] = {}
    used: set[str] = set()
    for index, (title, section_results) in enumerate(sections_and_results(seed), start=1):
        folder = out_dir / f"{index:02d}"
        artefacts = []
        for n, result in enumerate(section_results):
            artefacts += lookup("reporter", result.probe)(result, folder)
            used.add(result.probe)
            results[f"{index:02d}/{n}/{result.probe}"] = result
        sections.append(Section(title=title, command=f"python -m robustness experiment=section_{index:02d}", artefacts=artefacts))
    scorecard = compute_scorecard(results, seed)
    sections.insert(0, Section("Scorecard - which of the seed report's claims hold on these models", "(computed from the sections below)",
                               artefacts=lookup("reporter", "scorecard")(scorecard, out_dir)))
    used.add("scorecard")
    md = out_dir / "report.md"
    html = out_dir / "report.html"
    md.write_text(render_markdown("Synthetic report", sections, out_dir, header), encoding="utf-8")
    html.write_text(render_html("Synthetic report", sections, out_dir, header), encoding="utf-8")
    return md, html, sections, used
