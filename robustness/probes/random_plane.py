"""Probe ``random_plane``: class regions in a random plane through one fixed test image.

Reproduces the measurements behind the report's Figure 3 (initial vs adversarially trained model)
and Figure 4, right (CURE model): two random orthonormal directions, drawn from one seed so that
every model sees the same plane, span a square around the sample; every grid point is classified.
The table counts the distinct classes on the square and the share of it that keeps the sample's
class: a regular decision function shows few, wide regions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from robustness.errors import ConfigError, InputError
from robustness.geometry.planes import classify_plane, direction_pair, region_statistics
from robustness.probes.base import ProbeContext, ProbeOptions, ProbeResult
from robustness.tensors import predict
from robustness.registry import register



@dataclass(frozen=True)
class PlaneOptions(ProbeOptions):
    """Options shared by the plane probes (see conf/probe/random_plane.yaml for their meaning).

    ``extent`` is the half-width of the square; its unit depends on the probe (here: the l2 norm of
    the sample, so the same setting suits 8x8 digits and 64x64 colour images).
    """

    probe: ClassVar[str] = "random_plane"

    split: str = "test"
    sample_index: int = 0
    direction_seed: int = 0
    resolution: int = 201
    extent: float = 1.0
    clamp: bool = False
    batch_size: int = 1024

    def validate(self) -> None:
        where = f"probe.{{}} of {self.probe}"
        if int(self.resolution) < 3:
            raise ConfigError(f"{where.format('resolution')} must be at least 3, got {self.resolution}", "the report's figures use 201")
        if int(self.resolution) % 2 == 0:
            raise ConfigError(
                f"{where.format('resolution')} must be odd, got {self.resolution}",
                f"use {int(self.resolution) + 1}: an odd grid puts the sample exactly on a grid point",
            )
        if not float(self.extent) > 0:
            raise ConfigError(f"{where.format('extent')} must be positive, got {self.extent}")
        if int(self.batch_size) <= 0:
            raise ConfigError(f"{where.format('batch_size')} must be positive, got {self.batch_size}", "e.g. probe.batch_size=1024")
        if int(self.sample_index) < 0:
            raise ConfigError(f"{where.format('sample_index')} must be >= 0, got {self.sample_index}")


def load_sample(ctx: ProbeContext, options: PlaneOptions) -> tuple[Tensor, int]:
    """The fixed sample (image without batch dimension, on ``ctx.device``) and its true label."""
    x, y = ctx.data.split_tensors(options.split, indices=[int(options.sample_index)])
    return x[0].to(ctx.device), int(y[0])


def sample_meta(ctx: ProbeContext, options: PlaneOptions, true_label: int) -> dict[str, Any]:
    """Metadata both plane probes record: which sample, which plane, how points were evaluated."""
    return {
        "variants": list(ctx.models),
        "class_names": list(ctx.data.info.class_names),
        "dataset": ctx.data.info.name,
        "split": options.split,
        "sample_index": int(options.sample_index),
        "true_label": true_label,
        "direction_seed": int(options.direction_seed),
        "resolution": int(options.resolution),
        "extent": float(options.extent),
        "clamp": bool(options.clamp),
    }


@register("probe", "random_plane")
def compute(ctx: ProbeContext) -> ProbeResult:
    options = PlaneOptions.from_cfg(ctx.cfg)
    x0, true_label = load_sample(ctx, options)
    image_norm = float(x0.norm())
    if image_norm == 0.0:
        raise InputError(
            f"{options.split} image #{options.sample_index} is all zeros, and the plane's extent is measured in its l2 norm",
            "pick another probe.sample_index",
        )
    u, v = direction_pair(x0.shape, options.direction_seed)
    u, v = u.to(x0), v.to(x0)
    half_width = float(options.extent) * image_norm
    coords = torch.linspace(-half_width, half_width, int(options.resolution), device=x0.device)

    class_names = ctx.data.info.class_names
    arrays: dict[str, Tensor] = {"x0": x0.cpu(), "u": u.cpu(), "v": v.cpu(), "coords": coords.cpu()}
    rows: list[dict[str, Any]] = []
    predicted: dict[str, int] = {}
    for done, (variant, model) in enumerate(ctx.models.items()):
        label = predicted[variant] = int(predict(model, x0.unsqueeze(0))[0])
        labels = classify_plane(model, x0, u, v, coords, coords, batch_size=int(options.batch_size), clamp=bool(options.clamp))
        stats = region_statistics(labels, label)
        arrays[f"{variant}/labels"] = labels.cpu()
        rows.append(
            {
                "variant": variant,
                "sample_class": class_names[label],
                "num_classes": stats.num_classes,
                "area_fraction": stats.area_fraction,
            }
        )
        ctx.progress(done + 1, len(ctx.models), f"random plane of {variant}")

    meta = sample_meta(ctx, options, true_label)
    meta.update({"half_width": half_width, "image_norm": image_norm, "predicted_label": predicted})
    return ProbeResult(probe="random_plane", arrays=arrays, tables={"regions": rows}, meta=meta)
