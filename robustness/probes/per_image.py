"""Shared by the probes that measure something at each of the first N images.

``hessian_norm``, ``min_perturbation``, ``curvature_profile``, ``table1`` and ``perceptual``
take the same images (the first ``num_images`` of a split, identical for every model variant),
compute one result per image in chunks of ``chunk_size``, and keep each finished chunk
(:mod:`robustness.probes.partial`), so that an interrupted probe resumes where it stopped.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from torch import Tensor

from robustness.errors import ConfigError
from robustness.geometry.hessian import ESTIMATORS
from robustness.probes.base import ProbeContext, ProbeOptions, per_item_bytes
from robustness.probes.memory import FLOAT, LONG, MemoryNeed, image_bytes, size_text


class PerImageOptions(ProbeOptions):
    """Which images, and how many per chunk (see conf/probe/hessian_norm.yaml for the meaning)."""

    num_images: int
    split: str
    chunk_size: int

    def validate(self) -> None:
        require_positive_int(self.defaults_from, "num_images", self.num_images, "the report uses 100")
        require_positive_int(self.defaults_from, "chunk_size", self.chunk_size, "e.g. 25; a finished chunk is kept when a run is interrupted")
        if self.split not in ("train", "val", "test"):
            raise ConfigError(f"probe.split must be train, val or test, got '{self.split}'", "the report uses test images")

    def fingerprint(self, keys: tuple[str, ...]) -> dict[str, Any]:
        values = self.as_dict()
        return {key: values[key] for key in keys}

    def held_images(self, num_images: int | None) -> int:
        """Images the probe holds: those given, else as many as its options ask for."""
        if num_images is not None:
            return int(num_images)
        return 0 if self.num_images is None else int(self.num_images)

    def images_need(self, image_shape: Sequence[int], num_images: int | None, per_item: int, results_per_image: int = 0) -> MemoryNeed:
        """Images and per-image results held, then a chunk of ``per_item`` bytes per image."""
        held = self.held_images(num_images)
        return MemoryNeed(
            fixed=held * (image_bytes(image_shape) + results_per_image),
            per_item=per_item,
            batch=int(self.chunk_size),
            batch_key="chunk_size",
            fixed_what=f"{held} images of shape {tuple(image_shape)}",
            fixed_fix=lambda usable: f"probe fewer images (probe.num_images); {size_text(usable)} can hold about "
                                     f"{usable // max(1, image_bytes(image_shape) + results_per_image + per_item)}",
        )


class HessianOptions(PerImageOptions):
    """How Hessian-vector products are taken (shared by hessian_norm, curvature_profile, table1)."""

    estimator: str
    h: float

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

    def hessian_bytes(self, image_shape: Sequence[int], num_classes: int, activation: int, vectors: int) -> int:
        """One image's Hessian products: its logit Jacobian (a row per class), ``vectors`` probe
        vectors at a time and their products (float64 where accumulated), and the double backward's activations."""
        dimension = math.prod(int(s) for s in image_shape)
        return per_item_bytes(image_shape, activation, gradients=True) * 2 + dimension * (num_classes * FLOAT + 2 * vectors * LONG)


def require_positive_int(probe: str, key: str, value: Any, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"probe.{key} of {probe} must be a positive integer, got {value}", hint)


def load_images(ctx: ProbeContext, split: str, count: int | None) -> tuple[Tensor, Tensor]:
    """The first ``count`` images of the split (all for None) and their labels, on ``ctx.device``:
    what a stage adapter hands its probe function."""
    x, y = ctx.data.split_tensors(split, limit=None if count is None else int(count))
    if len(x) == 0:
        raise ConfigError(f"the {split} split has no images", "pick another probe.split")
    return x.to(ctx.device), y.to(ctx.device)


def first(images: Tensor, labels: Tensor | None, count: int | None) -> tuple[Tensor, Tensor | None]:
    """The first ``count`` of the images handed to a probe function (all for None)."""
    if count is None:
        return images, labels
    return images[: int(count)], None if labels is None else labels[: int(count)]
