"""The report's attack: gradient ascent on the pixels until the runner-up class is on top.

For each image the class with the second highest logit at the start (the "runner-up") is fixed;
the pixels then climb the margin ``z_runner_up - max_{j != runner_up} z_j`` in fixed-size
normalised steps (l2: gradient over its norm; l-inf: gradient sign), clipped to [0, 1], until the
runner-up is the top class. Climbing the margin rather than the runner-up's probability moves
the image towards the boundary it has to cross and nowhere else, so the result stays close to the
clean image, as the report wants. Each image stops at its own success.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustness.attacks.base import MinimisationAttack, Perturbed, check_attack_classes, clean_label, goal_reached
from robustness.tensors import l2_norm
from robustness.errors import InputError
from robustness.registry import register

_TINY = 1e-12


@register("attack", "runner_up")
@dataclass
class RunnerUp(MinimisationAttack):
    """``attack=runner_up``.

    ``y`` (default: the prediction) is the class to leave: the runner-up is the most probable
    class other than ``y``, i.e. the second most probable one when ``y`` is predicted. A
    ``target`` replaces the runner-up by a given class. Success: the goal class is on top.
    """

    step_size: float = 0.02
    max_steps: int = 500
    norm: str = "l2"

    def __post_init__(self) -> None:
        if not self.step_size > 0:
            raise InputError(f"step_size must be > 0, got {self.step_size}", "set attack.step_size, e.g. 0.02")
        if int(self.max_steps) != self.max_steps or self.max_steps < 1:
            raise InputError(f"max_steps must be a positive integer, got {self.max_steps}", "set attack.max_steps, e.g. 500")
        if self.norm not in ("l2", "linf"):
            raise InputError(f"unknown norm '{self.norm}'", "set attack.norm to 'l2' or 'linf'")

    def perturb(self, model: nn.Module, x0: Tensor, y: Tensor | None, target: Tensor | None) -> Perturbed:
        n = x0.shape[0]
        steps = torch.full((n,), self.max_steps, dtype=torch.long, device=x0.device)
        x_adv = x0.clone()
        final_logits = torch.empty(0)
        active = torch.arange(n, device=x0.device)
        goal = torch.empty(0, dtype=torch.long)
        for it in range(self.max_steps + 1):
            last = it == self.max_steps
            xa = x_adv[active].requires_grad_(not last)
            with torch.set_grad_enabled(not last):
                logits = model(xa)
            z = logits.detach()
            if it == 0:
                check_attack_classes(model, x0, y, target, z.shape[1])
                goal = target if target is not None else _runner_up(z, clean_label(z, y))
                final_logits = torch.empty_like(z)
            g = goal[active]
            done = goal_reached(z, None, g)
            finished = torch.ones_like(done) if last else done
            final_logits[active[finished]] = z[finished]
            steps[active[finished]] = it
            if last or bool(done.all()):
                break
            # The margin of the goal class over its strongest rival; the images are
            # independent in eval mode, so the gradient of the sum is per image.
            rival = z.scatter(1, g[:, None], float("-inf")).argmax(1)
            rows = torch.arange(len(g), device=x0.device)
            margin = logits[rows, g] - logits[rows, rival]
            (grad,) = torch.autograd.grad(margin.sum(), xa)
            keep = ~done
            idx = active[keep]
            grad = grad[keep]
            if self.norm == "l2":
                step = grad / (l2_norm(grad) + _TINY).view(-1, *([1] * (grad.dim() - 1)))
            else:
                step = grad.sign()
            x_adv[idx] = (xa.detach()[keep] + self.step_size * step).clamp_(0.0, 1.0)
            active = idx
        return Perturbed(x_adv, steps, None, goal, final_logits)


def _runner_up(logits: Tensor, source: Tensor) -> Tensor:
    """The most probable class other than ``source``."""
    return logits.scatter(1, source[:, None], float("-inf")).argmax(1)
