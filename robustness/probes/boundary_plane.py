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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from robustness.errors import ConfigError, InputError
from robustness.geometry.planes import (
    boundary_along_u,
    classify_plane,
    curvature_at_zero,
    direction_pair,
    fit_quadratic,
    origin_index,
    quadratic_values,
)
from robustness.probes.base import ProbeContext, ProbeResult
from robustness.tensors import predict
from robustness.probes.random_plane import PlaneOptions, load_sample, sample_meta
from robustness.registry import build
from robustness.registry import register


@dataclass(frozen=True)
class BoundaryPlaneOptions(PlaneOptions):
    """``extent`` and ``fit_halfwidth`` are in units of the attack's distance ``d`` (see conf/probe/boundary_plane.yaml)."""

    probe: ClassVar[str] = "boundary_plane"

    extent: float = 2.0
    bisection_steps: int = 12
    fit_halfwidth: float = 1.0

    def validate(self) -> None:
        super().validate()
        if int(self.bisection_steps) < 0:
            raise ConfigError(f"probe.bisection_steps must be >= 0, got {self.bisection_steps}", "e.g. probe.bisection_steps=12")
        if not float(self.fit_halfwidth) > 0:
            raise ConfigError(f"probe.fit_halfwidth must be positive, got {self.fit_halfwidth}", "e.g. probe.fit_halfwidth=1.0")


@register("probe", "boundary_plane")
def compute(ctx: ProbeContext) -> ProbeResult:
    options = BoundaryPlaneOptions.from_cfg(ctx.cfg)
    x0, true_label = load_sample(ctx, options)
    attack = build("attack", ctx.attack)
    attack_name = str(ctx.attack.get("name", "attack"))
    class_names = ctx.data.info.class_names

    arrays: dict[str, Tensor] = {"x0": x0.cpu()}
    rows: list[dict[str, Any]] = []
    predicted: dict[str, int] = {}
    for done, (variant, model) in enumerate(ctx.models.items()):
        label = predicted[variant] = int(predict(model, x0.unsqueeze(0))[0])
        plane = _boundary_plane(model, x0, label, attack, attack_name, variant, options)
        arrays.update({f"{variant}/{key}": value.cpu() for key, value in plane.pop("arrays").items()})
        rows.append({"variant": variant, "sample_class": class_names[label], "attack": attack_name, **plane})
        ctx.progress(done + 1, len(ctx.models), f"boundary plane of {variant}")

    meta = sample_meta(ctx, options, true_label)
    meta.update(
        {
            "attack": dict(ctx.attack),
            "bisection_steps": int(options.bisection_steps),
            "fit_halfwidth": float(options.fit_halfwidth),
            "predicted_label": predicted,
        }
    )
    return ProbeResult(probe="boundary_plane", arrays=arrays, tables={"curvature": rows}, meta=meta)


def _boundary_plane(
    model: torch.nn.Module, x0: Tensor, label: int, attack: Any, attack_name: str, variant: str, options: BoundaryPlaneOptions
) -> dict[str, Any]:
    """One model's plane: grid labels, boundary, fit, and the table row's numbers."""
    adversarial = attack(model, x0.unsqueeze(0), torch.tensor([label], device=x0.device))
    delta = (adversarial.x_adv[0] - x0).detach()
    distance = float(delta.norm())
    if not math.isfinite(distance) or distance <= 0.0:
        raise InputError(
            f"the {attack_name} attack left sample {options.sample_index} unchanged for variant '{variant}', so there is no direction towards the boundary",
            "pick another probe.sample_index, or give the attack more iterations (attack.max_iter)",
        )
    u, v = direction_pair(x0.shape, int(options.direction_seed), first=delta)
    half_width = float(options.extent) * distance
    coords = torch.linspace(-half_width, half_width, int(options.resolution), device=x0.device)
    run = {"batch_size": int(options.batch_size), "clamp": bool(options.clamp)}
    labels = classify_plane(model, x0, u, v, coords, coords, **run)
    boundary = boundary_along_u(model, x0, u, v, labels, coords, coords, label, bisection_steps=int(options.bisection_steps), **run)

    s = coords.to(torch.float64).cpu()
    t = boundary.cpu()
    window = torch.isfinite(t) & (s.abs() <= float(options.fit_halfwidth) * distance * (1 + 1e-6))
    fit_columns = int(window.sum())
    if len(torch.unique(s[window])) >= 3:
        coeffs = fit_quadratic(s[window], t[window])
        curvature = curvature_at_zero(coeffs)
        fit_rmse = float((quadratic_values(coeffs, s[window]) - t[window]).pow(2).mean().sqrt())
    else:
        # Too few columns cross the boundary near the sample for a quadratic: report no curvature.
        coeffs = torch.full((3,), float("nan"), dtype=torch.float64)
        curvature = fit_rmse = float("nan")

    return {
        "attack_success": bool(adversarial.success[0]),
        "attack_distance": distance,
        "boundary_distance": float(t[origin_index(s)]),
        "curvature": curvature,
        "curvature_x_distance": curvature * distance,
        "slope": float(coeffs[1]),
        "fit_rmse": fit_rmse,
        "fit_columns": fit_columns,
        "arrays": {
            "labels": labels,
            "coords": coords,
            "boundary": boundary,
            "fit_window": window,
            "coeffs": coeffs,
            "u": u,
            "v": v,
        },
    }
