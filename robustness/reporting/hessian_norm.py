"""Table and figure of the ``hessian_norm`` probe: the report's Table 1, first column, per image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from torch import Tensor

from robustness.probes.base import ProbeResult
from robustness.reporting.base import Artefact, save_figure, write_table
from robustness.registry import register

# The report's names for its three models (Table 1's rows); other variants keep their own name.
VARIANT_TITLES = {"base": "Base model", "adversarial": "Adversarial training", "cure": "CURE training"}

HESSIAN_MEANING = (
    "H is the Hessian of the cross-entropy loss (true label) with respect to the input pixels in [0, 1]. "
    "Exact products compute it at the point: for a ReLU network only its Gauss-Newton part J^T(diag p - pp^T)J "
    "is non-zero, the logit Hessian vanishing almost everywhere. Finite differences of gradients at step h "
    "(CURE's view) also count how the linear regions change within distance h."
)


def variant_title(variant: str) -> str:
    return VARIANT_TITLES.get(variant, variant)


def images_phrase(meta: dict[str, Any]) -> str:
    dataset = f" of {meta['dataset']}" if meta.get("dataset") else ""
    return f"the first {meta['num_images']} {meta.get('split', 'test')} images{dataset}"


def per_image_figure(values: dict[str, Tensor], ylabel: str, title: str) -> Any:
    """One column of points per variant (log scale) with its mean marked: how the per-image values spread."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(values), 3.6))
    rng = np.random.default_rng(0)  # horizontal jitter only, so points do not hide each other
    for position, (variant, tensor) in enumerate(values.items()):
        data = tensor.double().numpy()
        data = data[np.isfinite(data) & (data > 0)]
        if len(data) == 0:
            continue
        ax.scatter(position + rng.uniform(-0.18, 0.18, len(data)), data, s=9, alpha=0.55)
        ax.plot([position - 0.3, position + 0.3], [data.mean()] * 2, color="black", linewidth=2)
    ax.set_xticks(range(len(values)), [variant_title(v) for v in values], rotation=15)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


@register("reporter", "hessian_norm")
def draw(result: ProbeResult, out_dir: Path) -> list[Artefact]:
    meta = result.meta
    rows = [
        {
            "Model": variant_title(row["variant"]),
            "‖H‖_F² (mean)": row["fro2_mean"],
            "s.e. across images": row["fro2_stderr"],
            "median": row["fro2_median"],
            "mean Monte-Carlo s.e. per image": row["mc_stderr_mean"],
            "accuracy": row["accuracy"],
            "images": row["images"],
        }
        for row in result.tables["hessian_norm"]
    ]
    caption = (
        f"Squared Frobenius norm of the input Hessian of the loss, averaged over {images_phrase(meta)} "
        f"(every image, correctly classified or not): {meta['method']}. {HESSIAN_MEANING} "
        "Reproduces the first column of the report's Table 1."
    )
    table = write_table(rows, out_dir, "hessian_norm", caption)
    values = {v: result.arrays[f"{v}/fro2"] for v in meta["variants"]}
    fig = per_image_figure(values, "‖H‖_F² estimate per image", f"{meta['estimator']}, {meta['num_samples']} samples")
    figure = save_figure(fig, out_dir, "hessian_norm_per_image", f"Per-image estimates of ‖H‖_F² (bar: mean) behind the first column of Table 1; {meta['method']}.")
    return [table, figure]
