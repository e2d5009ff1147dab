"""Figure and table of the ``curvature_profile`` probe (beyond the report; the CURE paper's curvature profile)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from robustness.probes.base import ProbeResult
from robustness.reporting.base import HESSIAN_MEANING, Artefact, images_phrase, save_figure, variant_colour, variant_title, write_table
from robustness.registry import register


@register("reporter", "curvature_profile")
def draw(result: ProbeResult, out_dir: Path) -> list[Artefact]:
    meta = result.meta
    profiles = {v: result.arrays[f"{v}/eigenvalues"].double().numpy() for v in meta["variants"]}
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    largest = max((float(np.abs(p).max()) for p in profiles.values() if p.size), default=1.0) or 1.0
    for variant, values in profiles.items():
        mean = values.mean(0)
        ranks = np.arange(1, len(mean) + 1)
        line = ax.plot(ranks, mean, marker="o", markersize=3, label=variant_title(meta, variant), color=variant_colour(meta, variant))[0]
        # The band shows how much the spectrum varies from image to image.
        low, high = np.percentile(values, [25, 75], axis=0)
        ax.fill_between(ranks, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    # Eigenvalues may be negative (smooth networks, finite differences) and span decades: symlog.
    ax.set_yscale("symlog", linthresh=largest * 1e-4)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("rank (by |eigenvalue|)")
    ax.set_ylabel("eigenvalue of H (mean over images)")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize="small")
    fig.tight_layout()
    caption = (
        f"Curvature profile: the eigenvalues of largest magnitude of the input Hessian of the loss, sorted by "
        f"magnitude, mean over {images_phrase(meta)} (band: 25-75% of images). Not in the report; the CURE paper's curvature profile."
    )
    methods = f"{meta['method']}. {HESSIAN_MEANING}"
    figure = save_figure(fig, out_dir, "curvature_profile", caption, methods)
    rows = [
        {
            "Model": variant_title(meta, row["variant"]),
            "λ₁ (mean)": row["lambda_1"],
            f"λ_{row['k']} (mean)": row["lambda_k"],
            f"Σ λ² over top {row['k']}": row["sum_lambda_sq"],
            "accuracy": row["accuracy"],
            "images": row["images"],
        }
        for row in result.tables["curvature_profile"]
    ]
    table_caption = (
        "The numbers behind the curvature profile, per model: the largest and the last computed eigenvalue "
        "(means over the images) and the sum of the squared computed eigenvalues."
    )
    table = write_table(rows, out_dir, "curvature_profile", table_caption, methods)
    return [figure, table]
