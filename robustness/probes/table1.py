"""Probe ``table1``: the report's Table 1, both columns over the same images.

For each model variant, over the first ``num_images`` test images (every image, whether the model
classifies it correctly or not, so that all variants are measured on the same images):

* ``||H||_F^2``: the ``hessian_norm`` probe's estimate per image, averaged;
* perturbation size: the ``min_perturbation`` probe's smallest label-changing ``||r||_2`` per
  image (and ``||r||_2 / ||x||_2``), averaged over the images where the attack succeeded.

Per-image values span decades, so a mean can rest on a few images: each column gives the mean
and the median over images, each with a seeded percentile-bootstrap 95% interval over images
(:mod:`robustness.stats`), and ``tables["ordering"]`` orders the variants under both.

Both come from the functions of those probes, with their chunk files in ``ctx.work_dir``, so an
interrupted run resumes and a finished column is never recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from robustness.stats import STATISTICS, bootstrap_statistic, ordering
from robustness.tensors import l2_norm
from robustness.probes.base import ProbeContext, ProbeResult
from robustness.probes.hessian_norm import HessianNormOptions, hessian_norm_row, measure_hessian_norm
from robustness.tensors import accuracy
from robustness.probes.min_perturbation import (
    MinPerturbationOptions,
    attack_description,
    measure_min_perturbation,
    min_perturbation_row,
)
from robustness.probes.per_image import load_images
from robustness.registry import register


@dataclass(frozen=True)
class Table1Options(HessianNormOptions, MinPerturbationOptions):
    probe: ClassVar[str] = "table1"


@register("probe", "table1")
def compute(ctx: ProbeContext) -> ProbeResult:
    options = Table1Options.from_cfg(ctx.options)
    x, y = load_images(ctx, options)
    arrays: dict[str, Tensor] = {"labels": y.cpu(), "image_norm": l2_norm(x).double().cpu()}
    rows: list[dict[str, Any]] = []
    for variant, model in ctx.models.items():
        curvature = measure_hessian_norm(ctx, variant, model, x, y, options)
        perturbation = measure_min_perturbation(ctx, variant, model, x, options)
        arrays.update({f"{variant}/{key}": value for key, value in {**curvature, **perturbation}.items()})
        hessian = hessian_norm_row(variant, curvature)
        distance = min_perturbation_row(variant, perturbation)
        rows.append({
            "variant": variant,
            **intervals("fro2", curvature["fro2"], ctx.seed),
            "fro2_stderr": hessian["fro2_stderr"],
            **intervals("norm", perturbation["norm"], ctx.seed),
            "norm_stderr": distance["norm_stderr"],
            "relative_mean": distance["relative_mean"],
            "found": distance["found"],
            "accuracy": accuracy(model, x, y),
            "images": int(len(x)),
        })
    order = [
        {"measure": measure, "statistic": statistic, "ordering": ordering({row["variant"]: row[f"{measure}_{statistic}"] for row in rows})}
        for measure in MEASURES
        for statistic in STATISTICS
    ]
    meta = {
        "variants": list(ctx.models),
        "estimator": options.estimator,
        "h": float(options.h) if options.estimator == "finite_difference" else None,
        "num_samples": int(options.num_samples),
        "hessian_method": options.describe(),
        "attack": attack_description(ctx.attack, int(options.refine_steps)),
        "num_images": int(len(x)),
        "split": options.split,
        "seed": int(ctx.seed),
        "interval": "seeded percentile bootstrap over images, 95%",
    }
    return ProbeResult("table1", arrays, {"table1": rows, "ordering": order}, meta)


MEASURES = ("fro2", "norm")


def intervals(measure: str, values: Tensor, seed: int) -> dict[str, float]:
    """``<measure>_<mean|median>`` with ``_low``/``_high``: each statistic and its bootstrap 95% interval over images."""
    out: dict[str, float] = {}
    for statistic in STATISTICS:
        interval = bootstrap_statistic(values.double().numpy(), statistic, seed=seed)
        out.update({f"{measure}_{statistic}": interval.estimate, f"{measure}_{statistic}_low": interval.low, f"{measure}_{statistic}_high": interval.high})
    return out
