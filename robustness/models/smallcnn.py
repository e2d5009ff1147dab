from __future__ import annotations

from torch import nn

from robustness.data.base import DatasetInfo
from robustness.models.normalize import Normalize, PixelClassifier
from robustness.registry import register

_ACTIVATIONS = {"relu": nn.ReLU, "softplus": nn.Softplus, "elu": nn.ELU, "tanh": nn.Tanh}


@register("model", "smallcnn")
def smallcnn(info: DatasetInfo, width: int = 32, activation: str = "relu", batch_norm: bool = True) -> PixelClassifier:
    """A three-block CNN sized for small images such as the 8x8 digits.

    ``activation`` may be a smooth one (softplus, elu, tanh) when a probe needs a non-zero
    logit Hessian; with ReLU only the loss's Gauss-Newton curvature remains.
    """
    from robustness.errors import ConfigError

    if activation not in _ACTIVATIONS:
        raise ConfigError(f"unknown activation '{activation}'", f"choose one of: {', '.join(_ACTIVATIONS)}")
    act = _ACTIVATIONS[activation]
    norm = (lambda c: nn.BatchNorm2d(c)) if batch_norm else (lambda c: nn.Identity())
    c = info.in_channels
    net = nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1), norm(width), act(),
        nn.Conv2d(width, 2 * width, 3, padding=1), norm(2 * width), act(),
        nn.MaxPool2d(2),
        nn.Conv2d(2 * width, 4 * width, 3, padding=1), norm(4 * width), act(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, info.num_classes),
    )
    return PixelClassifier(Normalize(info.mean, info.std), net)
