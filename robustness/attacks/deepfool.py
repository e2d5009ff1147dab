"""DeepFool (l2), untargeted and targeted, batched over images and over candidate classes.

Moosavi-Dezfooli, Fawzi and Frossard (2016): at each iteration the classifier is replaced by its
first-order expansion at the current point and the point jumps to the nearest linearised boundary.
The perturbations of all iterations are summed into ``r_total`` and the returned image is
``clip(x + (1 + overshoot) * r_total, 0, 1)``.

Cost per iteration: one forward pass over the images still running and one input-gradient
backward pass per candidate class, all reusing that forward's graph. Images that are already
fooled leave the working set, so each one pays only for its own iterations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustness.attacks.base import AttackResult, check_attack_classes, prepare_attack_inputs
from robustness.tensors import l2_norm
from robustness.errors import InputError
from robustness.registry import register

# Added to each step's distance so that a step lands past a boundary rather than on it even
# with overshoot 0 (the reference implementation adds 1e-4; smaller keeps the linear-model
# distances exact to 1e-4 while still moving float32 pixels).
_NUDGE = 1e-5
# Guards the division by a gradient norm where a logit difference is locally flat.
_TINY = 1e-8


def deepfool(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    *,
    target: Tensor | None = None,
    overshoot: float = 0.02,
    max_iter: int = 50,
    num_candidates: int = 10,
) -> AttackResult:
    """DeepFool l2 on a batch of images in [0, 1].

    Untargeted (``target`` None): move each image out of class ``y`` (default: the model's
    prediction) across the nearest linearised boundary among the ``num_candidates`` classes with
    the highest initial logits; success means the prediction is no longer ``y``.

    Targeted: push each image into class ``target[i]``, each step crossing the linearised
    boundary between the current class and the target; success means the prediction equals it.

    ``steps`` counts the perturbation steps each image took (0 for an image already fooled).
    """
    _check_params(overshoot, max_iter, num_candidates)
    prepare_attack_inputs(model, x, y, target)
    x0 = x.detach()
    n = x0.shape[0]
    device = x0.device
    steps = torch.zeros(n, dtype=torch.long, device=device)
    success = torch.zeros(n, dtype=torch.bool, device=device)
    if n == 0:
        return AttackResult.unattacked(x0)

    x_adv = x0.clone()
    r_total = torch.zeros_like(x0)
    active = torch.arange(n, device=device)  # images still being attacked
    source: Tensor | None = None  # the class each image must leave (untargeted)
    others: Tensor | None = None  # (n, k-1) candidate classes to move to (untargeted)
    goal = None if target is None else target.to(device=device, dtype=torch.long)

    with torch.enable_grad():
        for it in range(max_iter + 1):
            xa = x_adv[active].requires_grad_(True)
            logits = model(xa)
            if it == 0:
                source, others = _setup(model, x0, y, goal, logits.detach(), num_candidates)
            pred = logits.detach().argmax(1)
            done = pred == goal[active] if goal is not None else pred != source[active]
            success[active[done]] = True
            if it == max_iter or bool(done.all()):
                break
            keep = ~done
            idx = active[keep]

            if goal is None:
                step = _untargeted_step(logits, xa, keep, source[idx], others[idx])
            else:
                step = _targeted_step(logits, xa, keep, pred[keep], goal[idx])
            r_total[idx] += step
            x_adv[idx] = (x0[idx] + (1.0 + overshoot) * r_total[idx]).clamp_(0.0, 1.0)
            steps[idx] += 1
            active = idx

    x_adv = x_adv.detach()
    return AttackResult(x_adv, success, l2_norm(x_adv - x0), steps)


@register("attack", "deepfool")
@dataclass
class DeepFool:
    """``attack=deepfool``: see :func:`deepfool`."""

    overshoot: float = 0.02
    max_iter: int = 50
    num_candidates: int = 10

    def __post_init__(self) -> None:
        _check_params(self.overshoot, self.max_iter, self.num_candidates)

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor | None = None, target: Tensor | None = None) -> AttackResult:
        return deepfool(
            model, x, y, target=target, overshoot=self.overshoot, max_iter=self.max_iter, num_candidates=self.num_candidates
        )


def _check_params(overshoot: float, max_iter: int, num_candidates: int) -> None:
    if not overshoot >= 0:
        raise InputError(f"overshoot must be >= 0, got {overshoot}", "set attack.overshoot to a small non-negative number, e.g. 0.02")
    if int(max_iter) != max_iter or max_iter < 1:
        raise InputError(f"max_iter must be a positive integer, got {max_iter}", "set attack.max_iter, e.g. 50")
    if int(num_candidates) != num_candidates or num_candidates < 2:
        raise InputError(
            f"num_candidates must be an integer >= 2 (the source class and at least one other), got {num_candidates}",
            "set attack.num_candidates, e.g. 10",
        )


def _setup(
    model: nn.Module, x0: Tensor, y: Tensor | None, goal: Tensor | None, logits: Tensor, num_candidates: int
) -> tuple[Tensor, Tensor | None]:
    """Validate labels against the class count and pick the source and candidate classes."""
    num_classes = logits.shape[1]
    check_attack_classes(model, x0, y, goal, num_classes)
    if goal is not None:
        return logits.argmax(1), None
    source = logits.argmax(1) if y is None else y.to(device=logits.device, dtype=torch.long)
    # Candidates are the top logits other than the source, ranked once at the start as in the
    # reference implementation; the source itself is excluded even when y is not the top class.
    k = min(num_candidates, num_classes) - 1
    ranked = logits.scatter(1, source[:, None], float("-inf"))
    others = ranked.topk(k, dim=1).indices
    return source, others


def _untargeted_step(logits: Tensor, xa: Tensor, keep: Tensor, source: Tensor, others: Tensor) -> Tensor:
    """The minimal step onto the nearest linearised boundary ``f_k - f_source = 0``."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    kept = rows[keep]
    # One backward per candidate, all through the same forward graph. In eval mode the images
    # are independent, so the gradient of a batch sum is the per-image gradient; the fooled
    # images get zero cotangent and drop out below.
    grads = []
    for j in range(others.shape[1]):
        cot = torch.zeros_like(logits)
        cot[kept, others[:, j]] = 1.0
        cot[kept, source] = -1.0
        (g,) = torch.autograd.grad(logits, xa, cot, retain_graph=j + 1 < others.shape[1])
        grads.append(g[keep].flatten(1))
    w = torch.stack(grads, dim=1)  # (m, k-1, d)
    z = logits.detach()[keep]
    f = z.gather(1, others) - z.gather(1, source[:, None])  # (m, k-1), negative while not fooled
    w_norm = w.norm(dim=2)
    dist = f.abs() / (w_norm + _TINY)
    best = dist.argmin(dim=1)
    m = torch.arange(len(best), device=best.device)
    scale = (dist[m, best] + _NUDGE) / (w_norm[m, best] + _TINY)
    return (scale[:, None] * w[m, best]).view(-1, *xa.shape[1:])


def _targeted_step(logits: Tensor, xa: Tensor, keep: Tensor, current: Tensor, goal: Tensor) -> Tensor:
    """The minimal step onto the linearised boundary between the current class and the target."""
    rows = torch.arange(logits.shape[0], device=logits.device)[keep]
    cot = torch.zeros_like(logits)
    cot[rows, goal] = 1.0
    cot[rows, current] = -1.0
    (g,) = torch.autograd.grad(logits, xa, cot)
    w = g[keep].flatten(1)
    z = logits.detach()[keep]
    f = z.gather(1, goal[:, None]) - z.gather(1, current[:, None])
    w_norm = w.norm(dim=1, keepdim=True)
    scale = (f.abs() / (w_norm + _TINY) + _NUDGE) / (w_norm + _TINY)
    return (scale * w).view(-1, *xa.shape[1:])
