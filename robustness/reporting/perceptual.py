"""Figures and tables of the ``perceptual`` probe: the report's Figure 9 and the measurements behind it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from torch import Tensor

from robustness.probes.base import ProbeResult
from robustness.reporting.base import Artefact, format_number, images_phrase, pick_columns, save_figure, variant_colour, variant_title, write_data, write_table
from robustness.registry import register

ROTATION_MEANING = "The rotation turns the YIQ chroma plane and keeps luma, hence shape, exactly."


def _region_phrase(meta: dict[str, Any]) -> str:
    return "only the pixels of each image's dominant hue are recoloured" if meta.get("region") == "dominant" else "the whole image is recoloured"


def _signed(angle: float) -> str:
    wrapped = (angle + 180.0) % 360.0 - 180.0
    return f"{wrapped:+.0f}°"


def _as_image(tensor: Tensor) -> np.ndarray:
    return tensor.detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy()


def figure9(result: ProbeResult) -> Any:
    """The chosen image and its recoloured version side by side, each model's top-k under each."""
    meta = result.meta
    names = meta["class_names"]
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.2 + 0.55 * len(meta["variants"])))
    titles = (f"original (label {meta['figure']['label']})", f"recoloured, hue {_signed(meta['figure']['angle'])}")
    for column, (ax, key, title) in enumerate(zip(axes, ("figure/original", "figure/recoloured"), titles)):
        ax.imshow(_as_image(result.arrays[key]), interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        lines = []
        for variant in meta["variants"]:
            idx, prob = result.arrays[f"figure/{variant}/top_idx"][column], result.arrays[f"figure/{variant}/top_prob"][column]
            ranked = ", ".join(f"{names[int(c)]} {float(p):.2f}" for c, p in zip(idx, prob))
            lines.append(f"{variant_title(meta, variant)}: {ranked}")
        ax.text(0.5, -0.04, "\n".join(lines), transform=ax.transAxes, ha="center", va="top", fontsize=8, linespacing=1.5)
    fig.tight_layout()
    return fig


def sweep_figure(result: ProbeResult) -> Any:
    """Flip rate and accuracy against the hue rotation, one curve per model."""
    meta = result.meta
    angles = result.arrays["angles"].double().numpy()
    closed = np.append(angles, 360.0)  # rotation by 360 is the identity: close each curve on its start
    fig, (ax_flip, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    for variant in meta["variants"]:
        flip = result.arrays[f"{variant}/flip_rate"].double().numpy()
        acc = result.arrays[f"{variant}/accuracy"].double().numpy()
        style = {"marker": "o", "markersize": 3, "label": variant_title(meta, variant), "color": variant_colour(meta, variant)}
        ax_flip.plot(closed, np.append(flip, flip[0]), **style)
        ax_acc.plot(closed, np.append(acc, acc[0]), **style)
    for ax, ylabel in ((ax_flip, "flip rate (of correctly classified)"), (ax_acc, "accuracy")):
        ax.set_xlabel("hue rotation (degrees)")
        ax.set_ylabel(ylabel)
        ax.set_xticks(np.arange(0, 361, 45))
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    ax_flip.legend(fontsize=8)
    fig.tight_layout()
    return fig


def size_figure(result: ProbeResult) -> Any:
    """Left: smallest flipping rotation per image. Right: its l2 size against the l2 attack's."""
    meta = result.meta
    fig, (ax_angle, ax_l2) = plt.subplots(1, 2, figsize=(10, 3.8))
    rng = np.random.default_rng(0)  # horizontal jitter only, so points do not hide each other
    largest = 0.0
    for position, variant in enumerate(meta["variants"]):
        angle = result.arrays[f"{variant}/min_angle"].double().abs().numpy()
        angle = angle[np.isfinite(angle)]
        ax_angle.scatter(position + rng.uniform(-0.15, 0.15, len(angle)), angle, s=8, alpha=0.6, color=variant_colour(meta, variant))
        if len(angle):
            ax_angle.hlines(np.median(angle), position - 0.3, position + 0.3, color="black")
        colour = result.arrays[f"{variant}/colour_l2"].double().numpy()
        attack = result.arrays[f"{variant}/l2_attack_norm"].double().numpy()
        both = np.isfinite(colour) & np.isfinite(attack)
        ax_l2.scatter(attack[both], colour[both], s=10, alpha=0.6, label=variant_title(meta, variant), color=variant_colour(meta, variant))
        if both.any():
            largest = max(largest, float(colour[both].max()), float(attack[both].max()))
    ax_angle.set_xticks(range(len(meta["variants"])), [variant_title(meta, v) for v in meta["variants"]], fontsize=8)
    ax_angle.set_ylabel("|smallest flipping hue rotation| (degrees)")
    ax_angle.set_title("bar: median", fontsize=9)
    if largest > 0:
        ax_l2.plot([0, largest], [0, largest], color="grey", linestyle="--", linewidth=1, label="equal l2")
    ax_l2.set_xlabel(f"l2 of the smallest l2 perturbation ({(meta.get('l2_attack') or 'none').split('(')[0]})")
    ax_l2.set_ylabel("l2 of the smallest flipping recolouring")
    ax_l2.legend(fontsize=8)
    ax_l2.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _number(value: Any) -> Any:
    return "–" if isinstance(value, float) and math.isnan(value) else value


def probed_images_phrase(meta: dict[str, Any]) -> str:
    """Which images were probed: the whole split, or its first ``num_images``."""
    if meta.get("whole_split"):
        dataset = f" of {meta['dataset']}" if meta.get("dataset") else ""
        return f"all {meta['num_images']} {meta.get('split', 'test')} images{dataset}"
    return images_phrase(meta)


def _figure9_artefacts(result: ProbeResult, out_dir: Path, images: str, where: str) -> list[Artefact]:
    meta = result.meta
    fig_meta = meta["figure"]
    return [
        save_figure(
            figure9(result), out_dir, "fig9_perceptual",
            f"Reproduces Figure 9 of the report (perceptual attack): {meta.get('split', 'test')} image {fig_meta['index']} "
            f"(label {fig_meta['label']}), chosen among {images} as correctly classified by every model, and the same image "
            f"with its hue rotated by {_signed(fig_meta['angle'])} ({where}; luma, hence shape, kept exactly), under each "
            f"every model's top classes with their probabilities. The rotation fools {fig_meta['models_fooled']} of "
            f"{len(meta['variants'])} models.",
        ),
        write_table(
            result.tables["fig9_top_k"], out_dir, "fig9_top_k",
            f"Each model's top classes and probabilities on the original and the recoloured image of Figure 9, "
            f"chosen among {images} ({where}).",
            shown=_top_k_by_model(result),
        ),
    ]


def _top_k_by_model(result: ProbeResult) -> list[dict[str, Any]]:
    """The long top-k list pivoted: one row per model, its ranked classes on each image in one cell."""
    cells: dict[str, dict[str, list[str]]] = {}
    for row in sorted(result.tables["fig9_top_k"], key=lambda r: int(r["rank"])):
        image = cells.setdefault(row["variant"], {}).setdefault(f"top classes, {row['image']} image", [])
        image.append(f"{row['class']} ({format_number(float(row['probability']))})")
    return [{"Model": variant_title(result.meta, variant), **{column: ", ".join(ranked) for column, ranked in images.items()}} for variant, images in cells.items()]


def _sweep_artefacts(result: ProbeResult, out_dir: Path, images: str, where: str) -> list[Artefact]:
    meta = result.meta
    l2_attack = meta.get("l2_attack")
    compared = (
        f"the smallest l2 perturbation found by {l2_attack} for the same image" if l2_attack
        else "nothing: the l2 comparison was skipped (probe.l2_attack=null)"
    )
    sizes_meaning = (
        f"the l2 sizes are means over the images where both a flipping rotation and a {l2_attack} perturbation were found "
        "(ratio = recolouring / l2 attack)" if l2_attack else "the l2 comparison was skipped (probe.l2_attack=null)"
    )
    artefacts = [
        save_figure(
            sweep_figure(result), out_dir, "perceptual_sweep",
            f"Beyond the report's single Figure 9 example: over {images}, the flip rate (share of the correctly "
            f"classified images whose label changes) and the accuracy at every {meta['angle_step']:g}° of hue rotation "
            f"({where}). {ROTATION_MEANING}",
        ),
        save_figure(
            size_figure(result), out_dir, "perceptual_sizes",
            f"Left: over {images}, per correctly classified image, the smallest hue rotation that changes its label "
            f"(scan every {meta['search']['step']:g}°, then bisection to {meta['search']['tol']:g}°). Right: the l2 size "
            f"of that recolouring against {compared}; points above the dashed line are l2-larger changes that keep the "
            "image's shape.",
        ),
    ]
    summary = [
        {
            "Model": variant_title(meta, row["variant"]),
            "accuracy": row["accuracy"],
            "correct": row["correct"],
            "flip rate (mean over angles)": row["flip_rate_mean"],
            "flip rate (max)": row["flip_rate_max"],
            "at angle": _signed(row["angle_of_max"]),
            "flipped by some rotation": row["flipped_by_rotation"],
            "median smallest angle (abs, °)": _number(row["min_angle_median"]),
            "images compared": row["compared"],
            "recolouring l2 (mean)": _number(row["colour_l2_mean"]),
            "l2 attack l2 (mean)": _number(row["l2_attack_mean"]),
            "ratio": _number(row["l2_ratio"]),
            f"{row['attack']} attack success": row["attack_success_rate"],
            f"{row['attack']} attack l2 (mean)": _number(row["attack_l2_mean"]),
        }
        for row in result.tables["perceptual_summary"]
    ]
    on_screen = ["Model", "accuracy", "flip rate (mean over angles)", "flip rate (max)", "at angle", "flipped by some rotation", "median smallest angle (abs, °)", "ratio"]
    artefacts.append(write_table(
        summary, out_dir, "perceptual_summary",
        f"Colour robustness over {images} ({where}): flip rates count the images correctly classified unrotated, and "
        f"{sizes_meaning}. The {meta['attack']} attack runs on the correctly classified images.",
        shown=pick_columns(summary, on_screen),
    ))
    angles = [float(a) for a in result.arrays["angles"]]
    by_angle: dict[float, dict[str, Any]] = {a: {"hue rotation (°)": a} for a in angles}
    for row in result.tables["perceptual_sweep"]:
        by_angle[float(row["angle"])][f"{variant_title(meta, row['variant'])} flip rate"] = _number(row["flip_rate"])
        by_angle[float(row["angle"])][f"{variant_title(meta, row['variant'])} accuracy"] = row["accuracy"]
    # A per-angle list is the sweep figure's data: linked from the figure, not printed under it.
    artefacts[0].paths += write_data(
        list(by_angle.values()), out_dir, "perceptual_sweep",
        f"Flip rate and accuracy per hue rotation over {images} ({where}); the data of the perceptual_sweep figure.",
    )
    return artefacts


@register("reporter", "perceptual")
def draw(result: ProbeResult, out_dir: Path) -> list[Artefact]:
    """Only the probe's ``items``: Figure 9 and its top-k table, and/or the hue sweep's figures and tables."""
    images = probed_images_phrase(result.meta)
    where = _region_phrase(result.meta)
    items = result.meta.get("items", ["figure9", "sweep"])
    artefacts = []
    if "figure9" in items:
        artefacts += _figure9_artefacts(result, out_dir, images, where)
    if "sweep" in items:
        artefacts += _sweep_artefacts(result, out_dir, images, where)
    return artefacts
