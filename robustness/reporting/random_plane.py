"""Figure and table of the ``random_plane`` probe: the report's Figure 3 (and Figure 4, right)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from robustness.probes.base import ProbeResult
from robustness.reporting.base import (
    PANEL_INCHES,
    Artefact,
    class_legend,
    draw_regions,
    grid_colours,
    ordered_rows,
    per_image_artefact,
    percent,
    sample_phrase,
    save_figure,
    variant_title,
    write_table,
)
from robustness.registry import register

# Saved results come back with keys sorted (JSON); tables keep this order.
REGION_COLUMNS = ("variant", "sample_class", "num_classes", "area_fraction")


@register("reporter", "random_plane")
def draw(result: ProbeResult, out_dir: Path) -> list[Artefact]:
    meta = result.meta
    variants: list[str] = meta["variants"]
    class_names: list[str] = meta["class_names"]
    coords = result.arrays["coords"]
    grids = [result.arrays[f"{variant}/labels"] for variant in variants]
    colours = grid_colours(grids)
    rows_by_variant = {row["variant"]: row for row in result.tables["regions"]}

    fig, axes = plt.subplots(1, len(variants), figsize=(PANEL_INCHES * len(variants), PANEL_INCHES + 0.4), squeeze=False, sharex=True, sharey=True)
    for ax, variant, grid in zip(axes[0], variants, grids):
        draw_regions(ax, grid, coords, colours)
        ax.plot([0.0], [0.0], marker="*", markersize=12, color="white", markeredgecolor="black", linestyle="none")
        row = rows_by_variant[variant]
        ax.set_title(f"{variant_title(meta, variant)}: {row['num_classes']} classes, {100 * row['area_fraction']:.0f}% '{row['sample_class']}'", fontsize="medium")
        ax.set_xlabel("random direction 1 (l2)")
    axes[0][0].set_ylabel("random direction 2 (l2)")
    class_legend(fig, colours, class_names)
    fig.tight_layout()

    sample = sample_phrase(meta, class_names)
    methods = meta.get("methods", "")
    figure = save_figure(
        fig,
        out_dir,
        "random_plane",
        f"Decision regions in one random plane through {sample}, every panel on the same square of half-width "
        f"{meta['half_width']:.3g} (l2); the star is the sample. Reproduces the report's Figure 3 (initial vs adversarially "
        "trained model) and Figure 4, right (CURE model).",
        methods,
    )
    table = write_table(
        ordered_rows(result.tables["regions"], REGION_COLUMNS),
        out_dir,
        "random_plane_regions",
        f"Classes met on the random plane through {sample} and the share of the plane that keeps the sample's predicted class "
        "(report, Figures 3 and 4).",
        methods,
        shown=[
            {"Model": variant_title(meta, row["variant"]), "sample class": row["sample_class"], "classes met": row["num_classes"],
             "share in the sample's class": percent(row["area_fraction"])}
            for row in result.tables["regions"]
        ],
    )
    spread = per_image_artefact(
        result, "area_fraction", "share of the plane in the image's class", False, out_dir, "random_plane_per_image",
        f"Per image, the share of its own random plane that keeps its predicted class, over {meta.get('num_images')} "
        f"{meta['split']} images (bar: mean, diamond: median).",
    )
    return [figure, table] + ([spread] if spread else [])
