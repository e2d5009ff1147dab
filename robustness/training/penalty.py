"""What the penalty regularizers share: the forwards their penalties run, and their checks.

A penalty regularizer adds to the cross-entropy a term computed from extra forwards (at a
shifted or perturbed batch) and, for most, differentiates an input gradient again. Those extra
forwards run through :func:`penalty_forward`, in the batch-norm mode the regularizer asks for,
inside :func:`robustness.training.second_order.closed_form`; the running statistics are updated
once a step, by the training forward alone.

The checks raise ConfigError before any work: weights and radii (:func:`check_number`), the
precisions a double backward has been checked under (:func:`check_double_backward_precision`),
and compiled models, which cannot run a double backward (:func:`refuse_compiled`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from robustness.errors import ConfigError
from robustness.tensors import eval_mode
from robustness.training import second_order

Forward = Callable[[Tensor], Tensor]

BN_MODES = ("batch", "running")
#: Lightning precisions in full float32 or float64.
FULL_PRECISIONS = frozenset({"64-true", "64", "32-true", "32"})
#: Lightning precisions a double-backward step is checked under (see :func:`check_double_backward_precision`).
SUPPORTED_PRECISIONS = FULL_PRECISIONS | {"bf16-mixed"}

# Layers that compute something else in training mode than in evaluation mode.
_MODE_DEPENDENT = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)


def has_mode_dependent_layers(model: nn.Module) -> bool:
    """Whether the model computes a different function in training and evaluation mode."""
    return any(isinstance(module, _MODE_DEPENDENT) for module in model.modules())


@contextmanager
def running_statistics_untouched(norms: Sequence[nn.modules.batchnorm._NormBase]) -> Iterator[None]:
    """Normalisation layers in training mode use their batch's statistics without updating the
    running ones: a layer that does not track statistics passes none to ``batch_norm``."""
    flags = [(module, module.track_running_stats) for module in norms]
    for module in norms:
        module.track_running_stats = False
    try:
        yield
    finally:
        for module, tracking in flags:
            module.track_running_stats = tracking


@contextmanager
def _statistics_swapped(snapshots: Sequence[tuple[nn.Module, Tensor, Tensor]]) -> Iterator[None]:
    originals = [(module, module.running_mean, module.running_var) for module, _, _ in snapshots]
    for module, mean, var in snapshots:
        module.running_mean, module.running_var = mean, var
    try:
        yield
    finally:
        for module, mean, var in originals:
            module.running_mean, module.running_var = mean, var


def training_forward(model: nn.Module) -> Forward:
    """The training forward itself (its batch statistics update the running ones), with
    :func:`second_order.closed_form` second-order backwards, for a step that takes its penalty's
    input gradient at the clean batch from the same forward as its cross-entropy."""

    def forward(x: Tensor) -> Tensor:
        with second_order.closed_form(model):
            return model(x)

    return forward


def penalty_forward(model: nn.Module, bn_mode: str) -> Forward:
    """The forward the penalty uses.

    ``running``: evaluation mode (batch-norm with its running statistics, dropout off), as the
    public CURE code does. ``batch``: training mode, batch-norm normalising with the statistics of
    the penalty's own batch.

    Either way the running statistics stay as they are. In 'batch' mode the layers skip their
    update, so that each step updates them once, from the clean batch. In 'running' mode the
    forward uses copies of the statistics as they are when it is made, taken once for all its
    calls: the penalty's graph saves the statistics for its backward, and the training forward
    later updates the real ones in place (autograd does not notice that change, and the
    penalty's gradient would silently use the new statistics).
    """
    if bn_mode not in BN_MODES:
        raise ConfigError(f"unknown bn_mode '{bn_mode}'", f"choose one of: {', '.join(BN_MODES)}")
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._NormBase)]

    if bn_mode == "batch":

        def forward(x: Tensor) -> Tensor:
            with running_statistics_untouched(norms), second_order.closed_form(model):
                return model(x)

        return forward

    snapshots = [
        (module, module.running_mean.clone(), module.running_var.clone())
        for module in norms
        if module.running_mean is not None and module.running_var is not None
    ]

    def forward(x: Tensor) -> Tensor:
        with eval_mode(model), _statistics_swapped(snapshots), second_order.closed_form(model):
            return model(x)

    return forward


def finite_on_every_rank(loss: Tensor) -> Tensor:
    """``loss``, or NaN when any DDP rank's loss is not finite.

    The training module skips a step with a non-finite loss; under DDP every rank must skip
    the same steps, or the ranks that do run a backward wait forever for the others.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return loss
    bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return loss + float("nan") if bool(bad.item()) else loss


def check_number(name: str, value: Any, *, minimum: float = 0.0, strict: bool = False, example: str = "") -> float:
    """``value`` as a float, or a ConfigError naming ``regularizer.<name>``: it must be a finite
    number >= ``minimum`` (> with ``strict``)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    if not ok:
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ConfigError(f"regularizer.{name} must be a finite number {bound}, got {value!r}", f"e.g. regularizer.{name}={example}" if example else f"set regularizer.{name} {bound}")
    return float(value)


def check_steps(name: str, value: Any, example: str = "10") -> int:
    """``value`` as an int >= 1, or a ConfigError naming ``regularizer.<name>``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"regularizer.{name} must be an integer >= 1, got {value!r}", f"e.g. regularizer.{name}={example}")
    return int(value)


def check_double_backward_precision(regularizer: str, precision: str | int, checked: frozenset[str] = SUPPORTED_PRECISIONS, why: str = "") -> None:
    """Refuse a Lightning ``trainer.precision`` a double-backward step has not been checked under
    (``checked``: full precision, and bf16-mixed where a test compared it with float32).

    Float16 (``16-mixed``) scales only the outer loss, not the input gradients a penalty is made
    of, and half-precision weights have not been compared with float32.
    """
    name = str(precision)
    if name not in checked:
        under = "full precision and under bf16-mixed" if "bf16-mixed" in checked else "full precision"
        raise ConfigError(
            f"the {regularizer} regularizer does not support trainer.precision={name}: its penalty differentiates an input "
            f"gradient again, which has been checked only in {under}{why}",
            f"use trainer.precision={' or '.join(sorted(checked))}",
        )


def refuse_compiled(model: nn.Module, regularizer: str) -> None:
    """A torch.compile'd model cannot run the double backward a gradient penalty needs."""
    if hasattr(model, "_orig_mod"):
        raise ConfigError(
            f"{regularizer} differentiates through a gradient (double backward), which torch.compile'd models do not support",
            f"train the {regularizer} variant on the uncompiled model",
        )
