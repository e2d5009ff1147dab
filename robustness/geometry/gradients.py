"""The input gradient of a per-example loss: the one function every floor takes it from.

``l_i = loss_fn(forward(x)_i, y_i)`` is the loss of image ``i``; :func:`input_gradient` returns
``grad_x sum_i l_i``, shaped like ``x``. For a forward that treats images independently (an
evaluation-mode model, a model without batch norm) its row ``i`` is ``grad l_i(x_i)``, the
gradient of the image's own loss; with batch statistics it also carries the terms through the
statistics, which is what a training forward differentiates too.

``forward`` is any map from pixels to the loss function's input: a model, or a model run in a
chosen batch-norm mode (``training.penalty.penalty_forward``). ``create_graph`` keeps the graph
so that the gradient can be differentiated again, w.r.t. the parameters (double
backpropagation) or the input (Hessian-vector products).

Users: ``geometry/hessian.py`` (the finite-difference Hessian, DeepFool's benchmarks),
``training/cure.py`` and the gradient penalties in ``training/``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from robustness.errors import InputError

LossFn = Callable[[Tensor, Tensor], Tensor]
Forward = Callable[[Tensor], Tensor]


def per_example_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of each example, shape (N,)."""
    return F.cross_entropy(logits, y, reduction="none")


def loss_and_input_gradient(
    forward: Forward,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn = per_example_cross_entropy,
    create_graph: bool = False,
    retain_graph: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(outputs, losses, gradient)`` of one forward at ``x``: the forward's outputs, the
    per-example losses (N,) and ``grad_x sum_i l_i``.

    ``retain_graph`` (default: ``create_graph``) keeps the graph of the outputs and losses
    through the gradient's backward pass, so that one forward serves a caller's training loss
    as well as its penalty on the gradient. Without ``create_graph`` the gradient is detached.
    """
    _require_autograd()
    with torch.enable_grad():
        x_leaf = x.detach().clone().requires_grad_(True)
        outputs = forward(x_leaf)
        losses = loss_fn(outputs, y)
        if losses.shape != (len(x),):
            raise InputError(
                f"the loss function must return one loss per example, shape ({len(x)},), got {tuple(losses.shape)}",
                "use a per-example loss (reduction='none')",
            )
        (grad,) = torch.autograd.grad(losses.sum(), x_leaf, create_graph=create_graph, retain_graph=create_graph if retain_graph is None else retain_graph)
    return outputs, losses, grad if create_graph else grad.detach()


def input_gradient(forward: Forward, x: Tensor, y: Tensor, create_graph: bool = False, *, loss_fn: LossFn = per_example_cross_entropy) -> Tensor:
    """``grad_x sum_i loss_fn(forward(x)_i, y_i)``, shaped like ``x`` (see the module docstring)."""
    return loss_and_input_gradient(forward, x, y, loss_fn=loss_fn, create_graph=create_graph)[2]


def _require_autograd() -> None:
    if torch.is_inference_mode_enabled():
        raise InputError(
            "input gradients need autograd, but inference mode is on",
            "run the probe outside the Lightning Trainer, or pass inference_mode=False to it",
        )
