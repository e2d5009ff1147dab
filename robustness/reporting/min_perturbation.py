"""Table and figure of the ``min_perturbation`` probe: the report's Table 1, second column, per image."""

from __future__ import annotations

from pathlib import Path

from robustness.probes.base import ProbeResult
from robustness.reporting.base import Artefact, images_phrase, per_image_figure, save_figure, variant_title, write_table
from robustness.registry import register

IMAGES_RULE = (
    "Every image counts, correctly classified or not (so all models see the same images); the perturbation "
    "changes the model's predicted label, and images where the attack failed are left out of the means."
)


@register("reporter", "min_perturbation")
def draw(result: ProbeResult, out_dir: Path) -> list[Artefact]:
    meta = result.meta
    rows = [
        {
            "Model": variant_title(meta, row["variant"]),
            "‖r‖₂ (mean)": row["norm_mean"],
            "s.e.": row["norm_stderr"],
            "‖r‖₂ / ‖x‖₂ (mean)": row["relative_mean"],
            "s.e. (relative)": row["relative_stderr"],
            "attack succeeded": f"{row['found']}/{row['images']}",
            "accuracy": row["accuracy"],
        }
        for row in result.tables["min_perturbation"]
    ]
    methods = f"{meta['attack']}. {IMAGES_RULE} s.e.: standard error across images."
    caption = (
        f"Smallest l2 perturbation that changes the predicted label, averaged over {images_phrase(meta)}. "
        "Reproduces the second column of the report's Table 1."
    )
    table = write_table(rows, out_dir, "min_perturbation", caption, methods)
    values = {v: result.arrays[f"{v}/norm"] for v in meta["variants"]}
    fig = per_image_figure(values, "‖r‖₂ per image", meta["attack"], meta)
    figure = save_figure(
        fig, out_dir, "min_perturbation_per_image",
        "Per-image smallest label-changing perturbation behind the second column of Table 1 (bar: mean, diamond: median).", methods,
    )
    return [table, figure]
