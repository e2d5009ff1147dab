"""LLR, the local linearity regularizer (Qin et al. 2019, "Adversarial robustness through local
linearization").

With ``l`` the per-example cross-entropy and gradients w.r.t. the [0, 1] pixels, the local
linearity of the loss at ``x`` within the l-inf ball of radius ``eps`` is

    g(delta; x) = | l(x + delta) - l(x) - delta^T grad l(x) |,
    gamma(eps, x) = max_{||delta||_inf <= eps} g(delta; x),

and the loss is

    mean_i [ l(x_i) + lam * g(delta_i; x_i) + mu * | delta_i^T grad l(x_i) | ],

with ``delta_i`` the inner search's maximiser of ``g`` (``delta_LLR``), held constant: a per-
example mean, as the paper's expectation over the data. ``grad l(x)`` keeps its graph, so both
terms are differentiated through it w.r.t. the parameters (double backpropagation).

The paper publishes no code; these are our choices, stated: the inner search is ``steps``
sign-gradient steps of ``relative_step * eps`` on ``g``, from a uniform start in the ball
clipped to the pixel box, each projected onto the ball and the box (so ``x + delta`` is an
image); it runs on the model in evaluation mode (:class:`EvalView`, as PGD training here), with
that mode's ``l(x)`` and ``grad l(x)`` in ``g``. The loss's terms run in training mode: the
clean forward is the training forward (its statistics update the running ones), the forward at
``x + delta`` uses its own batch's statistics and leaves the running ones as they are.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from robustness.geometry.gradients import loss_and_input_gradient, per_example_cross_entropy
from robustness.registry import register
from robustness.training.adversarial import EvalView, sign_ascent
from robustness.training.penalty import (
    check_double_backward_precision,
    check_number,
    FULL_PRECISIONS,
    check_steps,
    finite_on_every_rank,
    penalty_forward,
    refuse_compiled,
    training_forward,
)
from robustness.training.regularizer import Regularizer, StepOutput


def linearity_terms(shifted_losses: Tensor, clean_losses: Tensor, clean_grad: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """``(g, delta^T grad l(x))`` per example, shape (N,) each:
    ``g = |l(x + delta) - l(x) - delta^T grad l(x)|``."""
    linear = (delta * clean_grad).flatten(1).sum(dim=1)
    return (shifted_losses - clean_losses - linear).abs(), linear


def linearity_search(model: nn.Module, x: Tensor, y: Tensor, eps: float, step_size: float, steps: int, start: Tensor | None = None) -> Tensor:
    """``x + delta_LLR``: the point of the eps-ball and the pixel box where the search found
    ``g`` largest, for ``model`` as given (gradients on, parameters frozen). ``start`` defaults to
    a uniform draw in the ball, clipped to the box."""
    _, clean_losses, clean_grad = loss_and_input_gradient(model, x, y)
    clean_losses = clean_losses.detach()
    if start is None:
        start = (x.detach() + torch.empty_like(x).uniform_(-eps, eps)).clamp_(0.0, 1.0)

    def nonlinearity(x_shifted: Tensor) -> Tensor:
        return linearity_terms(per_example_cross_entropy(model(x_shifted), y), clean_losses, clean_grad, x_shifted - x)[0]

    return sign_ascent(nonlinearity, x, start, eps, step_size, steps)


@register("regularizer", "llr")
class LLR(Regularizer):
    """Cross-entropy plus LLR's ``lam * g + mu * |delta^T grad l|`` (variant ``llr``).

    lam:           weight of the local linearity ``g(delta_LLR; x)``
    mu:            weight of the gradient term ``|delta_LLR^T grad l(x)|``
    eps:           l-inf radius, in [0, 1] pixels
    steps:         sign-gradient steps of the inner search
    relative_step: its step size as a fraction of ``eps``
    """

    variant = "llr"

    def __init__(
        self,
        variant: str = "llr",
        init_from: str | None = None,
        lam: float = 4.0,
        mu: float = 3.0,
        eps: float = 8 / 255,
        steps: int = 10,
        relative_step: float = 0.25,
    ) -> None:
        self.variant = variant
        self.init_from = init_from
        self.lam = check_number("lam", lam, example="4.0")
        self.mu = check_number("mu", mu, example="3.0")
        self.eps = check_number("eps", eps, example="0.0314")
        self.steps = check_steps("steps", steps)
        self.relative_step = check_number("relative_step", relative_step, strict=True, example="0.25")
        self._view = EvalView()

    def check_precision(self, precision: str | int) -> None:
        # g is a difference of losses a few hundredths apart: bfloat16 logits (8 significant
        # bits) move each loss by about as much.
        check_double_backward_precision("llr", precision, FULL_PRECISIONS, " (its local linearity is a small difference of losses, which bfloat16 rounding swamps)")

    def penalty_at(self, model: nn.Module, x: Tensor, y: Tensor, x_shifted: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The step's terms at a given ``x + delta``: ``(logits, clean losses, per-example
        penalty lam g + mu |delta^T grad l|, g, delta^T grad l)``, the model in training mode."""
        keep_graph = (self.lam > 0 or self.mu > 0) and torch.is_grad_enabled()
        logits, clean_losses, clean_grad = loss_and_input_gradient(training_forward(model), x, y, create_graph=keep_graph, retain_graph=True)
        shifted_losses = per_example_cross_entropy(penalty_forward(model, "batch")(x_shifted.detach()), y)
        nonlinearity, linear = linearity_terms(shifted_losses, clean_losses, clean_grad, (x_shifted - x).detach())
        return logits, clean_losses, self.lam * nonlinearity + self.mu * linear.abs(), nonlinearity, linear

    def training_loss(self, model: nn.Module, x: Tensor, y: Tensor, epoch: int) -> StepOutput:
        refuse_compiled(model, "llr")
        with self._view(model, x) as target:
            x_shifted = linearity_search(target, x, y, self.eps, self.relative_step * self.eps, self.steps)
        logits, clean_losses, penalty, nonlinearity, linear = self.penalty_at(model, x, y, x_shifted)
        ce = clean_losses.mean()
        loss = finite_on_every_rank(ce + penalty.mean())
        logs: dict[str, Tensor | float] = {
            "ce": ce.detach(),
            "llr_penalty": penalty.mean().detach(),
            "llr_gamma": nonlinearity.mean().detach(),
            "llr_gradient_term": linear.abs().mean().detach(),
        }
        return StepOutput(loss=loss, logits=logits, logs=logs)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "lam": self.lam, "mu": self.mu, "eps": self.eps, "steps": self.steps, "relative_step": self.relative_step}
