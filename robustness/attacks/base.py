"""The one call shape every attack shares: ``attack(model, x, y) -> AttackResult``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from robustness.errors import InputError
from robustness.tensors import check_images


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
