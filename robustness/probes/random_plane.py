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

from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import Tensor, nn

from robustness import fingerprint
from robustness.errors import ConfigError, InputError
from robustness.geometry.planes import classify_plane, direction_pair, image_seed, region_statistics
from robustness.probes.base import (
    Progress,
    ProbeContext,
    ProbeOptions,
    ProbeResult,
    class_name,
    fitted,
    no_progress,
    per_item_bytes,
    prepare_inputs,
    probe_options,
    run_seed,
    seeded,
)
from robustness.probes.memory import LONG, MemoryNeed, grid_need, image_bytes, largest_odd_grid, size_text
from robustness.probes.partial import PartialResults, run_in_chunks
from robustness.probes.per_image import load_images, require_positive_int
from robustness.registry import register
from robustness.tensors import inference_copy, predict

# Per-image measurements of one chunk of images: (model, images, labels, image indices) -> tensors.
PerImageFn = Callable[[nn.Module, Tensor, Tensor, list[int]], dict[str, Tensor]]


class PlaneOptions(ProbeOptions):
    """Options shared by the plane probes (see conf/probe/random_plane.yaml for their meaning).

    ``extent`` is the half-width of the square; its unit depends on the probe (here: the l2 norm of
    the sample, so the same setting suits 8x8 digits and 64x64 colour images).
    """

    split: str
    sample_index: int
    direction_seed: int
    resolution: int
    extent: float
    clamp: bool
    batch_size: int
    num_images: int
    stats_resolution: int
    chunk_size: int

    def validate(self) -> None:
        where = f"probe.{{}} of {self.defaults_from}"
        for key, hint in (("resolution", "the report's figures use 201"), ("stats_resolution", "the per-image statistics use 101")):
            value = getattr(self, key)
            if int(value) < 3:
                raise ConfigError(f"{where.format(key)} must be at least 3, got {value}", hint)
            if int(value) % 2 == 0:
                raise ConfigError(
                    f"{where.format(key)} must be odd, got {value}",
                    f"use {int(value) + 1}: an odd grid puts the sample exactly on a grid point",
                )
        require_positive_int(self.defaults_from, "num_images", self.num_images, "the report's statistics use 50 test images")
        require_positive_int(self.defaults_from, "chunk_size", self.chunk_size, "e.g. 25; a finished chunk is kept when a run is interrupted")
        if not float(self.extent) > 0:
            raise ConfigError(f"{where.format('extent')} must be positive, got {self.extent}")
        if int(self.batch_size) <= 0:
            raise ConfigError(f"{where.format('batch_size')} must be positive, got {self.batch_size}", "e.g. probe.batch_size=1024")
        if int(self.sample_index) < 0:
            raise ConfigError(f"{where.format('sample_index')} must be >= 0, got {self.sample_index}")

    def images_wanted(self) -> int:
        """Images the probe reads from the start of a split: the per-image ones and the figure's sample."""
        return max(int(self.num_images), int(self.sample_index) + 1)

    def memory_need(self, image_shape: Sequence[int], num_classes: int, activation: int, num_images: int | None) -> MemoryNeed:
        # The largest grid held at once (the figure's, or one image's statistics grid), the
        # images, then a batch of grid points through the model; the attack of the boundary
        # plane probe works on one image or one chunk, far less.
        largest = max(int(self.resolution), int(self.stats_resolution))
        key = "resolution" if int(self.resolution) >= int(self.stats_resolution) else "stats_resolution"
        held = self.images_wanted() if num_images is None else int(num_images)
        images = held * (image_bytes(image_shape) + 4 * LONG)
        return MemoryNeed(
            fixed=grid_need(largest) + images,
            per_item=per_item_bytes(image_shape, activation, gradients=False),
            batch=int(self.batch_size),
            batch_key="batch_size",
            fixed_what=f"a {largest}x{largest} grid and {held} images",
            fixed_fix=lambda usable: f"use probe.{key}={min(largest_odd_grid(usable, images), largest - 2)} or less "
                                     f"(the report's figures use 201; {size_text(usable)} can be used)",
        )


@probe_options("random_plane")
class RandomPlaneOptions(PlaneOptions):
    """The options of conf/probe/random_plane.yaml."""


class PlaneResult(ProbeResult):
    """What both plane probes return. ``rows``: one row per model at the figure's sample;
    ``per_image_rows``: one row per model and image; :meth:`labels`: a model's grid of predicted
    classes at the sample (``resolution`` x ``resolution``, rows along the first direction)."""

    main_table: ClassVar[str] = ""

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.tables[self.main_table]

    @property
    def per_image_rows(self) -> list[dict[str, Any]]:
        return self.tables["per_image"]

    def labels(self, model: str = "model") -> Tensor:
        return self.arrays[f"{model}/labels"]

    def per_image(self, model: str = "model") -> dict[str, Tensor]:
        prefix = f"{model}/per_image/"
        return {key[len(prefix):]: value for key, value in self.arrays.items() if key.startswith(prefix)}


class RandomPlaneResult(PlaneResult):
    """``rows`` (table ``regions``): per model the sample's class, the number of classes on the square
    and the share of it that keeps the sample's class; per image the same in each image's own plane."""

    main_table = "regions"


def sample_of(x: Tensor, y: Tensor, options: PlaneOptions) -> tuple[Tensor, int]:
    """The figure's sample (image without batch dimension) and its label."""
    index = int(options.sample_index)
    if index >= len(x):
        raise ConfigError(f"probe.sample_index {index} is outside the {len(x)} images given", f"pick an index below {len(x)}")
    return x[index], int(y[index])


def sample_meta(names: Sequence[str], options: PlaneOptions, true_label: int, class_names: Sequence[str], dataset: str) -> dict[str, Any]:
    """Metadata both plane probes record: which sample, which plane, how points were evaluated."""
    return {
        "variants": list(names),
        "class_names": list(class_names),
        "dataset": dataset,
        "split": options.split,
        "sample_index": int(options.sample_index),
        "true_label": true_label,
        "direction_seed": int(options.direction_seed),
        "resolution": int(options.resolution),
        "extent": float(options.extent),
        "clamp": bool(options.clamp),
        "stats_resolution": int(options.stats_resolution),
    }


def measure_per_image(models: dict[str, nn.Module], x: Tensor, y: Tensor, options: PlaneOptions, measure: PerImageFn, what: str,
                      cache_dir: Path | None, progress: Progress, depends_on: dict[str, Any] | None = None) -> tuple[Tensor, Tensor, dict[str, dict[str, Tensor]]]:
    """``measure`` at each of the first ``num_images`` images for every model, chunk by chunk.

    Returns the images' labels, their indices, and per model the measured tensors (one value per
    image). Chunks are kept per model in ``cache_dir`` under a fingerprint of the options, what
    else the measurement ``depends_on`` (the attack), the images and the model's weights, so runs
    on other lists of models reuse them.
    """
    x, y = x[: int(options.num_images)], y[: int(options.num_images)]
    settings = {k: v for k, v in options.as_dict().items() if k not in ("sample_index", "resolution", "batch_size", "chunk_size")}
    measured: dict[str, dict[str, Tensor]] = {}
    for variant, model in models.items():
        identity = {"probe": options.defaults_from, "options": settings, **(depends_on or {}), "images": fingerprint.of_tensors(x, y), "model": fingerprint.of_state(model)}

        def chunk(start: int, stop: int, model: nn.Module = model) -> dict[str, Tensor]:
            return measure(model, x[start:stop], y[start:stop], list(range(start, stop)))

        measured[variant] = run_in_chunks(
            PartialResults(cache_dir, options.defaults_from, identity), len(x), int(options.chunk_size), chunk,
            lambda done, total, variant=variant: progress(done, total, f"{what} of {variant}, per image"),
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


def random_plane(models: Any, images: Tensor, labels: Tensor, *, class_names: Sequence[str] | None = None, dataset: str = "images",
                 seed: int | None = None, cache_dir: str | Path | None = None, progress: Progress = no_progress, **options: Any) -> RandomPlaneResult:
    """Class regions in random planes: around image ``sample_index`` on a ``resolution`` grid (the
    figure), and around each of the first ``num_images`` images on a ``stats_resolution`` grid.

    options: those of ``conf/probe/random_plane.yaml`` (its values are the defaults).
    class_names, dataset: how rows and captions name the classes and the data.
    cache_dir: where per-image chunks are kept (None: nothing is kept).
    """
    settings = RandomPlaneOptions.from_cfg(options)
    named, x, y, classes = prepare_inputs(models, images, labels, labels_are_classes=False)
    names = list(class_names) if class_names is not None else [str(i) for i in range(classes)]
    x0, true_label = sample_of(x, y, settings)
    settings = fitted(settings, named, x[: settings.images_wanted()], classes)
    image_norm = float(x0.norm())
    if image_norm == 0.0:
        raise InputError(
            f"{settings.split} image #{settings.sample_index} is all zeros, and the plane's extent is measured in its l2 norm",
            "pick another probe.sample_index",
        )
    u, v = direction_pair(x0.shape, settings.direction_seed)
    u, v = u.to(x0), v.to(x0)
    half_width = float(settings.extent) * image_norm
    coords = torch.linspace(-half_width, half_width, int(settings.resolution), device=x0.device)

    arrays: dict[str, Tensor] = {"x0": x0.cpu(), "u": u.cpu(), "v": v.cpu(), "coords": coords.cpu()}
    rows: list[dict[str, Any]] = []
    predicted: dict[str, int] = {}
    with seeded(run_seed(seed), x.device):
        for done, (variant, model) in enumerate(named.items()):
            fast = inference_copy(model, x0.unsqueeze(0))
            label = predicted[variant] = int(predict(fast, x0.unsqueeze(0))[0])
            labels_grid = classify_plane(fast, x0, u, v, coords, coords, batch_size=int(settings.batch_size), clamp=bool(settings.clamp))
            stats = region_statistics(labels_grid, label)
            arrays[f"{variant}/labels"] = labels_grid.cpu()
            rows.append({"variant": variant, "sample_class": class_name(names, label), "num_classes": stats.num_classes, "area_fraction": stats.area_fraction})
            progress(done + 1, len(named), f"random plane of {variant}")

        point_labels, indices, measured = measure_per_image(named, x, y, settings, region_statistics_per_image(settings), "random planes",
                                                             None if cache_dir is None else Path(cache_dir), progress)
    per_image_arrays, per_image_rows = per_image_outputs(point_labels, indices, measured, ("area_fraction", "num_classes"))
    arrays.update(per_image_arrays)

    meta = sample_meta(list(named), settings, true_label, names, dataset)
    meta.update(
        {
            "half_width": half_width,
            "image_norm": image_norm,
            "predicted_label": predicted,
            "num_images": int(len(indices)),
            "methods": (
                f"Two orthonormal directions are Gaussian draws from seed {int(settings.direction_seed)} (Gram-Schmidt), the same "
                f"for every model; the square of half-width {float(settings.extent):g} x the image's l2 norm is classified on a "
                f"{int(settings.resolution)}x{int(settings.resolution)} grid ({'points clipped to [0, 1]' if settings.clamp else 'points evaluated as they are, unclipped'}). "
                f"The per-image statistics repeat this at each of the first {int(len(indices))} {settings.split} images, each in its own "
                f"random plane (seeded by the direction seed and the image's index, the same for every model) on a "
                f"{int(settings.stats_resolution)}x{int(settings.stats_resolution)} grid; the area fraction is the share of grid points "
                "that keep the model's predicted class of the image."
            ),
        }
    )
    return RandomPlaneResult(probe="random_plane", arrays=arrays, tables={"regions": rows, "per_image": per_image_rows}, meta=meta)


def plane_images(ctx: ProbeContext, options: PlaneOptions) -> tuple[Tensor, Tensor]:
    """What a plane probe's adapter hands its function: the split's first images, up to the figure's sample."""
    return load_images(ctx, options.split, options.images_wanted())


def plane_run(ctx: ProbeContext) -> dict[str, Any]:
    """A plane probe's run settings: per-image chunks go where other lists of models find them."""
    return {**ctx.common(), "cache_dir": ctx.shared_dir or ctx.work_dir, "class_names": ctx.data.info.class_names, "dataset": ctx.data.info.name}


@register("probe", "random_plane", options=RandomPlaneOptions)
def compute(ctx: ProbeContext) -> ProbeResult:
    x, y = plane_images(ctx, RandomPlaneOptions.from_cfg(ctx.options))
    return random_plane(ctx.models, x, y, **plane_run(ctx), **ctx.options)
