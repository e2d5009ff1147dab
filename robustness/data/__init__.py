"""Data modules, registered with ``@register("dataset", NAME)``; every dataset yields images in
[0, 1] and knows its class names. Build one with
``registry.build("dataset", cfg.dataset, data_dir=..., seed=...)``."""

from robustness.data.base import DatasetInfo, ImageDataModule

__all__ = ["DatasetInfo", "ImageDataModule"]

# Each dataset registers itself when its module is imported; every one is imported here.
from robustness.data import arrays, cifar, colour_digits, digits, fashion_mnist, imagefolder, svhn, tinyimagenet  # noqa: E402,F401
