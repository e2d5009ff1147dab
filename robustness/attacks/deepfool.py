"""DeepFool (l2), untargeted and targeted, batched over images and over candidate classes.

Moosavi-Dezfooli, Fawzi and Frossard (2016): at each iteration the classifier is replaced by its
first-order expansion at the current point and the point jumps to the nearest linearised boundary.
The perturbations of all iterations are summed into ``r_total`` and the returned image is
``clip(x + (1 + overshoot) * r_total, 0, 1)``.

Cost per iteration: one forward pass over the images still running and the input gradients of
the k-1 candidate logit differences at it (:func:`robustness.geometry.jacobian.linearize`: for
networks of affine, ReLU and pooling layers all k-1 in one backward sweep of k-1 times the rows,
otherwise one autograd backward per candidate through the same forward graph). Images that are
fooled leave the working set, so each one pays only for its own iterations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustness.attacks.base import AttackResult, MinimisationAttack, Perturbed, check_attack_classes, clean_label, goal_reached
from robustness.errors import InputError
from robustness.geometry.jacobian import Linearization, linearize
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
    """DeepFool l2 on a batch of images in [0, 1]; see :class:`DeepFool`."""
    return DeepFool(overshoot=overshoot, max_iter=max_iter, num_candidates=num_candidates)(model, x, y, target)


@register("attack", "deepfool")
@dataclass
class DeepFool(MinimisationAttack):
    """``attack=deepfool``: DeepFool l2 on a batch of images in [0, 1].

    Untargeted (``target`` None): move each image out of class ``y`` (default: the model's
    prediction) across the nearest linearised boundary among the ``num_candidates`` classes with
    the highest initial logits; success means the prediction is no longer ``y``.

    Targeted: push each image into class ``target[i]``, each step crossing the linearised
    boundary between the current class and the target; success means the prediction equals it.

    ``steps`` counts the perturbation steps each image took (0 for an image already fooled).
    """

    overshoot: float = 0.02
    max_iter: int = 50
    num_candidates: int = 10

    def __post_init__(self) -> None:
        _check_params(self.overshoot, self.max_iter, self.num_candidates)

    def perturb(self, model: nn.Module, x0: Tensor, y: Tensor | None, target: Tensor | None) -> Perturbed:
        max_iter, overshoot = self.max_iter, self.overshoot
        n = x0.shape[0]
        steps = torch.full((n,), max_iter, dtype=torch.long, device=x0.device)
        x_adv = torch.empty_like(x0)
        final_logits = torch.empty(0)

        # The working set holds only the images still being attacked, compacted whenever some
        # of them succeed, so each image pays for its own iterations and nothing is re-indexed
        # from the full batch inside the loop.
        active = torch.arange(n, device=x0.device)
        start, current, r_total = x0, x0, torch.zeros_like(x0)
        label = source = others = None
        goal = target
        for it in range(max_iter + 1):
            last = it == max_iter
            if last:
                with torch.no_grad():
                    z, at = model(current), None
            else:
                at = linearize(model, current)
                z = at.logits
            if it == 0:
                check_attack_classes(model, x0, y, target, z.shape[1])
                final_logits = torch.empty_like(z)
                if target is None:
                    label = source = clean_label(z, y)
                    others = _candidates(z, source, self.num_candidates)
            done = goal_reached(z, source, goal)
            n_done = int(done.sum())  # the loop's one host sync per iteration
            if n_done or last:
                finished = torch.ones_like(done) if last else done
                rows = active[finished]
                x_adv[rows] = current[finished]
                final_logits[rows] = z[finished]
                steps[rows] = it
                if last or n_done == len(active):
                    break
                keep = ~done
                active, start, current, r_total = active[keep], start[keep], current[keep], r_total[keep]
                at = at.restricted(keep)
                if goal is not None:
                    goal = goal[keep]
                else:
                    source, others = source[keep], others[keep]

            step = _untargeted_step(at, source, others) if goal is None else _targeted_step(at, goal)
            r_total = r_total + step
            current = (start + (1.0 + overshoot) * r_total).clamp_(0.0, 1.0)

        return Perturbed(x_adv, steps, label, target, final_logits)


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


def _candidates(logits: Tensor, source: Tensor, num_candidates: int) -> Tensor:
    """(n, k-1) classes to move to: the top logits other than the source, ranked once at the
    start as in the reference implementation; the source itself is excluded even when y is not
    the top class."""
    k = min(num_candidates, logits.shape[1]) - 1
    return logits.scatter(1, source[:, None], float("-inf")).topk(k, dim=1).indices


def _untargeted_step(at: Linearization, source: Tensor, others: Tensor) -> Tensor:
    """The minimal step onto the nearest linearised boundary ``f_k - f_source = 0``."""
    z = at.logits
    # One cotangent per candidate: the input gradient of f_k - f_source for each image.
    cotangents = torch.zeros(others.shape[1], *z.shape, dtype=z.dtype, device=z.device)
    candidate_rows = others.T[:, :, None]
    cotangents.scatter_(2, candidate_rows, 1.0)
    cotangents.scatter_(2, source[None, :, None].expand_as(candidate_rows), -1.0)
    w = at.vjp(cotangents).flatten(2).transpose(0, 1)  # (m, k-1, d)
    f = z.gather(1, others) - z.gather(1, source[:, None])  # (m, k-1), negative while not fooled
    w_norm = w.norm(dim=2)
    dist = f.abs() / (w_norm + _TINY)
    best = dist.argmin(dim=1, keepdim=True)
    scale = (dist.gather(1, best) + _NUDGE) / (w_norm.gather(1, best) + _TINY)
    w_best = w.gather(1, best[:, :, None].expand(-1, 1, w.shape[2])).squeeze(1)
    return (scale * w_best).view(-1, *at.input_shape)


def _targeted_step(at: Linearization, goal: Tensor) -> Tensor:
    """The minimal step onto the linearised boundary between the current class and the target."""
    z = at.logits
    current = z.argmax(1)
    rows = torch.arange(len(goal), device=goal.device)
    cotangent = torch.zeros_like(z)
    cotangent[rows, goal] = 1.0
    cotangent[rows, current] = -1.0
    w = at.vjp(cotangent[None])[0].flatten(1)
    f = z.gather(1, goal[:, None]) - z.gather(1, current[:, None])
    w_norm = w.norm(dim=1, keepdim=True)
    scale = (f.abs() / (w_norm + _TINY) + _NUDGE) / (w_norm + _TINY)
    return (scale * w).view(-1, *at.input_shape)
