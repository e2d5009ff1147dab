"""Reporters: one module per probe, registered with ``@register("reporter", NAME)``, plus the
report documents. A reporter draws and writes, never computes. Every reporter module is imported
here, so looking up any reporter finds them all."""

from robustness.reporting import (  # noqa: F401
    boundary_plane,
    curvature_profile,
    hessian_norm,
    leaderboard,
    min_perturbation,
    path_connectivity,
    perceptual,
    random_plane,
    robust_accuracy,
    scorecard,
    table1,
    training_shift,
)
