"""Probe ``random_plane``: class regions in random planes through test images.

Reproduces the measurements behind the report's Figure 3 (initial vs adversarially trained model)
and Figure 4, right (CURE model): two random orthonormal directions, drawn from one seed so that
every model sees the same plane, span a square around the sample; every grid point is classified.
The table counts the distinct classes on the square and the share of it that keeps the sample's
class: a regular decision function shows few, wide regions.

The figure shows one fixed sample (``sample_index``). So that a claim does not rest on one image,
the same measurement is repeated at each of the first ``num_images`` images of the split, each in
its own random plane (seeded by ``(direction_seed, image index)``, the same for every model) on a
``stats_resolution`` grid; those per-image values are ``tables["per_image"]`` and the arrays
``{variant}/per_image/<key>``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn

from robustness import fingerprint
from robustness.errors import ConfigError, InputError
from robustness.geometry.planes import classify_plane, direction_pair, image_seed, region_statistics
from robustness.probes.base import ProbeContext, ProbeOptions, ProbeResult
from robustness.probes.per_image import require_positive_int, run_in_chunks
from robustness.tensors import inference_copy, predict
from robustness.registry import register

# Per-image measurements of one chunk of images: (model, images, labels, image indices) -> tensors.
PerImageFn = Callable[[nn.Module, Tensor, Tensor, list[int]], dict[str, Tensor]]


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
    batch_size: int = 256
    num_images: int = 50
    stats_resolution: int = 101
    chunk_size: int = 25

    def validate(self) -> None:
        where = f"probe.{{}} of {self.probe}"
        for key, hint in (("resolution", "the report's figures use 201"), ("stats_resolution", "the per-image statistics use 101")):
            value = getattr(self, key)
            if int(value) < 3:
                raise ConfigError(f"{where.format(key)} must be at least 3, got {value}", hint)
            if int(value) % 2 == 0:
                raise ConfigError(
                    f"{where.format(key)} must be odd, got {value}",
                    f"use {int(value) + 1}: an odd grid puts the sample exactly on a grid point",
                )
        require_positive_int(self.probe, "num_images", self.num_images, "the report's statistics use 50 test images")
        require_positive_int(self.probe, "chunk_size", self.chunk_size, "e.g. 25; a finished chunk is kept when a run is interrupted")
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
        "stats_resolution": int(options.stats_resolution),
    }


def measure_per_image(ctx: ProbeContext, options: PlaneOptions, measure: PerImageFn, what: str) -> tuple[Tensor, Tensor, dict[str, dict[str, Tensor]]]:
    """``measure`` at each of the first ``num_images`` images for every model, resumable chunk by chunk.

    Returns the images' labels, their indices in the split, and per variant the measured tensors
    (one value per image). Chunks are kept in ``ctx.work_dir`` under a fingerprint of the options,
    the attack, the images and the model's weights.
    """
    x, y = ctx.data.split_tensors(options.split, limit=int(options.num_images))
    if len(x) == 0:
        raise ConfigError(f"the {options.split} split has no images", "pick another probe.split")
    x, y = x.to(ctx.device), y.to(ctx.device)
    settings = {k: v for k, v in asdict(options).items() if k not in ("sample_index", "resolution", "batch_size", "chunk_size")}
    measured: dict[str, dict[str, Tensor]] = {}
    for variant, model in ctx.models.items():
        identity = {"probe": options.probe, "options": settings, "attack": dict(ctx.attack), "images": fingerprint.of_tensors(x, y), "model": fingerprint.of_state(model)}

        def chunk(start: int, stop: int, model: nn.Module = model) -> dict[str, Tensor]:
            return measure(model, x[start:stop], y[start:stop], list(range(start, stop)))

        # Kept per model, not per list of variants: the identity names the model by its weights.
        measured[variant] = run_in_chunks(
            ctx.shared_dir or ctx.work_dir, options.probe, identity, len(x), int(options.chunk_size), chunk,
            lambda done, total, _, variant=variant: ctx.progress(done, total, f"{what} of {variant}, per image"),
        )
    return y.cpu(), torch.arange(len(x)), measured


def per_image_outputs(
    labels: Tensor, indices: Tensor, measured: dict[str, dict[str, Tensor]], columns: tuple[str, ...]
) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    """The per-image arrays (``per_image/index``, ``per_image/label``, ``{variant}/per_image/<key>``) and table rows."""
    arrays: dict[str, Tensor] = {"per_image/index": indices, "per_image/label": labels}
    rows: list[dict[str, Any]] = []
    for variant, values in measured.items():
        arrays.update({f"{variant}/per_image/{key}": value for key, value in values.items()})
        for i in range(len(indices)):
            row: dict[str, Any] = {
                "variant": variant,
                "image": int(indices[i]),
                # Class indices, not names: a label may lie outside the class list (toy data).
                "true_label": int(labels[i]),
                "predicted_label": int(values["predicted"][i]),
            }
            for key in columns:
                value = values[key][i]
                row[key] = bool(value) if value.dtype == torch.bool else (int(value) if not value.is_floating_point() else float(value))
            rows.append(row)
    return arrays, rows


def region_statistics_per_image(options: PlaneOptions) -> PerImageFn:
    """Per image: its own random plane (seed ``(direction_seed, index)``) on a ``stats_resolution`` grid."""

    def measure(model: nn.Module, x: Tensor, y: Tensor, image_ids: list[int]) -> dict[str, Tensor]:
        fast = inference_copy(model, x[:1])  # one image checks the copy; the chunk would cost two more forwards
        predicted = predict(fast, x)
        area = torch.full((len(x),), float("nan"), dtype=torch.float64)
        classes = torch.zeros(len(x), dtype=torch.long)
        for i, index in enumerate(image_ids):
            norm = float(x[i].norm())
            if norm == 0.0:
                continue  # an all-zero image has no scale for the plane: no value, not an error
            u, v = direction_pair(x[i].shape, image_seed(options.direction_seed, index))
            coords = torch.linspace(-float(options.extent) * norm, float(options.extent) * norm, int(options.stats_resolution), device=x.device)
            grid = classify_plane(fast, x[i], u.to(x), v.to(x), coords, coords, batch_size=int(options.batch_size), clamp=bool(options.clamp))
            stats = region_statistics(grid, int(predicted[i]))
            area[i], classes[i] = stats.area_fraction, stats.num_classes
        return {"predicted": predicted.cpu(), "area_fraction": area, "num_classes": classes}

    return measure


@register("probe", "random_plane")
def compute(ctx: ProbeContext) -> ProbeResult:
    options = PlaneOptions.from_cfg(ctx.options)
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
        fast = inference_copy(model, x0.unsqueeze(0))
        label = predicted[variant] = int(predict(fast, x0.unsqueeze(0))[0])
        labels = classify_plane(fast, x0, u, v, coords, coords, batch_size=int(options.batch_size), clamp=bool(options.clamp))
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

    labels, indices, measured = measure_per_image(ctx, options, region_statistics_per_image(options), "random planes")
    per_image_arrays, per_image_rows = per_image_outputs(labels, indices, measured, ("area_fraction", "num_classes"))
    arrays.update(per_image_arrays)

    meta = sample_meta(ctx, options, true_label)
    meta.update(
        {
            "half_width": half_width,
            "image_norm": image_norm,
            "predicted_label": predicted,
            "num_images": int(len(indices)),
            "methods": (
                f"Two orthonormal directions are Gaussian draws from seed {int(options.direction_seed)} (Gram-Schmidt), the same "
                f"for every model; the square of half-width {float(options.extent):g} x the image's l2 norm is classified on a "
                f"{int(options.resolution)}x{int(options.resolution)} grid ({'points clipped to [0, 1]' if options.clamp else 'points evaluated as they are, unclipped'}). "
                f"The per-image statistics repeat this at each of the first {int(len(indices))} {options.split} images, each in its own "
                f"random plane (seeded by the direction seed and the image's index, the same for every model) on a "
                f"{int(options.stats_resolution)}x{int(options.stats_resolution)} grid; the area fraction is the share of grid points "
                "that keep the model's predicted class of the image."
            ),
        }
    )
    return ProbeResult(probe="random_plane", arrays=arrays, tables={"regions": rows, "per_image": per_image_rows}, meta=meta)
