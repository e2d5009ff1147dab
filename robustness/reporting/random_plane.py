"""Figure and table of the ``random_plane`` probe: the report's Figure 3 (and Figure 4, right)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch
from torch import Tensor

from robustness.probes.base import ProbeResult
from robustness.reporting.base import (
    RGBA,
    Artefact,
    class_colours,
    class_name,
    ordered_rows,
    per_image_figure,
    sample_phrase,
    save_figure,
    write_table,
)
from robustness.registry import register

PANEL_INCHES = 3.6
# Saved results come back with keys sorted (JSON); tables keep this order.
REGION_COLUMNS = ("variant", "sample_class", "num_classes", "area_fraction")


def grid_colours(grids: Sequence[Tensor]) -> dict[int, RGBA]:
    """The fixed colour of every class present on any of the grids."""
    return class_colours(sorted({int(c) for grid in grids for c in np.unique(np.asarray(grid)).tolist()}))


def draw_regions(ax: Any, labels: Tensor, coords: Tensor, colours: dict[int, RGBA], v_coords: Tensor | None = None) -> None:
    """Paint a label grid (rows along the vertical ``coords``, columns along ``v_coords``) in class colours."""
    grid = np.asarray(labels)
    classes = sorted(colours)
    index = np.searchsorted(classes, grid)
    cmap = ListedColormap([colours[c] for c in classes])
    rows, cols = np.asarray(coords, dtype=float), np.asarray(coords if v_coords is None else v_coords, dtype=float)
    # Each pixel is centred on its grid point, hence the half-step padding of the extent.
    pad_r = (rows[-1] - rows[0]) / max(len(rows) - 1, 1) / 2
    pad_c = (cols[-1] - cols[0]) / max(len(cols) - 1, 1) / 2
    ax.imshow(
        index,
        origin="lower",
        extent=(cols[0] - pad_c, cols[-1] + pad_c, rows[0] - pad_r, rows[-1] + pad_r),
        cmap=cmap,
        vmin=-0.5,
        vmax=len(classes) - 0.5,
        interpolation="nearest",
        aspect="equal",
    )


def class_legend(fig: Any, colours: dict[int, RGBA], class_names: Sequence[str]) -> None:
    handles = [Patch(facecolor=colours[c], edgecolor="black", linewidth=0.5, label=class_name(class_names, c)) for c in sorted(colours)]
    fig.legend(handles=handles, title="class", loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize="small")


def per_image_artefact(result: ProbeResult, key: str, ylabel: str, log: bool, out_dir: Path, name: str, caption: str) -> Artefact | None:
    """The spread over images of one per-image value (absent in results saved before it existed)."""
    variants = result.meta["variants"]
    if f"{variants[0]}/per_image/{key}" not in result.arrays:
        return None
    values = {v: np.abs(result.arrays[f"{v}/per_image/{key}"].double().numpy()) if log else result.arrays[f"{v}/per_image/{key}"].double().numpy() for v in variants}
    fig = per_image_figure(values, ylabel, f"{result.meta['num_images']} {result.meta['split']} images, one plane each")
    return save_figure(fig, out_dir, name, caption, result.meta.get("methods", ""))


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
        ax.set_title(f"{variant}: {row['num_classes']} classes, {100 * row['area_fraction']:.0f}% '{row['sample_class']}'", fontsize="medium")
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
    )
    spread = per_image_artefact(
        result, "area_fraction", "share of the plane in the image's class", False, out_dir, "random_plane_per_image",
        f"Per image, the share of its own random plane that keeps its predicted class, over {meta.get('num_images')} "
        f"{meta['split']} images (bar: mean, diamond: median).",
    )
    return [figure, table] + ([spread] if spread else [])
