"""Probe ``boundary_plane``: the decision boundary near one fixed test image, and its curvature.

Reproduces the measurements behind the report's Figure 2 (initial vs adversarially trained model)
and Figure 4, left (CURE model), after Moosavi-Dezfooli et al. (2019). For each model:

1. the ``attack`` group (DeepFool in the experiments) perturbs the sample out of its predicted
   class; ``u`` is the unit vector from the sample to the adversarial image, ``d`` its distance;
2. ``v`` is a Gaussian draw from ``direction_seed`` made orthogonal to ``u`` (the same draw for
   every model, so only the part along each model's own ``u`` differs);
3. the square ``[-extent d, extent d]^2`` of the plane ``x0 + a u + b v`` is classified on a
   ``resolution`` x ``resolution`` grid;
4. in each column (fixed ``b``) the boundary is where the column, walked from ``a = 0`` towards
   the adversarial image, first leaves the sample's class, refined by bisection;
5. ``a = c0 + c1 b + c2 b^2`` is fitted to the columns with ``|b| <= fit_halfwidth d``; its curvature
   at ``b = 0`` is ``2 c2 / (1 + c1^2)^(3/2)`` (in 1 / pixel-space l2 units; ``curvature_x_distance``
   multiplies by ``d`` for a scale-free number).

Grid points are evaluated as they are by default, even where pixels leave [0, 1] (``clamp:
false``): the model accepts any input, and only the unclamped slice is a plane, so only it has a
boundary whose curvature means what the fit measures. ``clamp: true`` clips every point to the
pixel box instead, which shows what the model does on valid images but folds the slice along the
box faces and bends the boundary there.

The figure shows one fixed sample (``sample_index``), every model's panel on one scale: the square
is ``extent`` times the largest of the models' distances ``d``, and each model's fit window is
``fit_halfwidth`` times its own ``d``. So that a claim does not rest on one image, the curvature is
also measured at each of the first ``num_images`` images of the split (each with its own random
direction, seeded by ``(direction_seed, image index)`` and the same for every model), on the part
of a ``stats_resolution`` grid over ``[-extent d, extent d]`` that the fit needs (rows from the
sample towards the adversarial image, columns inside the fit window); those values are
``tables["per_image"]`` and the arrays ``{variant}/per_image/<key>``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from robustness.errors import ConfigError, InputError
from robustness.geometry.planes import (
    boundary_along_u,
    classify_plane,
    curvature_at_zero,
    direction_pair,
    fit_quadratic,
    image_seed,
    origin_index,
    quadratic_values,
)
from robustness.probes.base import (
    Progress,
    ProbeContext,
    ProbeResult,
    attack_node,
    class_name,
    fitted,
    no_progress,
    prepare_inputs,
    probe_options,
    run_seed,
    seeded,
)
from robustness.probes.random_plane import (
    PerImageFn,
    PlaneOptions,
    PlaneResult,
    measure_per_image,
    per_image_outputs,
    plane_images,
    plane_run,
    sample_meta,
    sample_of,
)
from robustness.registry import build, register
from robustness.tensors import inference_copy, predict

PER_IMAGE_COLUMNS = ("attack_success", "attack_distance", "curvature", "curvature_x_distance", "fit_columns")


@probe_options("boundary_plane")
class BoundaryPlaneOptions(PlaneOptions):
    """``extent`` and ``fit_halfwidth`` are in units of the attack's distance ``d`` (see conf/probe/boundary_plane.yaml)."""

    bisection_steps: int
    fit_halfwidth: float

    def validate(self) -> None:
        super().validate()
        if int(self.bisection_steps) < 0:
            raise ConfigError(f"probe.bisection_steps must be >= 0, got {self.bisection_steps}", "e.g. probe.bisection_steps=12")
        if not float(self.fit_halfwidth) > 0:
            raise ConfigError(f"probe.fit_halfwidth must be positive, got {self.fit_halfwidth}", "e.g. probe.fit_halfwidth=1.0")


class BoundaryPlaneResult(PlaneResult):
    """``rows`` (table ``curvature``): per model the attack's distance ``d`` to the boundary at the
    sample, the boundary's fitted curvature (and curvature x d), slope and fit error; per image
    the same in each image's own plane. :meth:`labels` is the grid, ``arrays[f"{model}/boundary"]``
    the boundary per column and ``arrays[f"{model}/coeffs"]`` the fitted quadratic."""

    main_table = "curvature"


def boundary_plane(models: Any, images: Tensor, labels: Tensor, *, attack: str | dict[str, Any] | None = None,
                   class_names: Sequence[str] | None = None, dataset: str = "images", seed: int | None = None,
                   cache_dir: str | Path | None = None, progress: Progress = no_progress, **options: Any) -> BoundaryPlaneResult:
    """The decision boundary in the plane of the attack's direction and a random one, and its
    curvature: at image ``sample_index`` on a ``resolution`` grid (the figure), and at each of the
    first ``num_images`` images on a ``stats_resolution`` grid.

    attack: the attack that finds the direction to the boundary (default: ``conf/config.yaml``'s, deepfool).
    options: those of ``conf/probe/boundary_plane.yaml`` (its values are the defaults).
    class_names, dataset: how rows and captions name the classes and the data.
    cache_dir: where per-image chunks are kept (None: nothing is kept).
    """
    settings = BoundaryPlaneOptions.from_cfg(options)
    attack_cfg = attack_node(attack)
    attack_fn = build("attack", attack_cfg)
    attack_name = str(attack_cfg["name"])
    named, x, y, classes = prepare_inputs(models, images, labels, labels_are_classes=False)
    names = list(class_names) if class_names is not None else [str(i) for i in range(classes)]
    x0, true_label = sample_of(x, y, settings)
    settings = fitted(settings, named, x[: settings.images_wanted()], classes)

    arrays: dict[str, Tensor] = {"x0": x0.cpu()}
    rows: list[dict[str, Any]] = []
    with seeded(run_seed(seed), x.device):
        predicted = {variant: int(predict(model, x0.unsqueeze(0))[0]) for variant, model in named.items()}
        attacked = {variant: _attack_sample(model, x0, predicted[variant], attack_fn, attack_name, variant, settings) for variant, model in named.items()}
        # One square for every panel, so the figure compares the models on one scale.
        half_width = float(settings.extent) * max(distance for _, distance, _ in attacked.values())
        for done, (variant, model) in enumerate(named.items()):
            delta, distance, success = attacked[variant]
            plane = _boundary_plane(model, x0, predicted[variant], delta, distance, half_width, settings)
            arrays.update({f"{variant}/{key}": value.cpu() for key, value in plane.pop("arrays").items()})
            rows.append({"variant": variant, "sample_class": class_name(names, predicted[variant]), "attack": attack_name, "attack_success": success, **plane})
            progress(done + 1, len(named), f"boundary plane of {variant}")

        point_labels, indices, measured = measure_per_image(named, x, y, settings, boundary_curvature_per_image(attack_fn, settings), "boundary planes",
                                                             None if cache_dir is None else Path(cache_dir), progress, {"attack": attack_cfg})
    per_image_arrays, per_image_rows = per_image_outputs(point_labels, indices, measured, PER_IMAGE_COLUMNS)
    arrays.update(per_image_arrays)

    meta = sample_meta(list(named), settings, true_label, names, dataset)
    meta.update(
        {
            "attack": attack_cfg,
            "bisection_steps": int(settings.bisection_steps),
            "fit_halfwidth": float(settings.fit_halfwidth),
            "predicted_label": predicted,
            "half_width": half_width,
            "num_images": int(len(indices)),
            "methods": _methods(settings, attack_name, int(len(indices))),
        }
    )
    return BoundaryPlaneResult(probe="boundary_plane", arrays=arrays, tables={"curvature": rows, "per_image": per_image_rows}, meta=meta)


@register("probe", "boundary_plane", options=BoundaryPlaneOptions)
def compute(ctx: ProbeContext) -> ProbeResult:
    x, y = plane_images(ctx, BoundaryPlaneOptions.from_cfg(ctx.options))
    return boundary_plane(ctx.models, x, y, attack=ctx.attack, **plane_run(ctx), **ctx.options)


def _methods(options: BoundaryPlaneOptions, attack: str, num_images: int) -> str:
    r = int(options.resolution)
    return (
        f"The {attack} attack moves the sample out of its predicted class; u is the unit vector towards the adversarial image "
        f"(distance d) and v a Gaussian draw from seed {int(options.direction_seed)} made orthogonal to u. The plane x0 + a u + b v is "
        f"classified on a {r}x{r} grid over {float(options.extent):g} x the largest d of the models shown, so every panel has one scale. "
        f"In each column the boundary is where the column, walked from the sample towards the adversarial image, first leaves the "
        f"sample's class, refined by {int(options.bisection_steps)} bisection steps; a = c0 + c1 b + c2 b^2 is fitted by least squares "
        f"to the columns with |b| <= {float(options.fit_halfwidth):g} d, and the curvature at b = 0 is 2 c2 / (1 + c1^2)^1.5. "
        f"Per-image statistics repeat the fit at each of the first {num_images} {options.split} images, each with its own random "
        f"direction (seeded by the direction seed and the image's index, the same for every model), on a {int(options.stats_resolution)}-point "
        f"grid per axis over [-{float(options.extent):g} d, {float(options.extent):g} d]. "
        + ("Grid points are clipped to [0, 1]." if options.clamp else "Grid points are evaluated as they are (unclipped), so the slice is a plane.")
    )


def _attack_sample(model: torch.nn.Module, x0: Tensor, label: int, attack: Any, attack_name: str, variant: str, options: BoundaryPlaneOptions) -> tuple[Tensor, float, bool]:
    """The fixed sample's attack direction, distance and success; an unmoved sample is an InputError."""
    fast = inference_copy(model, x0.unsqueeze(0), for_gradients=True)
    adversarial = attack(fast, x0.unsqueeze(0), torch.tensor([label], device=x0.device))
    delta = (adversarial.x_adv[0] - x0).detach()
    distance = float(delta.norm())
    if not math.isfinite(distance) or distance <= 0.0:
        raise InputError(
            f"the {attack_name} attack left sample {options.sample_index} unchanged for variant '{variant}', so there is no direction towards the boundary",
            "pick another probe.sample_index, or give the attack more iterations (attack.max_iter)",
        )
    return delta, distance, bool(adversarial.success[0])


def _fit_boundary(s: Tensor, t: Tensor, window: Tensor) -> dict[str, Any]:
    """Quadratic fit of the boundary ``t(s)`` over the columns in ``window`` with a finite boundary."""
    window = window & torch.isfinite(t)
    if len(torch.unique(s[window])) >= 3:
        coeffs = fit_quadratic(s[window], t[window])
        curvature = curvature_at_zero(coeffs)
        fit_rmse = float((quadratic_values(coeffs, s[window]) - t[window]).pow(2).mean().sqrt())
    else:
        # Too few columns cross the boundary near the sample for a quadratic: report no curvature.
        coeffs = torch.full((3,), float("nan"), dtype=torch.float64)
        curvature = fit_rmse = float("nan")
    return {"coeffs": coeffs, "curvature": curvature, "fit_rmse": fit_rmse, "fit_columns": int(window.sum()), "window": window}


def _boundary_plane(
    model: torch.nn.Module, x0: Tensor, label: int, delta: Tensor, distance: float, half_width: float, options: BoundaryPlaneOptions
) -> dict[str, Any]:
    """One model's plane over ``[-half_width, half_width]^2``: grid labels, boundary, fit, and the table row's numbers."""
    u, v = direction_pair(x0.shape, int(options.direction_seed), first=delta)
    coords = torch.linspace(-half_width, half_width, int(options.resolution), device=x0.device)
    run = {"batch_size": int(options.batch_size), "clamp": bool(options.clamp)}
    fast = inference_copy(model, x0.unsqueeze(0))
    labels = classify_plane(fast, x0, u, v, coords, coords, **run)
    boundary = boundary_along_u(fast, x0, u, v, labels, coords, coords, label, bisection_steps=int(options.bisection_steps), **run)

    s = coords.to(torch.float64).cpu()
    t = boundary.cpu()
    fit = _fit_boundary(s, t, s.abs() <= float(options.fit_halfwidth) * distance * (1 + 1e-6))
    coeffs = fit["coeffs"]
    return {
        "attack_distance": distance,
        "boundary_distance": float(t[origin_index(s)]),
        "curvature": fit["curvature"],
        "curvature_x_distance": fit["curvature"] * distance,
        "slope": float(coeffs[1]),
        "fit_rmse": fit["fit_rmse"],
        "fit_columns": fit["fit_columns"],
        "arrays": {
            "labels": labels,
            "coords": coords,
            "boundary": boundary,
            "fit_window": fit["window"],
            "coeffs": coeffs,
            "u": u,
            "v": v,
        },
    }


def boundary_curvature_per_image(attack: Any, options: BoundaryPlaneOptions) -> PerImageFn:
    """Per image: the attack (one batched call per chunk), then the boundary fit in its own plane.

    Only the grid part the fit reads is classified: the rows from the sample (a = 0) towards the
    adversarial image, up to the row where every column has left the class, and the columns inside
    the fit window, on the same grid points as a full ``stats_resolution`` grid over ``[-extent d, extent d]``.
    """

    def measure(model: nn.Module, x: Tensor, y: Tensor, image_ids: list[int]) -> dict[str, Tensor]:
        # The same function as the model, faster: the attack runs on the folded copy, the
        # no-grad grids on a frozen one (tensors.inference_copy).
        folded = inference_copy(model, x[:1], for_gradients=True)
        predicted = predict(folded, x)
        adversarial = attack(folded, x, predicted)
        delta = (adversarial.x_adv - x).detach()
        distance = delta.flatten(1).norm(dim=1).double().cpu()
        n = len(x)
        curvature = torch.full((n,), float("nan"), dtype=torch.float64)
        fit_columns = torch.zeros(n, dtype=torch.long)
        run = {"batch_size": int(options.batch_size), "clamp": bool(options.clamp)}
        fast = inference_copy(folded, x[:1])
        for i, index in enumerate(image_ids):
            d = float(distance[i])
            if not math.isfinite(d) or d <= 0.0:
                continue  # the attack did not move this image: no direction, no value
            u, v = direction_pair(x[i].shape, image_seed(options.direction_seed, index), first=delta[i])
            coords = torch.linspace(-float(options.extent) * d, float(options.extent) * d, int(options.stats_resolution), device=x.device)
            rows = coords[origin_index(coords):]
            columns = coords[coords.abs() <= float(options.fit_halfwidth) * d * (1 + 1e-6)]
            labels = classify_plane(fast, x[i], u, v, rows, columns, until_exit_of=int(predicted[i]), **run)
            boundary = boundary_along_u(fast, x[i], u, v, labels, rows, columns, int(predicted[i]), bisection_steps=int(options.bisection_steps), **run)
            s = columns.to(torch.float64).cpu()
            fit = _fit_boundary(s, boundary.cpu(), torch.ones(len(s), dtype=torch.bool))
            curvature[i], fit_columns[i] = fit["curvature"], fit["fit_columns"]
        return {
            "predicted": predicted.cpu(),
            "attack_success": adversarial.success.bool().cpu(),
            "attack_distance": distance,
            "curvature": curvature,
            "curvature_x_distance": curvature * distance,
            "fit_columns": fit_columns,
        }

    return measure
