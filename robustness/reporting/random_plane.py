"""Figure and table of the ``random_plane`` probe: the report's Figure 3 (and Figure 4, right)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import ListedColormap, to_rgba
from matplotlib.patches import Patch
from torch import Tensor

from robustness.probes.base import ProbeResult
from robustness.reporting.base import Artefact, save_figure, write_table
from robustness.registry import register

PANEL_INCHES = 3.6
# Saved results come back with keys sorted (JSON); tables keep this order.
REGION_COLUMNS = ("variant", "sample_class", "num_classes", "area_fraction")


def class_colours(grids: Sequence[Tensor]) -> dict[int, tuple[float, float, float, float]]:
    """One colour per class present on any grid, the same in every panel.

    Colours go to the present classes only (largest total area first), so up to 20 classes get
    clearly distinct tab20 colours even on a 200-class dataset.
    """
    counts: dict[int, int] = {}
    for grid in grids:
        values, freq = np.unique(np.asarray(grid), return_counts=True)
        for value, n in zip(values.tolist(), freq.tolist()):
            counts[value] = counts.get(value, 0) + n
    ordered = sorted(counts, key=lambda c: (-counts[c], c))
    if len(ordered) <= 10:
        palette = [plt.get_cmap("tab10")(i) for i in range(10)]
    elif len(ordered) <= 20:
        palette = [plt.get_cmap("tab20")(i) for i in range(20)]
    else:
        palette = [plt.get_cmap("gist_ncar")(i / len(ordered)) for i in range(len(ordered))]
    return {cls: to_rgba(palette[i]) for i, cls in enumerate(ordered)}


def draw_regions(ax: Any, labels: Tensor, coords: Tensor, colours: dict[int, tuple], v_coords: Tensor | None = None) -> None:
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


def class_legend(fig: Any, colours: dict[int, tuple], class_names: Sequence[str]) -> None:
    handles = [Patch(facecolor=colours[c], edgecolor="black", linewidth=0.5, label=class_name(class_names, c)) for c in sorted(colours)]
    fig.legend(handles=handles, title="class", loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize="small")


def ordered_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """Rows with ``columns`` first, in that order, then any other keys."""
    return [{**{c: row[c] for c in columns if c in row}, **{k: v for k, v in row.items() if k not in columns}} for row in rows]


def class_name(class_names: Sequence[str], index: int) -> str:
    return str(class_names[index]) if 0 <= index < len(class_names) else str(index)


def sample_phrase(meta: dict, class_names: Sequence[str]) -> str:
    """How captions name the probed image: dataset, split, index and true class."""
    return f"{meta['dataset']} {meta['split']} image #{meta['sample_index']} (true class '{class_name(class_names, meta['true_label'])}')"


@register("reporter", "random_plane")
def draw(result: ProbeResult, out_dir: Path) -> list[Artefact]:
    meta = result.meta
    variants: list[str] = meta["variants"]
    class_names: list[str] = meta["class_names"]
    coords = result.arrays["coords"]
    grids = [result.arrays[f"{variant}/labels"] for variant in variants]
    colours = class_colours(grids)
    rows_by_variant = {row["variant"]: row for row in result.tables["regions"]}

    fig, axes = plt.subplots(1, len(variants), figsize=(PANEL_INCHES * len(variants), PANEL_INCHES + 0.4), squeeze=False)
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
    figure = save_figure(
        fig,
        out_dir,
        "random_plane",
        f"Decision regions in a random plane through {sample}, half-width {meta['half_width']:.3g} "
        f"({meta['extent']:g} x the image's l2 norm); the star is the sample. Reproduces the report's Figure 3 "
        "(initial vs adversarially trained model) and Figure 4, right (CURE model).",
    )
    table = write_table(
        ordered_rows(result.tables["regions"], REGION_COLUMNS),
        out_dir,
        "random_plane_regions",
        f"Classes met on the random plane through {sample} ({meta['resolution']}x{meta['resolution']} grid) and the share "
        "of the plane that keeps the sample's predicted class (report, Figures 3 and 4).",
    )
    return [figure, table]
