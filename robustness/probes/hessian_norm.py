"""Probe ``hessian_norm``: the first column of the report's Table 1.

At each image (the same images for every model), a Monte-Carlo estimate of ``||H||_F^2``, ``H``
the Hessian of the cross-entropy loss (under the image's true label) with respect to the input
pixels: the mean of ``||H v||^2`` over ``num_samples`` standard Gaussian ``v``, drawn per image
from ``(seed, image index)`` so every model meets the same directions. Hessian-vector products
are ``exact`` (double backward; on a ReLU network this is the Gauss-Newton curvature
``J^T (diag p - p p^T) J``, the logits being piecewise linear, and the products are then taken
from the logit Jacobian ``J`` itself) or ``finite_difference`` with step length ``h`` (CURE's
view, which also sees the change of linear regions within ``h``). See
:mod:`robustness.geometry.hessian`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from robustness import fingerprint
from robustness.errors import ConfigError
from robustness.geometry.hessian import InputHessian, frobenius_norm_sq
from robustness.probes.base import (
    Progress,
    ProbeContext,
    ProbeResult,
    fitted,
    no_progress,
    prepare_inputs,
    probe_options,
    run_seed,
    seeded,
)
from robustness.probes.memory import LONG, MemoryNeed
from robustness.probes.partial import PartialResults, run_in_chunks
from robustness.probes.per_image import HessianOptions, first, load_images, require_positive_int
from robustness.registry import register
from robustness.stats import mean_and_stderr
from robustness.tensors import accuracy, inference_copy


@probe_options("hessian_norm")
class HessianNormOptions(HessianOptions):
    """The options of conf/probe/hessian_norm.yaml."""

    num_samples: int

    def validate(self) -> None:
        super().validate()
        require_positive_int(self.defaults_from, "num_samples", self.num_samples, "e.g. 256")
        if int(self.num_samples) < 2:
            raise ConfigError(f"probe.num_samples must be at least 2, got {self.num_samples}", "a standard error needs two samples; e.g. 256")

    def describe(self) -> str:
        return f"Monte-Carlo mean of ||Hv||^2 over {int(self.num_samples)} Gaussian v per image, {self.describe_products()}"

    def memory_need(self, image_shape: Sequence[int], num_classes: int, activation: int, num_images: int | None) -> MemoryNeed:
        per_image = self.hessian_bytes(image_shape, num_classes, activation, vectors=1) + int(self.num_samples) * LONG
        return self.images_need(image_shape, num_images, per_image, results_per_image=2 * LONG)


class HessianNormResult(ProbeResult):
    """``rows``: per model the mean (with its standard error over images), median and Monte-Carlo
    error of ``||H||_F^2``, the accuracy on the images and their count; :meth:`per_image`: the
    per-image estimates ``fro2`` and their Monte-Carlo standard errors ``fro2_stderr``."""

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.tables["hessian_norm"]

    def per_image(self, model: str = "model") -> dict[str, Tensor]:
        return {key: self.arrays[f"{model}/{key}"] for key in ("fro2", "fro2_stderr")}


_HESSIAN_KEYS = ("split", "estimator", "h", "num_samples")


def hessian_norm_per_image(model: nn.Module, x: Tensor, y: Tensor, image_ids: range | list[int], options: HessianNormOptions, seed: int) -> dict[str, Tensor]:
    """Per-image ``||H||_F^2`` estimate (``fro2``) and its Monte-Carlo standard error (``fro2_stderr``)."""
    # Products through a folded copy: the same function, faster (tensors.inference_copy).
    hessian = InputHessian(inference_copy(model, x[:1], for_gradients=True), x, y, options.estimator, options.h)
    estimate = frobenius_norm_sq(hessian, int(options.num_samples), seed, list(image_ids))
    return {"fro2": estimate.mean, "fro2_stderr": estimate.stderr}


def measure_hessian_norm(model: nn.Module, x: Tensor, y: Tensor, options: HessianNormOptions, seed: int,
                         cache_dir: Path | None, progress: Progress, what: str) -> dict[str, Tensor]:
    """:func:`hessian_norm_per_image` over all images, chunk by chunk, each chunk kept in ``cache_dir``."""
    identity = {**options.fingerprint(_HESSIAN_KEYS), "seed": seed, "images": fingerprint.of_tensors(x, y), "model": fingerprint.of_state(model)}

    def chunk(start: int, stop: int) -> dict[str, Tensor]:
        return hessian_norm_per_image(model, x[start:stop], y[start:stop], range(start, stop), options, seed)

    parts = PartialResults(cache_dir, "hessian_norm", identity)
    return run_in_chunks(parts, len(x), int(options.chunk_size), chunk, lambda done, total: progress(done, total, f"||H||_F^2 {what}"))


def hessian_norm_row(variant: str, measured: dict[str, Tensor]) -> dict[str, Any]:
    mean, stderr = mean_and_stderr(measured["fro2"])
    return {
        "variant": variant,
        "fro2_mean": mean,
        "fro2_stderr": stderr,
        # The midpoint of the two middle values for an even count, as numpy and Table 1's interval use.
        "fro2_median": float(torch.nanquantile(measured["fro2"].double(), 0.5)),
        "mc_stderr_mean": float(measured["fro2_stderr"].double().mean()),
        "images": int(len(measured["fro2"])),
    }


def hessian_norm(models: Any, images: Tensor, labels: Tensor, *, seed: int | None = None, cache_dir: str | Path | None = None,
                 progress: Progress = no_progress, **options: Any) -> HessianNormResult:
    """``||H||_F^2`` of the loss's input Hessian at each of the first ``num_images`` images, per model.

    models: an ``nn.Module`` in eval mode, or a dict of named ones; images in [0, 1] and their labels.
    options: those of ``conf/probe/hessian_norm.yaml`` (its values are the defaults).
    seed: names each image's random directions (default: ``conf/config.yaml``'s seed).
    cache_dir: where finished chunks are kept, so a rerun resumes (None: nothing is kept).
    """
    settings = HessianNormOptions.from_cfg(options)
    named, x, y, classes = prepare_inputs(models, images, labels)
    x, y = first(x, y, settings.num_images)
    settings = fitted(settings, named, x, classes)
    seed = run_seed(seed)
    arrays: dict[str, Tensor] = {"labels": y.cpu()}
    rows = []
    with seeded(seed, x.device):
        for variant, model in named.items():
            measured = measure_hessian_norm(model, x, y, settings, seed, None if cache_dir is None else Path(cache_dir), progress, variant)
            arrays.update({f"{variant}/{key}": value for key, value in measured.items()})
            rows.append({**hessian_norm_row(variant, measured), "accuracy": accuracy(model, x, y)})
    meta = {
        "variants": list(named),
        "estimator": settings.estimator,
        "h": float(settings.h) if settings.estimator == "finite_difference" else None,
        "num_samples": int(settings.num_samples),
        "num_images": int(len(x)),
        "split": settings.split,
        "method": settings.describe(),
        "seed": int(seed),
    }
    return HessianNormResult("hessian_norm", arrays, {"hessian_norm": rows}, meta)


@register("probe", "hessian_norm", options=HessianNormOptions)
def compute(ctx: ProbeContext) -> ProbeResult:
    options = HessianNormOptions.from_cfg(ctx.options)
    x, y = load_images(ctx, options.split, options.num_images)
    return hessian_norm(ctx.models, x, y, **ctx.common(), **ctx.options)
