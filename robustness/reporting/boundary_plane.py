"""Figure and table of the ``boundary_plane`` probe: the report's Figure 2 (and Figure 4, left)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from robustness.probes.base import ProbeResult
from robustness.reporting.base import PANEL_INCHES, Artefact, class_legend, draw_regions, format_number, grid_colours, ordered_rows, per_image_artefact, sample_phrase, save_figure, variant_title, write_table
from robustness.registry import register

CURVATURE_COLUMNS = (
    "variant", "sample_class", "attack", "attack_success", "attack_distance", "boundary_distance",
    "curvature", "curvature_x_distance", "slope", "fit_rmse", "fit_columns",
)


@register("reporter", "boundary_plane")
def draw(result: ProbeResult, out_dir: Path) -> list[Artefact]:
    meta = result.meta
    variants: list[str] = meta["variants"]
    class_names: list[str] = meta["class_names"]
    arrays = result.arrays
    colours = grid_colours([arrays[f"{variant}/labels"] for variant in variants])
    rows_by_variant = {row["variant"]: row for row in result.tables["curvature"]}
    attack = meta["attack"].get("name", "attack")

    fig, axes = plt.subplots(1, len(variants), figsize=(PANEL_INCHES * len(variants), PANEL_INCHES + 0.4), squeeze=False, sharex=True, sharey=True)
    for ax, variant in zip(axes[0], variants):
        coords = np.asarray(arrays[f"{variant}/coords"], dtype=float)
        boundary = np.asarray(arrays[f"{variant}/boundary"], dtype=float)
        window = np.asarray(arrays[f"{variant}/fit_window"], dtype=bool)
        c0, c1, c2 = np.asarray(arrays[f"{variant}/coeffs"], dtype=float)
        row = rows_by_variant[variant]

        draw_regions(ax, arrays[f"{variant}/labels"], coords, colours)
        ax.plot(coords, boundary, color="black", linewidth=1.0, label="boundary")
        if math.isfinite(row["curvature"]):
            s = coords[window]
            s = np.linspace(s.min(), s.max(), 200)
            ax.plot(s, c0 + c1 * s + c2 * s * s, color="red", linestyle="--", linewidth=1.5, label="quadratic fit")
        ax.plot([0.0], [0.0], marker="*", markersize=12, color="white", markeredgecolor="black", linestyle="none", label="sample")
        ax.plot([0.0], [row["attack_distance"]], marker="X", markersize=8, color="white", markeredgecolor="black", linestyle="none", label=attack)
        ax.set_xlim(coords[0], coords[-1])
        ax.set_ylim(coords[0], coords[-1])
        ax.set_title(f"{variant_title(meta, variant)}: curvature {format_number(row['curvature'])}, d = {format_number(row['attack_distance'])}", fontsize="medium")
        ax.set_xlabel("random direction (l2)")
    axes[0][0].set_ylabel(f"{attack} direction (l2)")
    axes[0][-1].legend(loc="lower right", fontsize="x-small", framealpha=0.8)
    class_legend(fig, colours, class_names)
    fig.tight_layout()

    sample = sample_phrase(meta, class_names)
    methods = meta.get("methods", "")
    scale = f"{meta['half_width']:.3g}" if "half_width" in meta else f"{meta['extent']:g} d"
    figure = save_figure(
        fig,
        out_dir,
        "boundary_plane",
        f"Decision boundary near {sample} in the plane of the {attack} direction (vertical) and a random orthogonal direction "
        f"(horizontal), every panel on the same square of half-width {scale} (l2); black: the boundary of the sample's class, "
        "dashed red: its quadratic fit. Reproduces the report's Figure 2 (initial vs adversarially trained model) and Figure 4, left (CURE model).",
        methods,
    )
    shown = [
        {
            "Model": variant_title(meta, row["variant"]),
            "sample class": row["sample_class"],
            "attack succeeded": row["attack_success"],
            "d (attack l2)": row["attack_distance"],
            "boundary distance": row["boundary_distance"],
            "curvature (1/l2)": row["curvature"],
            "curvature × d": row["curvature_x_distance"],
            "fit RMSE": row["fit_rmse"],
        }
        for row in result.tables["curvature"]
    ]
    table = write_table(
        ordered_rows(result.tables["curvature"], CURVATURE_COLUMNS),
        out_dir,
        "boundary_plane_curvature",
        f"Curvature of the quadratic fit to the boundary at the sample's column (1/l2 units; positive bends away from the sample), "
        f"d the {attack} perturbation's l2 norm and boundary distance the boundary's position along it (report, Figures 2 and 4).",
        methods,
        shown=shown,
    )
    spread = per_image_artefact(
        result, "curvature", "|curvature| of the boundary fit (1/l2)", True, out_dir, "boundary_plane_per_image",
        f"Per image, |curvature| of the boundary fit in its own plane over {meta.get('num_images')} {meta['split']} images "
        "(bar: mean, diamond: median).",
    )
    return [figure, table] + ([spread] if spread else [])
