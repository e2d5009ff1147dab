"""scikit-learn's bundled 8x8 handwritten digits: the embedded dataset, no network needed."""

from __future__ import annotations

import functools
from typing import Any

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from robustness import fingerprint
from robustness.data.base import DatasetInfo, ImageDataModule, TensorImageDataset
from robustness.registry import register

# The bundled images hold integers 0..16.
_DIGITS_MAX = 16.0


@functools.cache
def _digits_digest() -> str:
    bunch = load_digits()
    return fingerprint.of_tensors(torch.as_tensor(bunch.images), torch.as_tensor(bunch.target))


def digits_identity() -> dict[str, Any]:
    """The data identity of the bundled digits: the digest of all 1797 images and labels as loaded."""
    return {"sha256": _digits_digest()}


def load_digit_splits(seed: int, val_fraction: float = 0.15, test_fraction: float = 0.25) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic stratified train/val/test split of the 1797 digits, images in [0, 1], shape (N, 1, 8, 8)."""
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / _DIGITS_MAX
    labels = torch.tensor(bunch.target, dtype=torch.long)
    index = list(range(len(labels)))
    rest, test = train_test_split(index, test_size=test_fraction, stratify=labels.numpy(), random_state=seed)
    train, val = train_test_split(
        rest, test_size=val_fraction / (1.0 - test_fraction), stratify=labels[rest].numpy(), random_state=seed
    )
    pick = lambda ids: (images[sorted(ids)], labels[sorted(ids)])  # noqa: E731
    return {"train": pick(train), "val": pick(val), "test": pick(test)}


@register("dataset", "digits")
class DigitsDataModule(ImageDataModule):
    info = DatasetInfo(
        name="digits",
        num_classes=10,
        image_shape=(1, 8, 8),
        class_names=tuple(str(i) for i in range(10)),
        mean=(0.3,),
        std=(0.4,),
    )

    def __init__(self, val_fraction: float = 0.15, test_fraction: float = 0.25, **kwargs) -> None:
        super().__init__(**kwargs)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction

    def setup(self, stage: str | None = None) -> None:
        if self.test_set is not None:
            return
        splits = load_digit_splits(self.seed, self.val_fraction, self.test_fraction)
        train = TensorImageDataset(*splits["train"])
        self.train_set = self._subsample_train(train, splits["train"][1])
        self.val_set = TensorImageDataset(*splits["val"])
        self.test_set = TensorImageDataset(*splits["test"])

    def _content_identity(self) -> dict[str, Any]:
        return digits_identity()
