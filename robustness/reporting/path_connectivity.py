"""Figures 5-8 and Table 2 of the report from a ``path_connectivity`` probe result.

What is drawn follows the probe's ``draw`` option, so that the three experiments behind these
figures split them and a report shows each once. The per-pair table is always written to
``path_pairs.csv`` (and ``.md``) and linked from the captions, but never returned as an artefact
to embed: with 48 pairs per variant it would swamp the report.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from robustness.probes.base import ProbeResult
from robustness.reporting.base import Artefact, format_number, percent, pick_columns, save_figure, variant_colour, variant_title, write_data, write_table
from robustness.registry import register

PAIRS_TABLE = "path_pairs"
_PAIRS_NOTE = f"Every pair's path, check and status is in {PAIRS_TABLE}.csv, in the same output folder as this table."

# pair type -> (projection figure name, variance figure name, the report's figure numbers, wording)
_FIGURES = {
    "natural": ("fig5_natural_path", "fig6_natural_variance", (5, 6), "two natural images"),
    "adversarial": ("fig7_adversarial_path", "fig8_adversarial_variance", (7, 8), "two adversarial images"),
    "noise": ("path_noise_projection", "path_noise_variance", None, "a perturbed white-noise image and a natural image"),
}


@register("reporter", "path_connectivity")
def draw(result: ProbeResult, out_dir: Path) -> list[Artefact]:
    out_dir = Path(out_dir)
    artefacts: list[Artefact] = []
    meta = result.meta
    draw = meta["options"].get("draw", ["figures", "table2"])
    pairs = write_data(result.tables["pairs"], out_dir, PAIRS_TABLE, "Every searched path: its pair, check, status, metrics and cost.")
    if "figures" in draw:
        for pair_type in meta["pair_types"]:
            chosen = {v: meta["figure_paths"][v][pair_type] for v in meta["variants"] if pair_type in meta["figure_paths"].get(v, {})}
            if not chosen:
                continue  # no successful path of this type: Table 2 shows the failures
            artefacts.append(_projection_figure(result, pair_type, chosen, out_dir))
            artefacts.append(_variance_figure(result, pair_type, chosen, out_dir))
    if "table2" in draw:
        table = _table2(result, out_dir)
        # The per-pair files travel with Table 2 (after its own CSV, which a report links first).
        table.paths += pairs
        artefacts.append(table)
    return artefacts


def _which(pair_type: str, index: int) -> str:
    numbers = _FIGURES[pair_type][2]
    return f"Reproduces Figure {numbers[index]} of the report" if numbers else "Extends the report (Fawzi et al.'s white-noise pairs)"


def _title(title: str, info: dict[str, Any]) -> str:
    return f"{title}: class {info['class_name']}, {info['points']} points, deviation {format_number(info['deviation'])}"


def _projection_figure(result: ProbeResult, pair_type: str, chosen: dict[str, dict[str, Any]], out_dir: Path) -> Artefact:
    fig, axes = plt.subplots(len(chosen), 2, figsize=(9, 3.6 * len(chosen)), squeeze=False)
    for row, (variant, info) in enumerate(chosen.items()):
        points = result.arrays[f"{variant}/{pair_type}/projection"].numpy()
        vertices = result.arrays[f"{variant}/{pair_type}/vertex_projection"].numpy()
        position = np.linspace(0.0, 1.0, len(points))
        for col, pc in enumerate((1, 2)):
            ax = axes[row, col]
            ax.plot(points[:, 0], points[:, pc], color="0.75", lw=1, zorder=1)
            ax.scatter(points[:, 0], points[:, pc], c=position, cmap="viridis", s=10, zorder=2)
            ax.scatter(vertices[:, 0], vertices[:, pc], marker="x", color="crimson", s=28, zorder=3, label="vertices")
            ax.scatter(vertices[:1, 0], vertices[:1, pc], marker="o", facecolor="none", edgecolor="black", s=60, zorder=4, label="start")
            ax.scatter(vertices[-1:, 0], vertices[-1:, pc], marker="s", facecolor="none", edgecolor="black", s=60, zorder=4, label="end")
            # A straight path has nothing on PC2/PC3 but rounding; autoscaling would blow that up
            # into zigzags, so the vertical range is at least a tenth of the path's extent on PC1.
            low, high = ax.get_ylim()
            half = max((high - low) / 2, 0.05 * float(np.ptp(points[:, 0])))
            ax.set_ylim((low + high) / 2 - half, (low + high) / 2 + half)
            ax.set_xlabel("principal component 1")
            ax.set_ylabel(f"principal component {pc + 1}")
            ax.set_title(f"({'ab'[col]}) PC{pc + 1} vs PC1 - {_title(variant_title(result.meta, variant), info)}", fontsize=8)
        axes[row, 0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    name, _, _, wording = _FIGURES[pair_type]
    caption = (
        f"{_which(pair_type, 0)}: low-dimensional views of the path found between {wording} of one class: "
        "points spaced evenly along the path (coloured by position, dark at the start to yellow at the end) and its vertices, projected on the "
        "path's first principal components ((a) second vs first, (b) third vs first). The path shown is "
        f"the successful one that deviates most from its straight line (its pair number is in {PAIRS_TABLE}.csv)."
    )
    return save_figure(fig, out_dir, name, caption)


def _variance_figure(result: ProbeResult, pair_type: str, chosen: dict[str, dict[str, Any]], out_dir: Path) -> Artefact:
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    width = 0.8 / len(chosen)
    for i, variant in enumerate(chosen):
        ratio = result.arrays[f"{variant}/{pair_type}/explained_variance_ratio"].numpy()
        components = np.arange(1, len(ratio) + 1)
        ax.bar(components + (i - (len(chosen) - 1) / 2) * width, ratio, width=width, label=variant_title(result.meta, variant), color=variant_colour(result.meta, variant))
    ax.set_xlabel("principal component")
    ax.set_ylabel("explained variance ratio")
    ax.set_xticks(components)
    ax.set_ylim(0.0, 1.0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _, name, _, wording = _FIGURES[pair_type]
    caption = (
        f"{_which(pair_type, 1)}: ratio of the variance explained by each of the first {len(ratio)} "
        f"principal components of the path between {wording} (a straight path puts all of it on the first)."
    )
    return save_figure(fig, out_dir, name, caption)


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return format_number(mean) if math.isnan(std) else f"{format_number(mean)} ± {format_number(std)}"


def _table2(result: ProbeResult, out_dir: Path) -> Artefact:
    rows = [
        {
            "model": variant_title(result.meta, r["model"]),
            "pair type": r["pair_type"],
            "check": r["check"],
            "pairs": r["pairs"],
            "certified": r["certified"],
            "sampled-only": r["sampled_only"],
            "failed": r["failed"],
            "success rate": percent(r["success_rate"]),
            "number of points": _pm(r["points_mean"], r["points_std"]),
            "normalised deviation": _pm(r["deviation_mean"], r["deviation_std"]),
            "model evaluations / path": round(r["evaluations_mean"]) if math.isfinite(r["evaluations_mean"]) else math.nan,
            # What certification cost: intervals proved by bounds, and linear pieces walked exactly.
            "certifier: bounds + pieces / path": f"{r.get('bound_checks_mean', 0.0):.0f} + {r['pieces_mean']:.0f}",
        }
        for r in result.tables["table2"]
    ]
    caption = (
        "Reproduces Table 2 of the report: mean ± standard deviation, over the successful paths, of the number of points "
        f"of a path and of its largest distance from its chord over the chord's length, per model and pair type ({result.meta['dataset']}). "
        f"A success is a path proven to stay in its class ('certified'; 'sampled-only' paths passed sampled checks only), and every pair's row is in {PAIRS_TABLE}.csv beside this table."
    )
    methods = (
        "Piecewise-linear models: every segment that passes its sampled check is certified exactly, by interval bounds along "
        "the segment where they suffice and by walking its linear pieces elsewhere (the last column counts both, per path); a "
        "segment over the budget of pieces leaves its path 'sampled-only', not a success. Where the check reads 'sampled at K "
        "points per segment' the model is not piecewise linear, and a success means only that those points are in the class."
    )
    on_screen = ["model", "pair type", "pairs", "certified", "failed", "success rate", "number of points", "normalised deviation"]
    return write_table(rows, out_dir, "table2_paths", caption, methods, shown=pick_columns(rows, on_screen))
