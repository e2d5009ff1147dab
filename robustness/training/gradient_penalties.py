"""Penalties on the input gradient and on the input Jacobian, taken at the clean batch.

``input_gradient_norm``, double backpropagation (Drucker and LeCun 1992; Ross and Doshi-Velez
2018): with ``l`` the per-example cross-entropy and gradients w.r.t. the [0, 1] pixels,

    loss = mean_i l(x_i) + lam * mean_i || grad l_i(x_i) ||_2^2,

the squared norm of each example's own gradient (without Drucker and LeCun's factor 1/2; the
weight takes it, see conf/regularizer/input_gradient_norm.yaml).

``jacobian``, Jacobian regularisation (Hoffman, Roberts and Yaida 2019): with ``J_i`` the
Jacobian of the logits w.r.t. the pixels of example ``i`` (C x d),

    loss = mean_i l(x_i) + lam * (1/2) mean_i ||J_i||_F^2,

``||J_i||_F^2`` estimated as the public code does: ``C ||v^T J_i||^2`` averaged over
``projections`` vectors ``v`` drawn uniformly on the unit sphere of R^C, independently per
example (unbiased: ``E[v v^T] = I / C``); ``projections=-1`` takes the C unit vectors instead
and gives the exact value.

Both take the penalty from the training forward itself (training mode, running statistics
updated once), whose graph the penalty's gradient is differentiated through. With batch
statistics an example's gradient also carries the terms through the batch's statistics, as
the public codes' (both differentiate the training forward).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustness.errors import ConfigError
from robustness.geometry.gradients import loss_and_input_gradient
from robustness.registry import register
from robustness.training.penalty import (
    check_double_backward_precision,
    check_number,
    finite_on_every_rank,
    refuse_compiled,
    training_forward,
)
from robustness.training.regularizer import Regularizer, StepOutput


@register("regularizer", "input_gradient_norm")
class InputGradientNorm(Regularizer):
    """Cross-entropy plus ``lam`` times the mean squared l2 norm of the input gradient (variant ``input_gradient_norm``).

    lam: weight of ``mean_i ||grad l_i(x_i)||^2`` (pixel units)
    """

    variant = "input_gradient_norm"

    def __init__(self, variant: str = "input_gradient_norm", init_from: str | None = None, lam: float = 109.83) -> None:
        self.variant = variant
        self.init_from = init_from
        self.lam = check_number("lam", lam, example="109.83")

    def check_precision(self, precision: str | int) -> None:
        check_double_backward_precision("input_gradient_norm", precision)

    def training_loss(self, model: nn.Module, x: Tensor, y: Tensor, epoch: int) -> StepOutput:
        refuse_compiled(model, "input_gradient_norm")
        keep_graph = self.lam > 0 and torch.is_grad_enabled()
        logits, losses, grad = loss_and_input_gradient(training_forward(model), x, y, create_graph=keep_graph, retain_graph=True)
        ce = losses.mean()
        penalty = grad.flatten(1).pow(2).sum(dim=1).mean()
        loss = finite_on_every_rank(ce + self.lam * penalty)
        return StepOutput(loss=loss, logits=logits, logs={"ce": ce.detach(), "input_gradient_norm_penalty": penalty.detach()})

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "lam": self.lam}


def random_projections(projections: int, batch: int, classes: int, *, like: Tensor) -> Tensor:
    """``(n, batch, classes)`` vectors ``v`` for :func:`jacobian_penalty`: ``projections`` draws
    uniform on the unit sphere per example (n = projections), or with ``projections=-1`` the
    ``classes`` unit vectors (n = classes), on ``like``'s device and dtype."""
    if projections == -1:
        return torch.eye(classes, dtype=like.dtype, device=like.device).unsqueeze(1).expand(classes, batch, classes)
    if classes == 1:
        return like.new_ones(projections, batch, 1)
    # One (batch, classes) draw per projection, as the public code draws them.
    v = torch.stack([torch.randn(batch, classes, dtype=like.dtype, device=like.device) for _ in range(projections)])
    return v / v.norm(dim=2, keepdim=True)


def jacobian_penalty(logits: Tensor, x: Tensor, vectors: Tensor, create_graph: bool = True) -> Tensor:
    """``(1/2) C/(n N) sum_{v, i} ||v_i^T J_i||^2``, the estimate of ``(1/2) mean_i ||J_i||_F^2``
    from the ``n`` rows of ``vectors`` (n, N, C); ``logits`` (N, C) must have been computed from
    ``x`` (a leaf that requires grad) and keep their graph."""
    n, batch, classes = vectors.shape
    total = logits.new_zeros(())
    for k in range(n):
        (jtv,) = torch.autograd.grad(logits, x, vectors[k], retain_graph=True, create_graph=create_graph)
        total = total + jtv.pow(2).sum()
    return 0.5 * classes * total / (n * batch)


@register("regularizer", "jacobian")
class JacobianPenalty(Regularizer):
    """Cross-entropy plus ``lam`` times the Jacobian penalty ``(1/2) mean_i ||J_i||_F^2`` (variant ``jacobian``).

    lam:         weight of the penalty (pixel units)
    projections: random projections per step (the public code's n: 1), or -1 for the exact value
    """

    variant = "jacobian"

    def __init__(self, variant: str = "jacobian", init_from: str | None = None, lam: float = 9.4926e-4, projections: int = 1) -> None:
        self.variant = variant
        self.init_from = init_from
        self.lam = check_number("lam", lam, example="9.4926e-4")
        if isinstance(projections, bool) or not isinstance(projections, int) or not (projections == -1 or projections >= 1):
            raise ConfigError(f"regularizer.projections must be an integer >= 1, or -1 for the exact penalty, got {projections!r}", "e.g. regularizer.projections=1")
        self.projections = projections

    def check_precision(self, precision: str | int) -> None:
        check_double_backward_precision("jacobian", precision)

    def training_loss(self, model: nn.Module, x: Tensor, y: Tensor, epoch: int) -> StepOutput:
        refuse_compiled(model, "jacobian")
        keep_graph = self.lam > 0 and torch.is_grad_enabled()
        with torch.enable_grad():
            x_leaf = x.detach().clone().requires_grad_(True)
            logits = training_forward(model)(x_leaf)
            vectors = random_projections(self.projections, *logits.shape, like=logits.detach())
            penalty = jacobian_penalty(logits, x_leaf, vectors, create_graph=keep_graph)
        ce = F.cross_entropy(logits, y)
        loss = finite_on_every_rank(ce + self.lam * penalty)
        return StepOutput(loss=loss, logits=logits, logs={"ce": ce.detach(), "jacobian_penalty": penalty.detach()})

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "lam": self.lam, "projections": self.projections}
