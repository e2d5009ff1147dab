"""Probes: one module per probe, each a plain function (``hessian_norm(models, images, labels,
**options)``) and its stage adapter ``compute(ctx)``, registered with
``@register("probe", NAME, options=...)``.

A probe computes and never plots; :mod:`robustness.probes.base` says what it receives and returns.
Every probe module is imported here, so looking up any probe finds them all.
"""

from robustness.probes import (  # noqa: F401
    boundary_plane,
    curvature_profile,
    hessian_norm,
    min_perturbation,
    path_connectivity,
    perceptual,
    random_plane,
    robust_accuracy,
    table1,
    training_shift,
)
