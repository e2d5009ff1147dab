"""The report's Table 1 (``table1`` probe), plus a per-image view of the same numbers."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from robustness.probes.base import ProbeResult
from robustness.reporting.base import Artefact, save_figure, write_table
from robustness.reporting.hessian_norm import HESSIAN_MEANING, images_phrase, variant_title
from robustness.reporting.min_perturbation import IMAGES_RULE
from robustness.registry import register


@register("reporter", "table1")
def draw(result: ProbeResult, out_dir: Path) -> list[Artefact]:
    meta = result.meta
    rows = [
        {
            "Model": variant_title(row["variant"]),
            "‖H‖_F²": row["fro2_mean"],
            "‖H‖_F² s.e.": row["fro2_stderr"],
            # Per-image values span decades (see the scatter); the median is the typical image.
            "‖H‖_F² median": row["fro2_median"],
            "Perturbation size ‖r‖₂": row["norm_mean"],
            "‖r‖₂ s.e.": row["norm_stderr"],
            "‖r‖₂ / ‖x‖₂": row["relative_mean"],
            "attack succeeded": f"{row['found']}/{row['images']}",
            "accuracy": row["accuracy"],
        }
        for row in result.tables["table1"]
    ]
    caption = (
        f"Table 1 of the report: average over {images_phrase(meta)} of the estimated squared Frobenius norm of "
        f"the input Hessian of the loss ({meta['hessian_method']}) and of the norm of the smallest perturbation "
        f"that changes the predicted label ({meta['attack']}). {IMAGES_RULE} s.e.: standard error across images "
        f"(it includes the Monte-Carlo error). {HESSIAN_MEANING}"
    )
    table = write_table(rows, out_dir, "table1_curvature", caption)

    fig, ax = plt.subplots(figsize=(4.8, 3.8))
    for variant in meta["variants"]:
        fro2 = result.arrays[f"{variant}/fro2"].double().numpy()
        norm = result.arrays[f"{variant}/norm"].double().numpy()
        keep = np.isfinite(fro2) & np.isfinite(norm) & (fro2 > 0) & (norm > 0)
        ax.scatter(fro2[keep], norm[keep], s=12, alpha=0.6, label=variant_title(variant))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("‖H‖_F² estimate")
    ax.set_ylabel("smallest label-changing ‖r‖₂")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize="small")
    fig.tight_layout()
    figure = save_figure(
        fig, out_dir, "table1_curvature_vs_distance",
        f"Per image, curvature (‖H‖_F², {meta['estimator']}) against distance to the boundary (‖r‖₂): "
        "the points behind the report's Table 1, one colour per model.",
    )
    return [table, figure]
