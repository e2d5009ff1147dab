"""SVHN (cropped digits, 32x32 RGB) read from the official ``train_32x32.mat`` and ``test_32x32.mat``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import torch
from torch import Tensor

from robustness.data.base import DatasetInfo, ImageDataModule, check_val_fraction, content_identity, hold_out_validation, missing_data_error
from robustness.data.cifar import fetch_file
from robustness.errors import ConfigError, DataError
from robustness.registry import register

SVHN_URLS = {
    "train": ("http://ufldl.stanford.edu/housenumbers/train_32x32.mat", "e26dedcc434d2e4c54c9b2d4a06d8373"),
    "test": ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat", "eb5a983be6a315427106f1b164d9cef3"),
}
SVHN_FOLDER = "svhn"


def _filename(split: str) -> str:
    return f"{split}_32x32.mat"


def read_svhn_mat(path: Path) -> tuple[Tensor, Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) in 0..9 from one official SVHN .mat file."""
    hint = f"delete {path} and rerun with dataset.download=true, or fetch the official file again by hand"
    try:
        mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except PermissionError as exc:
        raise DataError(f"cannot read SVHN file {path}: {exc.strerror or exc}", "check the file's permissions") from None
    except Exception as exc:  # noqa: BLE001 - scipy raises several types for a damaged file
        raise DataError(f"SVHN file {path} is truncated or corrupted ({type(exc).__name__}: {exc})", hint) from None
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DataError(f"SVHN file {path}: 'X' should have shape (32, 32, 3, N), found {getattr(x, 'shape', None)}", hint)
    if not isinstance(y, np.ndarray) or y.size != x.shape[3]:
        raise DataError(f"SVHN file {path}: 'y' should hold {x.shape[3]} labels, found {getattr(y, 'size', None)}", hint)
    labels = y.reshape(-1).astype(np.int64)
    if labels.size and (labels.min() < 1 or labels.max() > 10):
        raise DataError(f"SVHN file {path}: labels should lie in 1..10, found {labels.min()}..{labels.max()}", hint)
    if x.dtype != np.uint8:
        if x.size and (x.min() < 0 or x.max() > 255):
            raise DataError(f"SVHN file {path}: pixels should lie in 0..255, found {x.min()}..{x.max()}", hint)
        x = x.astype(np.uint8)
    # The files store one image per last index (H, W, C, N); the label 10 stands for the digit 0.
    images = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1)))
    return images, torch.from_numpy(labels % 10)


@register("dataset", "svhn")
class SVHNDataModule(ImageDataModule):
    """SVHN: 73,257 training images (a seeded stratified part held out for validation), 26,032 test images.

    Reads ``<data_dir>/svhn/{train,test}_32x32.mat`` (or the same files directly in ``data_dir``,
    where torchvision puts them); downloads them only when ``download=True``.
    """

    info = DatasetInfo(
        name="svhn",
        num_classes=10,
        image_shape=(3, 32, 32),
        class_names=tuple(str(d) for d in range(10)),
        # Per-channel statistics of the official training images.
        mean=(0.4377, 0.4438, 0.4728),
        std=(0.1980, 0.2010, 0.1970),
    )

    def __init__(self, val_fraction: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.augment:
            raise ConfigError(
                "dataset.augment=true is not supported for SVHN: its augmentation flips images, which changes what a digit reads as",
                "set dataset.augment=false",
            )
        self.val_fraction = check_val_fraction(val_fraction)

    @property
    def root(self) -> Path:
        return self.data_dir / SVHN_FOLDER

    def _path(self, split: str) -> Path | None:
        for folder in (self.root, self.data_dir):
            if (folder / _filename(split)).is_file():
                return folder / _filename(split)
        return None

    def prepare_data(self) -> None:
        for split in ("train", "test"):
            if self._path(split) is not None:
                continue
            if not self.download:
                raise missing_data_error("SVHN", self.root, _filename(split))
            url, md5 = SVHN_URLS[split]
            fetch_file(url, md5, self.root / _filename(split), "SVHN")

    def setup(self, stage: str | None = None) -> None:
        if self.test_set is not None:
            return
        self.prepare_data()
        images, labels = read_svhn_mat(self._path("train"))  # type: ignore[arg-type]
        test_images, test_labels = read_svhn_mat(self._path("test"))  # type: ignore[arg-type]
        hold_out_validation(self, images, labels, test_images, test_labels)

    def _content_identity(self) -> dict[str, Any]:
        self.prepare_data()
        return content_identity({split: self._path(split) for split in ("train", "test")})  # type: ignore[misc]
