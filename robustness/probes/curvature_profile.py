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
from pathlib import Path
from typing import Any, Sequence

from torch import Tensor, nn

from robustness import fingerprint
from robustness.errors import ConfigError
from robustness.geometry.hessian import InputHessian, top_eigenvalues
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
from robustness.tensors import accuracy, inference_copy


@probe_options("curvature_profile")
class CurvatureProfileOptions(HessianOptions):
    """The options of conf/probe/curvature_profile.yaml."""

    k: int
    num_iter: int | None

    def validate(self) -> None:
        super().validate()
        require_positive_int(self.defaults_from, "k", self.k, "e.g. 20 eigenvalues per image")
        if self.num_iter is not None:
            require_positive_int(self.defaults_from, "num_iter", self.num_iter, "e.g. 2k + 20; null picks min(input dimension, 2k + 20)")
            if self.num_iter < self.k:
                raise ConfigError(f"probe.num_iter ({self.num_iter}) must be at least probe.k ({self.k})", "Lanczos needs at least k iterations for k eigenvalues")

    def iterations(self, dimension: int) -> int:
        wanted = 2 * int(self.k) + 20 if self.num_iter is None else int(self.num_iter)
        return min(wanted, dimension)

    def memory_need(self, image_shape: Sequence[int], num_classes: int, activation: int, num_images: int | None) -> MemoryNeed:
        # Lanczos keeps its whole basis per image: num_iter vectors of the image's size.
        vectors = self.iterations(math.prod(int(s) for s in image_shape))
        per_image = self.hessian_bytes(image_shape, num_classes, activation, vectors=vectors)
        return self.images_need(image_shape, num_images, per_image, results_per_image=int(self.k) * LONG)


class CurvatureProfileResult(ProbeResult):
    """``rows``: per model the mean largest and k-th eigenvalue, the mean sum of squared eigenvalues,
    the accuracy; :meth:`eigenvalues`: the ``(images, k)`` eigenvalues of each image, by decreasing magnitude."""

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.tables["curvature_profile"]

    def eigenvalues(self, model: str = "model") -> Tensor:
        return self.arrays[f"{model}/eigenvalues"]


def eigenvalues_per_image(model: nn.Module, x: Tensor, y: Tensor, image_ids: range | list[int], options: CurvatureProfileOptions, seed: int) -> dict[str, Tensor]:
    dimension = math.prod(x.shape[1:])
    k = min(int(options.k), dimension)
    # Products through a folded copy: the same function, faster (tensors.inference_copy).
    hessian = InputHessian(inference_copy(model, x[:1], for_gradients=True), x, y, options.estimator, options.h)
    values = top_eigenvalues(hessian, k, options.iterations(dimension), seed, list(image_ids))
    return {"eigenvalues": values}


def curvature_profile(models: Any, images: Tensor, labels: Tensor, *, seed: int | None = None, cache_dir: str | Path | None = None,
                      progress: Progress = no_progress, **options: Any) -> CurvatureProfileResult:
    """The ``k`` largest-magnitude eigenvalues of the loss's input Hessian at each of the first ``num_images`` images, per model.

    options: those of ``conf/probe/curvature_profile.yaml`` (its values are the defaults).
    seed: each image's Lanczos start vector (default: ``conf/config.yaml``'s seed).
    """
    settings = CurvatureProfileOptions.from_cfg(options)
    named, x, y, classes = prepare_inputs(models, images, labels)
    x, y = first(x, y, settings.num_images)
    dimension = math.prod(x.shape[1:])
    if int(settings.k) > dimension:
        raise ConfigError(f"probe.k={settings.k} exceeds the input dimension {dimension}", f"use probe.k <= {dimension}")
    settings = fitted(settings, named, x, classes)
    seed = run_seed(seed)
    keys = ("split", "estimator", "h", "k", "num_iter")
    arrays: dict[str, Tensor] = {"labels": y.cpu()}
    rows: list[dict[str, Any]] = []
    with seeded(seed, x.device):
        for variant, model in named.items():
            identity = {**settings.fingerprint(keys), "seed": seed, "images": fingerprint.of_tensors(x, y), "model": fingerprint.of_state(model)}
            measured = run_in_chunks(
                PartialResults(None if cache_dir is None else Path(cache_dir), "curvature_profile", identity), len(x), int(settings.chunk_size),
                lambda a, b, model=model: eigenvalues_per_image(model, x[a:b], y[a:b], range(a, b), settings, seed),
                lambda done, total, variant=variant: progress(done, total, f"Hessian eigenvalues {variant}"),
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
        "variants": list(named),
        "estimator": settings.estimator,
        "h": float(settings.h) if settings.estimator == "finite_difference" else None,
        "method": f"Lanczos, {settings.iterations(dimension)} iterations per image, {settings.describe_products()}",
        "num_images": int(len(x)),
        "split": settings.split,
        "seed": int(seed),
    }
    return CurvatureProfileResult("curvature_profile", arrays, {"curvature_profile": rows}, meta)


@register("probe", "curvature_profile", options=CurvatureProfileOptions)
def compute(ctx: ProbeContext) -> ProbeResult:
    options = CurvatureProfileOptions.from_cfg(ctx.options)
    x, y = load_images(ctx, options.split, options.num_images)
    return curvature_profile(ctx.models, x, y, **ctx.common(), **ctx.options)
