"""Table and figure of the ``hessian_norm`` probe: the report's Table 1, first column, per image."""

from __future__ import annotations

from pathlib import Path

from robustness.probes.base import ProbeResult
from robustness.reporting.base import HESSIAN_MEANING, Artefact, images_phrase, per_image_figure, save_figure, variant_title, write_table
from robustness.registry import register

@register("reporter", "hessian_norm")
def draw(result: ProbeResult, out_dir: Path) -> list[Artefact]:
    meta = result.meta
    rows = [
        {
            "Model": variant_title(meta, row["variant"]),
            "‖H‖_F² (mean)": row["fro2_mean"],
            "s.e. across images": row["fro2_stderr"],
            "median": row["fro2_median"],
            "mean Monte-Carlo s.e. per image": row["mc_stderr_mean"],
            "accuracy": row["accuracy"],
            "images": row["images"],
        }
        for row in result.tables["hessian_norm"]
    ]
    methods = f"{meta['method']}, at every one of {images_phrase(meta)}, correctly classified or not. {HESSIAN_MEANING}"
    caption = (
        f"Squared Frobenius norm of the input Hessian of the loss, mean and median over {images_phrase(meta)}. "
        "Reproduces the first column of the report's Table 1."
    )
    table = write_table(rows, out_dir, "hessian_norm", caption, methods)
    values = {v: result.arrays[f"{v}/fro2"] for v in meta["variants"]}
    fig = per_image_figure(values, "‖H‖_F² estimate per image", f"{meta['estimator']}, {meta['num_samples']} samples", meta)
    figure = save_figure(
        fig, out_dir, "hessian_norm_per_image",
        "Per-image estimates of ‖H‖_F² behind the first column of Table 1 (bar: mean, diamond: median).", methods,
    )
    return [table, figure]
