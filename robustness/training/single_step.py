"""Single-step adversarial training: fast adversarial training and GradAlign.

``fast_adversarial`` (Wong, Rice and Kolter 2020, "Fast is better than free"): PGD training
(:class:`~robustness.training.adversarial.PGDTraining`) with one l-inf step of
``relative_step * eps`` (their 1.25 eps) from a uniform random start in the eps-ball, clipped
to the pixel box before the step; the loss is the mean cross-entropy at the result. It is the
``pgd_linf`` attack with ``steps=1, random_start=true``, which makes exactly their iterate:
``x + clip_eps(clip_box(u) + alpha sign grad)``, then clipped to the box.

``grad_align`` (Andriushchenko and Flammarion 2020): FGSM training (the mean cross-entropy at
``x + eps sign grad l(x)``, clipped to the box) plus

    lam * (1 - mean_i cos(grad l_i(x_i), grad l_i(x_i + eta_i))),   eta ~ U([-eps, eps]^d),

the mean over the examples whose two gradients are both non-zero (as the public code: the
others are left out, and with none left the term is 0). ``x + eta`` is not clipped to the box,
as in the public code. The gradient at ``x`` is a constant (the public code detaches it); the
one at ``x + eta`` is differentiated w.r.t. the parameters (double backpropagation). The public
code's FGSM step is 1.25 eps from a zero start, projected to the eps-ball: exactly FGSM's eps.

Which mode each forward runs in: the attacks (the inner searches) run on the model in
evaluation mode, on :class:`EvalView`'s folded twin, like PGD training here (both public codes
attack in training mode; the two agree for models without batch norm or dropout). The training
forward at the attacked batch updates the running statistics; GradAlign's two gradient forwards
use their own batch's statistics and leave the running ones as they are.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustness.errors import ConfigError
from robustness.geometry.gradients import input_gradient, loss_and_input_gradient
from robustness.registry import build, register
from robustness.training.adversarial import EvalView, PGDTraining
from robustness.training.penalty import (
    check_double_backward_precision,
    check_number,
    finite_on_every_rank,
    penalty_forward,
    refuse_compiled,
)
from robustness.training.regularizer import Regularizer, StepOutput


@register("regularizer", "fast_adversarial")
class FastAdversarialTraining(PGDTraining):
    """Fast adversarial training, FGSM with a random start (variant ``fast_adversarial``).

    eps:           l-inf radius, in [0, 1] pixels
    relative_step: the step as a multiple of ``eps`` (Wong et al.: 1.25)
    """

    variant = "fast_adversarial"

    def __init__(self, variant: str = "fast_adversarial", init_from: str | None = None, eps: float = 8 / 255, relative_step: float = 1.25) -> None:
        self.eps = check_number("eps", eps, example="0.0314")
        self.relative_step = check_number("relative_step", relative_step, strict=True, example="1.25")
        attack = {"name": "pgd_linf", "eps": self.eps, "step_size": self.relative_step * self.eps, "steps": 1, "random_start": True}
        super().__init__(variant=variant, init_from=init_from, attack=attack, adv_fraction=1.0)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "eps": self.eps, "relative_step": self.relative_step}


def gradient_alignment_penalty(clean_grad: Tensor, shifted_grad: Tensor) -> tuple[Tensor, Tensor]:
    """``(1 - mean cos, cos)``: the cosine of the two gradients of each example whose two
    gradients are both non-zero (shape (M,), M <= N), and the penalty over those examples (0
    when there are none)."""
    first, second = clean_grad.flatten(1), shifted_grad.flatten(1)
    first_norm, second_norm = first.norm(dim=1), second.norm(dim=1)
    kept = (first_norm != 0) & (second_norm != 0)
    cos = (first[kept] * second[kept]).sum(dim=1) / (first_norm[kept] * second_norm[kept])
    if len(cos) == 0:
        return shifted_grad.new_zeros(()), cos
    return 1.0 - cos.mean(), cos


def paper_lambda(eps: float) -> float:
    """GradAlign's weight at l-inf radius ``eps`` (pixels): the public scripts' log-linear rule
    for CIFAR-10, ``lam = exp(ln(10) e / 8 + ln 0.02) = 0.02 * 10^(e / 8)`` with ``e = 255 eps``
    (0.2 at 8/255, 2.0 at 16/255)."""
    return 0.02 * 10.0 ** (255.0 * eps / 8.0)


#: The largest radius the rule was fitted on (the scripts' grid is 1/255 to 16/255).
PAPER_EPS_MAX = 16 / 255


@register("regularizer", "grad_align")
class GradAlign(Regularizer):
    """FGSM training plus ``lam`` times GradAlign's gradient-misalignment term (variant ``grad_align``).

    eps: l-inf radius of FGSM and of the uniform noise ``eta``, in [0, 1] pixels
    lam: weight of the term; null takes :func:`paper_lambda` of ``eps``
    """

    variant = "grad_align"

    def __init__(self, variant: str = "grad_align", init_from: str | None = None, eps: float = 8 / 255, lam: float | None = None) -> None:
        self.variant = variant
        self.init_from = init_from
        self.eps = check_number("eps", eps, example="0.0314")
        if lam is None and self.eps > PAPER_EPS_MAX * (1 + 1e-9):
            # Extrapolated, the rule gives 31 at 0.1: a model that trained to 0.52 accuracy on the digits.
            raise ConfigError(
                f"GradAlign's weight rule 0.02 * 10^(255 eps / 8) was fitted for eps up to 16/255; at eps {self.eps:g} it would give "
                f"lam {paper_lambda(self.eps):.3g}",
                "set regularizer.lam (the digits recipes train grad_align with lam 1.0 at eps 0.1)",
            )
        self.lam = paper_lambda(self.eps) if lam is None else check_number("lam", lam, example="0.2")
        self.attack = build("attack", {"name": "fgsm", "eps": self.eps})
        self._view = EvalView()

    def check_precision(self, precision: str | int) -> None:
        check_double_backward_precision("grad_align", precision)

    def training_loss(self, model: nn.Module, x: Tensor, y: Tensor, epoch: int) -> StepOutput:
        refuse_compiled(model, "grad_align")
        with self._view(model, x) as target:
            x_adv = self.attack(target, x.detach(), y).x_adv
        adversarial_logits = model(x_adv)
        ce = F.cross_entropy(adversarial_logits, y)
        forward = penalty_forward(model, "batch")
        clean_logits, _, clean_grad = loss_and_input_gradient(forward, x, y)
        eta = torch.empty_like(x).uniform_(-self.eps, self.eps)
        keep_graph = self.lam > 0 and torch.is_grad_enabled()
        shifted_grad = input_gradient(forward, x.detach() + eta, y, keep_graph)
        penalty, cos = gradient_alignment_penalty(clean_grad, shifted_grad)
        loss = finite_on_every_rank(ce + self.lam * penalty)
        adv_acc = (adversarial_logits.argmax(1) == y).float().mean().detach()
        logs: dict[str, Tensor | float] = {"ce": ce.detach(), "grad_align_penalty": penalty.detach(), "adv_acc": adv_acc, "grad_align_kept": float(len(cos)) / len(x)}
        return StepOutput(loss=loss, logits=clean_logits.detach(), logs=logs)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "eps": self.eps, "lam": self.lam}
