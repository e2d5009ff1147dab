"""torchvision ResNets with a stem for small images (32x32, 64x64)."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet as tv_resnet

from robustness.data.base import DatasetInfo
from robustness.models.normalize import Normalize, PixelClassifier
from robustness.registry import register


def _small_image_resnet(builder, info: DatasetInfo) -> PixelClassifier:
    net = builder(weights=None, num_classes=info.num_classes)
    # A 3x3 stride-1 stem without max-pool keeps spatial detail that the ImageNet stem
    # (7x7 stride 2, then max-pool) would throw away on 32x32 or 64x64 inputs.
    net.conv1 = nn.Conv2d(info.in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return PixelClassifier(Normalize(info.mean, info.std), net)


@register("model", "resnet18")
def resnet18(info: DatasetInfo) -> PixelClassifier:
    return _small_image_resnet(tv_resnet.resnet18, info)


@register("model", "resnet50")
def resnet50(info: DatasetInfo) -> PixelClassifier:
    return _small_image_resnet(tv_resnet.resnet50, info)
