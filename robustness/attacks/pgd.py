"""Projected gradient descent in an l-inf or l2 ball (Madry et al. 2018) and FGSM (Goodfellow et al. 2015).

Each step is one forward and one input-gradient backward pass (parameter gradients are never
computed), followed by a projection onto the eps ball and then onto the pixel box [0, 1]. Both
projections are per coordinate shrinkages towards ``x`` once the ball step is done, so the box
clip never takes an iterate back outside the ball.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustness.attacks.base import AttackResult, FixedEpsilonAttack, Perturbed, check_attack_classes, check_nonnegative
from robustness.tensors import l2_norm
from robustness.errors import InputError
from robustness.registry import register

_TINY = 1e-12


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    *,
    target: Tensor | None = None,
    eps: float,
    step_size: float,
    steps: int,
    norm: str = "linf",
    random_start: bool = True,
) -> AttackResult:
    """PGD on a batch of images in [0, 1]; see :class:`PGD`."""
    _check_params(eps, step_size, steps, norm)
    attack = PGDLinf if norm == "linf" else PGDL2
    return attack(eps=eps, step_size=step_size, steps=steps, random_start=random_start)(model, x, y, target)


@dataclass
class PGD(FixedEpsilonAttack):
    """PGD in the ``norm`` ball of radius ``eps``; returns the last iterate.

    Untargeted: ascend the cross-entropy of ``y`` (default: the model's prediction on ``x``);
    success means the prediction is no longer ``y``. Targeted: descend the cross-entropy of
    ``target``; success means the prediction equals it. Every image runs all ``steps``.
    """

    eps: float
    step_size: float
    steps: int = 10
    random_start: bool = True
    norm: ClassVar[str] = "linf"

    def __post_init__(self) -> None:
        _check_params(self.eps, self.step_size, self.steps, self.norm)

    def perturb(self, model: nn.Module, x0: Tensor, y: Tensor | None, target: Tensor | None) -> Perturbed:
        eps, norm = self.eps, self.norm
        label = None
        if target is None:
            if y is None:
                with torch.no_grad():
                    y = model(x0).argmax(1)
            label = y.to(device=x0.device, dtype=torch.long)
        wanted = target if target is not None else label
        sign = -1.0 if target is not None else 1.0  # descend towards a target, ascend away from y

        delta = _random_start(x0, eps, norm) if self.random_start and eps > 0 else torch.zeros_like(x0)
        x_adv = (x0 + delta).clamp_(0.0, 1.0)
        for step in range(self.steps):
            xa = x_adv.requires_grad_(True)
            logits = model(xa)
            if step == 0:
                check_attack_classes(model, x0, y, target, logits.shape[1])
            loss = F.cross_entropy(logits, wanted, reduction="sum")
            (grad,) = torch.autograd.grad(loss, xa)
            x_adv = _ascend(xa.detach(), grad, sign * self.step_size, norm)
            x_adv = _project(x_adv, x0, eps, norm)
        steps = torch.full((x0.shape[0],), self.steps, dtype=torch.long, device=x0.device)
        return Perturbed(x_adv, steps, label, target)


@register("attack", "pgd_linf")
@dataclass
class PGDLinf(PGD):
    """``attack=pgd_linf``: PGD in the l-inf ball of radius ``eps``, sign-gradient steps."""

    eps: float = 8 / 255
    step_size: float = 2 / 255
    norm: ClassVar[str] = "linf"


@register("attack", "pgd_l2")
@dataclass
class PGDL2(PGD):
    """``attack=pgd_l2``: PGD in the l2 ball of radius ``eps``, normalised-gradient steps."""

    eps: float = 0.5
    step_size: float = 0.1
    norm: ClassVar[str] = "l2"


@register("attack", "fgsm")
@dataclass
class FGSM(FixedEpsilonAttack):
    """``attack=fgsm``: one sign-gradient step of size ``eps`` from ``x`` (PGD l-inf, one step, no random start)."""

    eps: float = 8 / 255
    norm: ClassVar[str] = "linf"

    def __post_init__(self) -> None:
        _check_params(self.eps, self.eps, 1, "linf")

    def perturb(self, model: nn.Module, x0: Tensor, y: Tensor | None, target: Tensor | None) -> Perturbed:
        return PGDLinf(eps=self.eps, step_size=self.eps, steps=1, random_start=False).perturb(model, x0, y, target)


def _check_params(eps: float, step_size: float, steps: int, norm: str) -> None:
    check_nonnegative("eps", eps)
    check_nonnegative("step_size", step_size)
    if int(steps) != steps or steps < 1:
        raise InputError(f"steps must be a positive integer, got {steps}", "set attack.steps, e.g. 10")
    if norm not in ("linf", "l2"):
        raise InputError(f"unknown norm '{norm}'", "choose 'linf' or 'l2'")


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def _random_start(x0: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "linf":
        return torch.empty_like(x0).uniform_(-eps, eps)
    # Uniform in the l2 ball: a uniform direction and a radius distributed as eps * U^(1/d).
    direction = torch.randn_like(x0)
    direction /= _per_sample(l2_norm(direction) + _TINY, x0)
    d = x0[0].numel()
    radius = eps * torch.rand(x0.shape[0], device=x0.device, dtype=x0.dtype) ** (1.0 / d)
    return direction * _per_sample(radius, x0)


def _ascend(x: Tensor, grad: Tensor, step: float, norm: str) -> Tensor:
    if norm == "linf":
        return x + step * grad.sign()
    return x + step * grad / _per_sample(l2_norm(grad) + _TINY, grad)


def _project(x_adv: Tensor, x0: Tensor, eps: float, norm: str) -> Tensor:
    delta = x_adv - x0
    if norm == "linf":
        delta = delta.clamp_(-eps, eps)
    else:
        delta = delta * _per_sample((eps / (l2_norm(delta) + _TINY)).clamp(max=1.0), delta)
    return (x0 + delta).clamp_(0.0, 1.0)
