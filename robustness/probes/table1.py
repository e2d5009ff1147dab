"""Probe ``table1``: the report's Table 1, both columns over the same images.

For each model variant, over the first ``num_images`` test images (every image, whether the model
classifies it correctly or not, so that all variants are measured on the same images):

* ``||H||_F^2``: the ``hessian_norm`` probe's estimate per image, averaged;
* perturbation size: the ``min_perturbation`` probe's smallest label-changing ``||r||_2`` per
  image (and ``||r||_2 / ||x||_2``), averaged over the images where the attack succeeded.

Per-image values span decades, so a mean can rest on a few images: each column gives the mean
and the median over images, each with a seeded percentile-bootstrap 95% interval over images
(:mod:`robustness.stats`), and ``tables["ordering"]`` orders the variants under both.

Both come from the functions of those probes, each chunk kept as it finishes, so an
interrupted run resumes and a finished column is never recomputed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import Tensor

from robustness.probes.base import (
    Progress,
    ProbeContext,
    ProbeResult,
    attack_node,
    fitted,
    no_progress,
    prepare_inputs,
    probe_options,
    run_seed,
    seeded,
)
from robustness.probes.hessian_norm import HessianNormOptions, hessian_norm_row, measure_hessian_norm
from robustness.probes.memory import LONG, MemoryNeed, attack_gradient_rows
from robustness.probes.min_perturbation import (
    MinPerturbationOptions,
    attack_description,
    measure_min_perturbation,
    min_perturbation_row,
    minimisation_attack,
)
from robustness.probes.per_image import first, load_images
from robustness.registry import register
from robustness.stats import STATISTICS, bootstrap_statistic, ordering
from robustness.tensors import accuracy, l2_norm


@probe_options("table1")
class Table1Options(HessianNormOptions, MinPerturbationOptions):
    """The options of conf/probe/table1.yaml: hessian_norm's and min_perturbation's."""

    def memory_need(self, image_shape: Sequence[int], num_classes: int, activation: int, num_images: int | None,
                    gradient_rows: int | None = None) -> MemoryNeed:
        per_image = max(self.hessian_bytes(image_shape, num_classes, activation, vectors=1) + int(self.num_samples) * LONG,
                        self.attack_bytes(image_shape, num_classes, activation, gradient_rows))
        return self.images_need(image_shape, num_images, per_image, results_per_image=8 * LONG)


class Table1Result(ProbeResult):
    """``rows``: per model the mean and median of ``||H||_F^2`` and of the smallest ``||r||_2``, each
    with its bootstrap 95% interval over images; ``ordering``: the models ordered under each
    statistic; :meth:`per_image`: the per-image values of both probes."""

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.tables["table1"]

    @property
    def ordering(self) -> list[dict[str, Any]]:
        return self.tables["ordering"]

    def per_image(self, model: str = "model") -> dict[str, Tensor]:
        prefix = f"{model}/"
        return {key[len(prefix):]: value for key, value in self.arrays.items() if key.startswith(prefix)}


def table1(models: Any, images: Tensor, labels: Tensor, *, attack: str | dict[str, Any] | None = None, seed: int | None = None,
           cache_dir: str | Path | None = None, progress: Progress = no_progress, **options: Any) -> Table1Result:
    """The report's Table 1 on the first ``num_images`` images: ``||H||_F^2`` and the smallest perturbation, per model.

    attack: the minimisation attack for the perturbation column (default: ``conf/config.yaml``'s, deepfool).
    options: those of ``conf/probe/table1.yaml`` (hessian_norm's and min_perturbation's; its values are the defaults).
    seed: the Hessian's random directions and the bootstrap (default: ``conf/config.yaml``'s seed).
    """
    settings = Table1Options.from_cfg(options)
    attack_cfg = attack_node(attack)
    minimisation_attack(attack_cfg)
    named, x, y, classes = prepare_inputs(models, images, labels)
    x, y = first(x, y, settings.num_images)
    settings = fitted(settings, named, x, classes, gradient_rows=attack_gradient_rows(attack_cfg))
    seed = run_seed(seed)
    cache = None if cache_dir is None else Path(cache_dir)
    arrays: dict[str, Tensor] = {"labels": y.cpu(), "image_norm": l2_norm(x).double().cpu()}
    rows: list[dict[str, Any]] = []
    with seeded(seed, x.device):
        for variant, model in named.items():
            curvature = measure_hessian_norm(model, x, y, settings, seed, cache, progress, variant)
            perturbation = measure_min_perturbation(model, x, attack_cfg, settings, cache, progress, variant)
            arrays.update({f"{variant}/{key}": value for key, value in {**curvature, **perturbation}.items()})
            hessian = hessian_norm_row(variant, curvature)
            distance = min_perturbation_row(variant, perturbation)
            rows.append({
                "variant": variant,
                **intervals("fro2", curvature["fro2"], seed),
                "fro2_stderr": hessian["fro2_stderr"],
                **intervals("norm", perturbation["norm"], seed),
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
        "variants": list(named),
        "estimator": settings.estimator,
        "h": float(settings.h) if settings.estimator == "finite_difference" else None,
        "num_samples": int(settings.num_samples),
        "hessian_method": settings.describe(),
        "attack": attack_description(attack_cfg, int(settings.refine_steps)),
        "num_images": int(len(x)),
        "split": settings.split,
        "seed": int(seed),
        "interval": "seeded percentile bootstrap over images, 95%",
    }
    return Table1Result("table1", arrays, {"table1": rows, "ordering": order}, meta)


@register("probe", "table1", options=Table1Options)
def compute(ctx: ProbeContext) -> ProbeResult:
    options = Table1Options.from_cfg(ctx.options)
    x, y = load_images(ctx, options.split, options.num_images)
    return table1(ctx.models, x, y, attack=ctx.attack, **ctx.common(), **ctx.options)


MEASURES = ("fro2", "norm")


def intervals(measure: str, values: Tensor, seed: int) -> dict[str, float]:
    """``<measure>_<mean|median>`` with ``_low``/``_high``: each statistic and its bootstrap 95% interval over images."""
    out: dict[str, float] = {}
    for statistic in STATISTICS:
        interval = bootstrap_statistic(values.double().numpy(), statistic, seed=seed)
        out.update({f"{measure}_{statistic}": interval.estimate, f"{measure}_{statistic}_low": interval.low, f"{measure}_{statistic}_high": interval.high})
    return out
