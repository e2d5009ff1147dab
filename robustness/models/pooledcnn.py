"""A small CNN fit for 28x28 images: it pools twice and keeps where its features are."""

from __future__ import annotations

from torch import nn

from robustness.data.base import DatasetInfo
from robustness.errors import ConfigError
from robustness.models.normalize import Normalize, PixelClassifier
from robustness.models.smallcnn import _ACTIVATIONS as ACTIVATIONS  # one list of activations for both CNNs
from robustness.registry import register


@register("model", "pooledcnn")
def pooledcnn(info: DatasetInfo, width: int = 16, activation: str = "relu", batch_norm: bool = True) -> PixelClassifier:
    """Three 3x3 convolution blocks (convolution, batch norm, activation) with a 2x2 max-pool in
    each of the first two (28x28 -> 14x14 -> 7x7), then one linear layer on the whole last
    feature map.

    The linear head sees every position of that map, so the model can tell where a feature is:
    ``smallcnn`` averages its map over the whole image after one pooling step, which on 28x28
    images loses where things are. Pooling early also makes a 28x28 forward some 4x cheaper
    than ``smallcnn``'s at the same width. Images need a height and width divisible by 4.
    """
    if activation not in ACTIVATIONS:
        raise ConfigError(f"unknown activation '{activation}'", f"choose one of: {', '.join(ACTIVATIONS)}")
    channels, height, width_px = info.image_shape
    if height % 4 or width_px % 4:
        raise ConfigError(
            f"model=pooledcnn pools twice by 2, so it needs image sides divisible by 4; {info.name} has {height}x{width_px}",
            "use model=smallcnn or a resnet for these images",
        )
    act = ACTIVATIONS[activation]
    norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
    # Pooling before the activation: max-pooling commutes with a monotone activation (ReLU, ELU,
    # softplus, tanh), so this is the usual conv-norm-act-pool block, with the activation (and
    # the certifier's work on it) on a quarter of the units.
    net = nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1), norm(width),
        nn.MaxPool2d(2), act(),
        nn.Conv2d(width, 2 * width, 3, padding=1), norm(2 * width),
        nn.MaxPool2d(2), act(),
        nn.Conv2d(2 * width, 4 * width, 3, padding=1), norm(4 * width), act(),
        nn.Flatten(),
        nn.Linear(4 * width * (height // 4) * (width_px // 4), info.num_classes),
    )
    return PixelClassifier(Normalize(info.mean, info.std), net)
