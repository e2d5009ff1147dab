"""Small real models and images that the tests and the benchmarks share.

A digits ``smallcnn`` trained in seconds (a real nonlinear classifier without the store or
Lightning) and an untrained 32x32 ``resnet18`` on upsampled digits (a deep network at CIFAR-10's
size). Tests reach these through ``tests/helpers.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustness.data.base import DatasetInfo
from robustness.data.digits import DigitsDataModule, load_digit_splits
from robustness.models.resnet import resnet18
from robustness.models.smallcnn import smallcnn
from robustness.tensors import l2_norm

# resnet18 costs about 1.5 CPU-seconds per image for a DeepFool run on one thread.
RESNET_IMAGES = 32


def train_digits_smallcnn(width: int = 16, epochs: int = 6, seed: int = 0) -> tuple[nn.Module, dict[str, tuple[Tensor, Tensor]]]:
    """A smallcnn fitted to the digits in a few seconds on a CPU (about 98% test accuracy), in eval mode.

    Also returns the digit splits it was trained on. Used by this benchmark and the attack tests,
    which need a real nonlinear classifier but not the store or Lightning.
    """
    splits = load_digit_splits(seed)
    x, y = splits["train"]
    torch.manual_seed(seed)
    model = smallcnn(DigitsDataModule.info, width=width)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=order).split(64):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.zero_grad(set_to_none=True)
    return model.eval(), splits


def correctly_classified(model: nn.Module, x: Tensor, y: Tensor, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """The first ``limit`` images that ``model`` gets right."""
    with torch.no_grad():
        right = model(x).argmax(1) == y
    x, y = x[right], y[right]
    return (x, y) if limit is None else (x[:limit], y[:limit])


def rho(x_adv: Tensor, x: Tensor) -> Tensor:
    """Per-image ||x_adv - x|| / ||x||."""
    return l2_norm(x_adv - x) / l2_norm(x)


def digits_resnet18(seed: int = 0, limit: int | None = None) -> tuple[nn.Module, Tensor, Tensor]:
    """An untrained resnet18 for 32x32 RGB, 10 classes, the digits upsampled to that size, and
    its own predictions as the labels to leave (an untrained model is right about nothing)."""
    torch.manual_seed(seed)
    info = DatasetInfo(
        name="digits32", num_classes=10, image_shape=(3, 32, 32), class_names=DigitsDataModule.info.class_names,
        mean=DigitsDataModule.info.mean * 3, std=DigitsDataModule.info.std * 3,
    )
    model = resnet18(info).eval()
    x = load_digit_splits(seed)["test"][0][: RESNET_IMAGES if limit is None else limit]
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).clamp_(0.0, 1.0).repeat(1, 3, 1, 1)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y
