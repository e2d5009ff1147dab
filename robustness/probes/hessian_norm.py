"""Probe ``hessian_norm``: the first column of the report's Table 1.

At each of the first ``num_images`` test images (the same images for every model), a
Monte-Carlo estimate of ``||H||_F^2``, ``H`` the Hessian of the cross-entropy loss (under the
image's true label) with respect to the input pixels: the mean of ``||H v||^2`` over
``num_samples`` standard Gaussian ``v``, drawn per image from ``(seed, image index)`` so every
model meets the same directions. Hessian-vector products are ``exact`` (double backward; on a
ReLU network this is the Gauss-Newton curvature ``J^T (diag p - p p^T) J``, the logits being
piecewise linear, and the products are then taken from the logit Jacobian ``J`` itself) or ``finite_difference`` with step length ``h`` (CURE's view, which also sees
the change of linear regions within ``h``). See :mod:`robustness.geometry.hessian`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from robustness import fingerprint
from robustness.errors import ConfigError
from robustness.geometry.hessian import ESTIMATORS, InputHessian, frobenius_norm_sq
from robustness.probes.base import ProbeContext, ProbeResult
from robustness.stats import mean_and_stderr
from robustness.tensors import accuracy, inference_copy
from robustness.probes.per_image import PerImageOptions, require_positive_int, load_images, run_in_chunks
from robustness.registry import register


@dataclass(frozen=True)
class HessianOptions(PerImageOptions):
    """How Hessian-vector products are taken (shared by hessian_norm, curvature_profile, table1)."""

    probe: ClassVar[str] = "hessian_norm"

    estimator: str = "exact"
    h: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"probe.estimator must be one of {', '.join(ESTIMATORS)}, got '{self.estimator}'", "exact is double backward; finite_difference uses probe.h")
        if not (isinstance(self.h, (int, float)) and math.isfinite(self.h) and self.h > 0):
            raise ConfigError(f"probe.h must be a positive number, got {self.h}", "the finite-difference step length in [0, 1] pixel space, e.g. 1.0 as in CURE")

    def describe_products(self) -> str:
        if self.estimator == "exact":
            return "exact Hessian-vector products (double backward, or from the logit Jacobian where the network is piecewise linear)"
        return f"finite-difference Hessian-vector products with step h={self.h:g}"


@dataclass(frozen=True)
class HessianNormOptions(HessianOptions):
    num_samples: int = 256

    def validate(self) -> None:
        super().validate()
        require_positive_int(self.probe, "num_samples", self.num_samples, "e.g. 256")
        if int(self.num_samples) < 2:
            raise ConfigError(f"probe.num_samples must be at least 2, got {self.num_samples}", "a standard error needs two samples; e.g. 256")

    def describe(self) -> str:
        return f"Monte-Carlo mean of ||Hv||^2 over {int(self.num_samples)} Gaussian v per image, {self.describe_products()}"


_HESSIAN_KEYS = ("split", "estimator", "h", "num_samples")


def hessian_norm_per_image(model: nn.Module, x: Tensor, y: Tensor, image_ids: range | list[int], options: HessianNormOptions, seed: int) -> dict[str, Tensor]:
    """Per-image ``||H||_F^2`` estimate (``fro2``) and its Monte-Carlo standard error (``fro2_stderr``)."""
    # Products through a folded copy: the same function, faster (tensors.inference_copy).
    hessian = InputHessian(inference_copy(model, x[:1], for_gradients=True), x, y, options.estimator, options.h)
    estimate = frobenius_norm_sq(hessian, int(options.num_samples), seed, list(image_ids))
    return {"fro2": estimate.mean, "fro2_stderr": estimate.stderr}


def measure_hessian_norm(ctx: ProbeContext, variant: str, model: nn.Module, x: Tensor, y: Tensor, options: HessianNormOptions) -> dict[str, Tensor]:
    """:func:`hessian_norm_per_image` over all images, resumable chunk by chunk from ``ctx.work_dir``."""
    identity = {**options.fingerprint(_HESSIAN_KEYS), "seed": ctx.seed, "images": fingerprint.of_tensors(x, y), "model": fingerprint.of_state(model)}

    def chunk(start: int, stop: int) -> dict[str, Tensor]:
        return hessian_norm_per_image(model, x[start:stop], y[start:stop], range(start, stop), options, ctx.seed)

    return run_in_chunks(ctx.work_dir, f"hessian_norm-{variant}", identity, len(x), int(options.chunk_size), chunk, lambda d, t, w: ctx.progress(d, t, f"||H||_F^2 {variant}"))


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


@register("probe", "hessian_norm")
def compute(ctx: ProbeContext) -> ProbeResult:
    options = HessianNormOptions.from_cfg(ctx.options)
    x, y = load_images(ctx, options)
    arrays: dict[str, Tensor] = {"labels": y.cpu()}
    rows = []
    for variant, model in ctx.models.items():
        measured = measure_hessian_norm(ctx, variant, model, x, y, options)
        arrays.update({f"{variant}/{key}": value for key, value in measured.items()})
        rows.append({**hessian_norm_row(variant, measured), "accuracy": accuracy(model, x, y)})
    meta = {
        "variants": list(ctx.models),
        "estimator": options.estimator,
        "h": float(options.h) if options.estimator == "finite_difference" else None,
        "num_samples": int(options.num_samples),
        "num_images": int(len(x)),
        "split": options.split,
        "method": options.describe(),
        "seed": int(ctx.seed),
    }
    return ProbeResult("hessian_norm", arrays, {"hessian_norm": rows}, meta)
