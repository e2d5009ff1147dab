"""TRADES (Zhang et al. 2019): cross-entropy plus beta times the KL divergence between the model's
predictions at a clean image and at its worst neighbour in the eps-ball.

    loss = mean_i CE(f(x_i), y_i) + beta * mean_i KL(p(x_i) || p(x'_i)),
    x'_i ~ argmax_{||x' - x_i||_inf <= eps, x' in [0, 1]} KL(p(x_i) || p(x')),

with ``p = softmax(f)`` and ``KL(p || q) = sum_k p_k (log p_k - log q_k)``: the clean
distribution first, as the public code's ``KLDivLoss(log_softmax(f(x')), softmax(f(x)))``
computes it, summed over the batch and divided by the batch size (a per-example mean). Its
gradient flows through both distributions, the clean one included.

The inner maximisation is the public code's: from ``x + 0.001 N(0, 1)`` (not projected),
``steps`` sign-gradient steps of ``relative_step * eps`` on the summed KL divergence, each
projected onto the eps-ball and the pixel box, with ``p(x)`` held fixed; it runs on the model
in evaluation mode (the public code's ``model.eval()``), on :class:`EvalView`'s folded twin.
The outer loss runs in training mode: the clean forward is the training forward (its batch
statistics update the running ones, and its logits give both the cross-entropy and ``p(x)``),
the forward at ``x'`` uses its own batch's statistics and leaves the running ones as they are
(the public code updates them from all three of its forwards: ``x``, ``x'`` and ``x`` again).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustness.registry import register
from robustness.training.adversarial import EvalView, sign_ascent
from robustness.training.penalty import check_number, check_steps, finite_on_every_rank, penalty_forward
from robustness.training.regularizer import Regularizer, StepOutput


def kl_divergence(clean_logits: Tensor, adversarial_logits: Tensor) -> Tensor:
    """``KL(p || q)`` per example, shape (N,): ``p = softmax(clean_logits)``, ``q = softmax(adversarial_logits)``."""
    log_p = F.log_softmax(clean_logits, dim=1)
    log_q = F.log_softmax(adversarial_logits, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def kl_ascent(model: nn.Module, x: Tensor, clean_logits: Tensor, eps: float, step_size: float, steps: int, start: Tensor | None = None) -> Tensor:
    """TRADES' inner maximisation: ``x'`` in the eps-ball and the pixel box that (locally)
    maximises ``KL(p(x) || p(x'))``, with ``p(x)`` from ``clean_logits`` held fixed. ``start``
    defaults to the public code's ``x + 0.001 N(0, 1)``."""
    if start is None:
        start = x.detach() + 0.001 * torch.randn_like(x)
    target = clean_logits.detach()
    return sign_ascent(lambda x_adv: kl_divergence(target, model(x_adv)), x, start, eps, step_size, steps)


@register("regularizer", "trades")
class TRADES(Regularizer):
    """Cross-entropy plus ``beta`` times TRADES' KL divergence (variant ``trades``).

    beta:          weight of the KL term (the public code's 1/lambda)
    eps:           l-inf radius of the inner maximisation, in [0, 1] pixels
    steps:         sign-gradient steps of the inner maximisation
    relative_step: its step size as a fraction of ``eps``
    """

    variant = "trades"

    def __init__(
        self,
        variant: str = "trades",
        init_from: str | None = None,
        beta: float = 6.0,
        eps: float = 8 / 255,
        steps: int = 10,
        relative_step: float = 0.007 / 0.031,
    ) -> None:
        self.variant = variant
        self.init_from = init_from
        self.beta = check_number("beta", beta, example="6.0")
        self.eps = check_number("eps", eps, example="0.0314")
        self.steps = check_steps("steps", steps)
        self.relative_step = check_number("relative_step", relative_step, strict=True, example="0.2258")
        self._view = EvalView()

    @property
    def step_size(self) -> float:
        return self.relative_step * self.eps

    def training_loss(self, model: nn.Module, x: Tensor, y: Tensor, epoch: int) -> StepOutput:
        logits = model(x)
        with self._view(model, x) as target:
            with torch.no_grad():
                clean_eval_logits = target(x)
            x_adv = kl_ascent(target, x, clean_eval_logits, self.eps, self.step_size, self.steps)
        adversarial_logits = penalty_forward(model, "batch")(x_adv)
        ce = F.cross_entropy(logits, y)
        kl = kl_divergence(logits, adversarial_logits).mean()
        loss = finite_on_every_rank(ce + self.beta * kl)
        adv_acc = (adversarial_logits.argmax(1) == y).float().mean().detach()
        return StepOutput(loss=loss, logits=logits, logs={"ce": ce.detach(), "trades_kl": kl.detach(), "adv_acc": adv_acc})

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "beta": self.beta, "eps": self.eps, "steps": self.steps, "relative_step": self.relative_step}
