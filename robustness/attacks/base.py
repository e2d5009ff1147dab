"""The one call shape every attack shares, ``attack(model, x, y=None, target=None) -> AttackResult``,
and the two kinds of attack behind it (foolbox's two shapes):

- :class:`MinimisationAttack` (DeepFool, runner_up): looks for the smallest perturbation that
  reaches the goal; ``norm`` is what it needed, ``success`` whether it got there at all.
- :class:`FixedEpsilonAttack` (PGD, FGSM, colour, AutoAttack): looks for a perturbation within a
  budget ``eps`` in its own ``norm``; :meth:`FixedEpsilonAttack.with_eps` gives the same attack at
  another radius, so callers that sweep eps choose by type, not by config keys.

Success is decided once, here in :meth:`Attack.__call__`, from the logits of the final iterate
(handed over by the attack when it has them, so it costs no extra forward) and one criterion
(:func:`goal_reached`): untargeted, the prediction is no longer the label; targeted, it is the
target. Callers read ``AttackResult.success`` and never check again.
"""

from __future__ import annotations

from typing import final

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustness.errors import InputError
from robustness.tensors import check_images, l2_norm


@dataclass
class AttackResult:
    """What an attack returns, one entry per input image.

    x_adv:   adversarial images, same shape as the inputs, in [0, 1]
    success: bool mask; True where the attack reached its goal (label changed, or target reached)
    norm:    l2 norm of ``x_adv - x`` per image (the attack's own norm where it has another one
             is available from ``x_adv`` directly)
    steps:   iterations each image used (an image stops at its own success)
    """

    x_adv: Tensor
    success: Tensor
    norm: Tensor
    steps: Tensor

    @classmethod
    def unattacked(cls, x: Tensor) -> "AttackResult":
        """The result for images left as they are: no success, zero norm, zero steps."""
        n, device = x.shape[0], x.device
        return cls(
            x.detach().clone(),
            torch.zeros(n, dtype=torch.bool, device=device),
            torch.zeros(n, dtype=x.dtype, device=device),
            torch.zeros(n, dtype=torch.long, device=device),
        )

    def detach(self) -> "AttackResult":
        return AttackResult(self.x_adv.detach(), self.success.detach(), self.norm.detach(), self.steps.detach())


def check_nonnegative(name: str, value: float) -> None:
    if value < 0:
        raise InputError(f"{name} must be >= 0, got {value}", f"set attack.{name} to a non-negative number")


def prepare_attack_inputs(model: nn.Module, x: Tensor, y: Tensor | None = None, target: Tensor | None = None) -> None:
    """Every check an attack can make before its first forward pass; raises :class:`InputError`.

    Label ranges need the number of classes, which only the model's output tells: call
    :func:`robustness.tensors.check_images` again with ``num_classes`` once the first logits exist.
    """
    if torch.is_inference_mode_enabled():
        raise InputError(
            "attacks need gradients, but inference mode is on (Lightning runs validation and test under it)",
            "run the attack outside the Trainer, or build the Trainer with inference_mode=False",
        )
    check_images(model, x, y)
    if target is not None:
        if not torch.is_tensor(target) or target.dim() != 1 or target.shape[0] != x.shape[0]:
            raise InputError(
                f"target must be one class index per image, got {getattr(target, 'shape', type(target).__name__)} for {x.shape[0]} images",
                "pass a LongTensor of shape (N,)",
            )
        if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise InputError(f"target classes must be integer indices, got dtype {target.dtype}")
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is not None and (param.device != x.device or param.dtype != x.dtype):
        raise InputError(
            f"the model holds {param.dtype} weights on {param.device} but the images are {x.dtype} on {x.device}",
            "move the images with x.to(device, dtype) (or the model with model.to(...)) before attacking",
        )


def check_attack_classes(model: nn.Module, x: Tensor, y: Tensor | None, target: Tensor | None, num_classes: int) -> None:
    """The checks that need the model's class count (read off its first logits); raises :class:`InputError`."""
    if num_classes < 2:
        raise InputError(f"the model has {num_classes} output, attacks need at least 2 classes", "attack a classifier's logits")
    check_images(model, x, y, num_classes)
    if target is not None and len(target) and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise InputError(
            f"target classes must lie in [0, {num_classes - 1}], got values in [{int(target.min())}, {int(target.max())}]",
            "pick targets among the model's classes",
        )


def goal_reached(logits: Tensor, label: Tensor | None, goal: Tensor | None) -> Tensor:
    """The one success criterion: the top class is ``goal`` where given, else it is not ``label``."""
    pred = logits.argmax(1)
    return pred == goal if goal is not None else pred != label


@dataclass
class Perturbed:
    """What an attack's :meth:`Attack.perturb` hands to the base.

    x_adv:  the final iterates, in [0, 1]
    steps:  iterations each image used
    label:  the class each image must leave (``y``, or the clean prediction where ``y`` is None);
            None when ``goal`` decides
    goal:   the class each image must reach (the caller's target, or one the attack chose)
    logits: the model's logits on ``x_adv`` when the attack computed them anyway, else None (the
            base then runs one forward)
    """

    x_adv: Tensor
    steps: Tensor
    label: Tensor | None
    goal: Tensor | None = None
    logits: Tensor | None = None


class Attack(ABC):
    """Validates the inputs, runs :meth:`perturb` with gradients on, decides success."""

    #: images per forward when the base has to compute the final logits itself
    eval_batch_size: int = 1024

    @final  # subclasses write perturb(): validation and the success criterion stay the base's
    def __call__(self, model: nn.Module, x: Tensor, y: Tensor | None = None, target: Tensor | None = None) -> AttackResult:
        prepare_attack_inputs(model, x, y, target)
        x0 = x.detach()
        if x0.shape[0] == 0:
            return AttackResult.unattacked(x0)
        goal = None if target is None else target.to(device=x0.device, dtype=torch.long)
        with torch.enable_grad():  # probes may call attacks under no_grad
            out = self.perturb(model, x0, y, goal)
        x_adv = out.x_adv.detach()
        logits = out.logits
        if logits is None:
            with torch.no_grad():
                logits = torch.cat([model(chunk) for chunk in x_adv.split(self.eval_batch_size)])
        success = goal_reached(logits.detach(), out.label, out.goal)
        return AttackResult(x_adv, success, l2_norm(x_adv - x0), out.steps.to(device=x0.device, dtype=torch.long))

    @abstractmethod
    def perturb(self, model: nn.Module, x: Tensor, y: Tensor | None, target: Tensor | None) -> Perturbed:
        """Attack a non-empty, validated batch; ``target`` is None or a LongTensor on x's device."""


class MinimisationAttack(Attack):
    """Looks for the smallest perturbation that reaches the goal (no budget)."""


class FixedEpsilonAttack(Attack):
    """Looks for a perturbation within ``eps`` in the attack's ``norm``.

    Subclasses have an ``eps`` attribute and a ``norm`` ("linf", "l2", or the unit of their own
    budget) and may override :meth:`with_eps` when more than ``eps`` follows the radius.
    """

    eps: float
    norm: str

    def with_eps(self, eps: float, relative_step: float | None = None) -> "FixedEpsilonAttack":
        """The same attack at radius ``eps``; attacks with a ``step_size`` take
        ``relative_step * eps`` as their step where ``relative_step`` is given."""
        changes: dict[str, float] = {"eps": eps}
        if relative_step is not None and hasattr(self, "step_size"):
            changes["step_size"] = relative_step * eps
        return dataclasses.replace(self, **changes)


def clean_label(logits: Tensor, y: Tensor | None) -> Tensor:
    """The class an untargeted attack must leave: ``y``, or the prediction where ``y`` is None."""
    return logits.argmax(1) if y is None else y.to(device=logits.device, dtype=torch.long)
