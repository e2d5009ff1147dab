"""robustness: experiments on adversarial robustness and the geometry of decision boundaries.

The Python API (``docs/API.md``) is this package's namespace: ``robustness.load_model``,
``robustness.hessian_norm``, ... . Its names load on first use, so that ``import robustness``
(and the command line's start) stays quick.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# The public names of robustness.api, re-exported here.
_API = (
    "ProbeResult",
    "RunOutcome",
    "StoredVariant",
    "TrainingRecord",
    "boundary_plane",
    "curvature_profile",
    "defaults",
    "hessian_norm",
    "hue_sweep",
    "list_variants",
    "load_data",
    "load_model",
    "min_perturbation",
    "path_search",
    "random_plane",
    "report",
    "robust_accuracy",
    "run",
    "table1",
    "training_shift",
)

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        from robustness import api

        return getattr(api, name)
    raise AttributeError(f"module 'robustness' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
