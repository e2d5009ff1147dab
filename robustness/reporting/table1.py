"""The report's Table 1 (``table1`` probe), its ordering under mean and median, and a per-image view."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from robustness.probes.base import ProbeResult
from robustness.reporting.base import HESSIAN_MEANING, Artefact, format_number, images_phrase, interval_text, save_figure, variant_colour, variant_title, write_table
from robustness.reporting.min_perturbation import IMAGES_RULE
from robustness.registry import register

MEASURE_NAMES = {"fro2": "‖H‖_F²", "norm": "‖r‖₂"}


def _with_intervals(row: dict, measure: str) -> dict:
    name = MEASURE_NAMES[measure]
    out = {}
    for statistic in ("mean", "median"):
        key = f"{measure}_{statistic}"
        out[f"{name} {statistic}"] = row[key]
        out[f"{name} {statistic} 95% CI"] = interval_text(row[f"{key}_low"], row[f"{key}_high"])
    return out


def _with_interval(row: dict, key: str) -> str:
    """One cell: the statistic and its interval, ``5.512 [4.1, 6.9]``."""
    return f"{format_number(row[key])} {interval_text(row[f'{key}_low'], row[f'{key}_high'])}"


def _shown(row: dict, meta: dict) -> dict:
    """On screen: each statistic with its interval in one cell; the CSV keeps them apart."""
    return {
        "Model": variant_title(meta, row["variant"]),
        **{f"{MEASURE_NAMES[m]} {s} [95% CI]": _with_interval(row, f"{m}_{s}") for m in ("fro2", "norm") for s in ("mean", "median")},
        "attack succeeded": f"{row['found']}/{row['images']}",
        "accuracy": row["accuracy"],
    }


@register("reporter", "table1")
def draw(result: ProbeResult, out_dir: Path) -> list[Artefact]:
    meta = result.meta
    rows = [
        {
            "Model": variant_title(meta, row["variant"]),
            **_with_intervals(row, "fro2"),
            **_with_intervals(row, "norm"),
            "‖r‖₂ / ‖x‖₂ mean": row["relative_mean"],
            "attack succeeded": f"{row['found']}/{row['images']}",
            "accuracy": row["accuracy"],
        }
        for row in result.tables["table1"]
    ]
    methods = (
        f"‖H‖_F²: {meta['hessian_method']}. Perturbation: {meta['attack']}. {IMAGES_RULE} "
        f"Intervals: {meta['interval']} (seed {meta['seed']}). {HESSIAN_MEANING}"
    )
    caption = (
        f"Table 1 of the report: the squared Frobenius norm of the input Hessian of the loss and the smallest "
        f"label-changing perturbation over {images_phrase(meta)}, mean and median each with a bootstrap 95% interval over images."
    )
    shown = [_shown(row, meta) for row in result.tables["table1"]]
    table = write_table(rows, out_dir, "table1_curvature", caption, methods, shown=shown)
    order_rows = [
        {"Measure": MEASURE_NAMES[row["measure"]], "Statistic": row["statistic"], "Ordering (smallest first)": row["ordering"]}
        for row in result.tables["ordering"]
    ]
    ordering = write_table(
        order_rows, out_dir, "table1_ordering",
        "Table 1's models ordered under the mean and under the median over images (the scorecard tests each step with a paired interval).",
    )

    fig, ax = plt.subplots(figsize=(4.8, 3.8))
    shown = 0
    for variant in meta["variants"]:
        fro2 = result.arrays[f"{variant}/fro2"].double().numpy()
        norm = result.arrays[f"{variant}/norm"].double().numpy()
        keep = np.isfinite(fro2) & np.isfinite(norm) & (fro2 > 0) & (norm > 0)
        shown += int(keep.sum())
        ax.scatter(fro2[keep], norm[keep], s=12, alpha=0.6, label=variant_title(meta, variant), color=variant_colour(meta, variant))
    if shown:  # log axes need a positive value to scale; with none (every attack failed) the panel says so
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no image with a finite positive ‖H‖_F² and ‖r‖₂", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("‖H‖_F² estimate")
    ax.set_ylabel("smallest label-changing ‖r‖₂")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize="small")
    fig.tight_layout()
    figure = save_figure(
        fig, out_dir, "table1_curvature_vs_distance",
        f"Per image, curvature (‖H‖_F², {meta['estimator']}) against distance to the boundary (‖r‖₂): the points behind Table 1.",
        methods,
    )
    return [table, ordering, figure]
