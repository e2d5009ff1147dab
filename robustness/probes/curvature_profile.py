"""Probe ``curvature_profile``: the eigenvalue spectrum of the input Hessian of the loss.

Goes beyond the report: the curvature profile of Moosavi-Dezfooli et al. (CURE, 2019). At each
of the first ``num_images`` test images, the ``k`` eigenvalues of largest magnitude of ``H``, the
Hessian of the cross-entropy (true label) with respect to the input, by Lanczos on
Hessian-vector products (``num_iter`` per image). The per-rank mean over images, sorted by
magnitude, is the profile: a robust model's is lower and falls off faster. With ``exact``
products a ReLU network's Hessian has rank at most ``num_classes - 1`` (its Gauss-Newton part),
so the profile drops to zero after that rank; ``finite_difference`` products at step ``h`` also
see the curvature that the change of linear regions produces.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from robustness import fingerprint
from robustness.errors import ConfigError
from robustness.geometry.hessian import InputHessian, top_eigenvalues
from robustness.tensors import inference_copy
from robustness.probes.base import ProbeContext, ProbeResult
from robustness.probes.hessian_norm import HessianOptions
from robustness.tensors import accuracy
from robustness.probes.per_image import load_images, require_positive_int, run_in_chunks
from robustness.registry import register


@dataclass(frozen=True)
class CurvatureProfileOptions(HessianOptions):
    probe: ClassVar[str] = "curvature_profile"

    num_images: int = 20
    k: int = 20
    num_iter: int | None = None

    def validate(self) -> None:
        super().validate()
        require_positive_int(self.probe, "k", self.k, "e.g. 20 eigenvalues per image")
        if self.num_iter is not None:
            require_positive_int(self.probe, "num_iter", self.num_iter, "e.g. 2k + 20; null picks min(input dimension, 2k + 20)")
            if self.num_iter < self.k:
                raise ConfigError(f"probe.num_iter ({self.num_iter}) must be at least probe.k ({self.k})", "Lanczos needs at least k iterations for k eigenvalues")

    def iterations(self, dimension: int) -> int:
        wanted = 2 * int(self.k) + 20 if self.num_iter is None else int(self.num_iter)
        return min(wanted, dimension)


def eigenvalues_per_image(model: nn.Module, x: Tensor, y: Tensor, image_ids: range | list[int], options: CurvatureProfileOptions, seed: int) -> dict[str, Tensor]:
    dimension = math.prod(x.shape[1:])
    k = min(int(options.k), dimension)
    # Products through a folded copy: the same function, faster (tensors.inference_copy).
    hessian = InputHessian(inference_copy(model, x[:1], for_gradients=True), x, y, options.estimator, options.h)
    values = top_eigenvalues(hessian, k, options.iterations(dimension), seed, list(image_ids))
    return {"eigenvalues": values}


@register("probe", "curvature_profile")
def compute(ctx: ProbeContext) -> ProbeResult:
    options = CurvatureProfileOptions.from_cfg(ctx.options)
    x, y = load_images(ctx, options)
    dimension = math.prod(x.shape[1:])
    if int(options.k) > dimension:
        raise ConfigError(f"probe.k={options.k} exceeds the input dimension {dimension}", f"use probe.k <= {dimension}")
    keys = ("split", "estimator", "h", "k", "num_iter")
    arrays: dict[str, Tensor] = {"labels": y.cpu()}
    rows: list[dict[str, Any]] = []
    for variant, model in ctx.models.items():
        identity = {**options.fingerprint(keys), "seed": ctx.seed, "images": fingerprint.of_tensors(x, y), "model": fingerprint.of_state(model)}
        measured = run_in_chunks(
            ctx.work_dir, f"curvature_profile-{variant}", identity, len(x), int(options.chunk_size),
            lambda a, b, model=model: eigenvalues_per_image(model, x[a:b], y[a:b], range(a, b), options, ctx.seed),
            lambda d, t, w, variant=variant: ctx.progress(d, t, f"Hessian eigenvalues {variant}"),
        )
        values = measured["eigenvalues"].double()
        arrays[f"{variant}/eigenvalues"] = values
        profile = values.mean(0)
        rows.append({
            "variant": variant,
            "lambda_1": float(profile[0]),
            "lambda_k": float(profile[-1]),
            "k": int(values.shape[1]),
            "sum_lambda_sq": float(values.pow(2).sum(1).mean()),
            "accuracy": accuracy(model, x, y),
            "images": int(len(values)),
        })
    meta = {
        "variants": list(ctx.models),
        "estimator": options.estimator,
        "h": float(options.h) if options.estimator == "finite_difference" else None,
        "method": f"Lanczos, {options.iterations(dimension)} iterations per image, {options.describe_products()}",
        "num_images": int(len(x)),
        "split": options.split,
        "seed": int(ctx.seed),
    }
    return ProbeResult("curvature_profile", arrays, {"curvature_profile": rows}, meta)
