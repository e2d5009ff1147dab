"""Fashion-MNIST (70k 28x28 greyscale images of clothes, 10 classes) read from the official idx files.

Looked for, in this order, each of the four files plain or gzipped:

- ``<data_dir>/FashionMNIST/raw/`` - where ``torchvision.datasets.FashionMNIST`` downloads them
  (``dataset.download=true`` uses torchvision's downloader to put them there);
- ``/usr/share/datasets/fashion-mnist/`` - where the Debian package ``dataset-fashion-mnist``
  installs them (``make data`` installs it where apt-get is available).

The files are parsed here (a few lines: magic number, big-endian sizes, bytes) so that every way a
file can be damaged ends in a DataError that names it.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from robustness.data.base import DatasetInfo, ImageDataModule, check_val_fraction, content_identity, hold_out_validation
from robustness.data.layouts import FASHION_FILES, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC
from robustness.errors import DataError
from robustness.registry import register

TORCHVISION_FOLDER = Path("FashionMNIST") / "raw"
DEBIAN_FOLDER = Path("/usr/share/datasets/fashion-mnist")
_GET_HINT = "run 'make data' (installs the Debian package dataset-fashion-mnist), or rerun with dataset.download=true (torchvision downloads it into paths.data_dir)"


def _damaged(path: Path, why: str) -> DataError:
    return DataError(
        f"Fashion-MNIST file {path} is truncated or corrupted: {why}",
        "delete it and rerun with dataset.download=true, or reinstall the Debian package (apt-get install --reinstall dataset-fashion-mnist)",
    )


def read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """The uint8 array of one idx file (gzipped when its name ends in .gz), checked against ``magic``."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except PermissionError as exc:
        raise DataError(f"cannot read Fashion-MNIST file {path}: {exc.strerror or exc}", "check the file's permissions") from None
    except (OSError, EOFError, zlib.error) as exc:  # gzip signals a damaged stream with all three
        raise _damaged(path, f"{type(exc).__name__}: {exc}") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _damaged(path, f"{len(raw)} bytes, shorter than the {header}-byte header")
    found = struct.unpack(">I", raw[:4])[0]
    if found != magic:
        raise _damaged(path, f"magic number {found:#010x}, expected {magic:#010x}")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(shape)):
        raise _damaged(path, f"the header promises {shape} bytes of data ({int(np.prod(shape))}), the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def read_split(images_path: Path, labels_path: Path) -> tuple[Tensor, Tensor]:
    """Images (N, 1, 28, 28) uint8 and labels (N,) in 0..9 of one split."""
    images = read_idx(images_path, IDX_IMAGES_MAGIC, 3)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC, 1)
    if images.shape[1:] != (28, 28):
        raise _damaged(images_path, f"images are {images.shape[1]}x{images.shape[2]} pixels, expected 28x28")
    if len(labels) != len(images):
        raise DataError(
            f"Fashion-MNIST files disagree: {images_path} holds {len(images)} images, {labels_path} {len(labels)} labels",
            "restore both files from the same copy of the dataset",
        )
    if len(labels) and labels.max() > 9:
        raise _damaged(labels_path, f"labels should lie in 0..9, found up to {labels.max()}")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _in_folder(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


@register("dataset", "fashion_mnist")
class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST: 60k training images (a seeded stratified part held out for validation), 10k test images."""

    info = DatasetInfo(
        name="fashion_mnist",
        num_classes=10,
        image_shape=(1, 28, 28),
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
        # Mean and standard deviation of all pixels (scaled to [0, 1]) of the 60,000 official training
        # images, computed in float64 from the Debian package's train-images-idx3-ubyte.gz
        # (0.28604059..., 0.35302424...).
        mean=(0.2860,),
        std=(0.3530,),
    )

    def __init__(self, val_fraction: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.val_fraction = check_val_fraction(val_fraction)

    @property
    def folders(self) -> tuple[Path, ...]:
        """Where the files are looked for: the user's folder, then the Debian package's."""
        return (self.data_dir / TORCHVISION_FOLDER, DEBIAN_FOLDER)

    @staticmethod
    def _in(folder: Path) -> dict[str, tuple[Path | None, Path | None]]:
        return {split: tuple(_in_folder(folder, name) for name in names) for split, names in FASHION_FILES.items()}  # type: ignore[misc]

    def _find(self) -> dict[str, tuple[Path, Path]] | None:
        """``split -> (images file, labels file)``: the user's folder when it holds any of the four
        files (then it must hold all of them), else the Debian package's folder when it holds all four.

        A user's folder that lacks a file is never silently replaced by another copy: that copy
        could hold other images under the same config (see :meth:`_check_own_folder`).
        """
        for folder in self.folders:
            found = self._in(folder)
            present = [path for pair in found.values() for path in pair if path is not None]
            if len(present) == 4:
                return found  # type: ignore[return-value]
            if present:
                return None  # a partial copy: prepare_data names what it lacks
        return None

    def _check_own_folder(self) -> None:
        own = self.data_dir / TORCHVISION_FOLDER
        found = self._in(own)
        missing = [name for split, names in FASHION_FILES.items() for name, path in zip(names, found[split]) if path is None]
        if 0 < len(missing) < 4:
            raise DataError(
                f"the Fashion-MNIST folder {own} lacks {', '.join(f'{name}[.gz]' for name in missing)}; it holds the other "
                "idx files, so it is the copy in use and no other copy stands in for it",
                f"restore the missing file(s) in {own}, or rerun with dataset.download=true to fill them in, "
                f"or remove {own} to use the Debian package's copy in {DEBIAN_FOLDER}",
            )

    def _download(self) -> None:
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(root=str(self.data_dir), train=True, download=True)
        except Exception as exc:  # noqa: BLE001 - network, disk and checksum failures alike
            raise DataError(
                f"downloading Fashion-MNIST into {self.data_dir / TORCHVISION_FOLDER} failed ({type(exc).__name__}: {exc})",
                "check the network connection and retry, or run 'make data' (the Debian package needs no download here)",
            ) from None

    def prepare_data(self) -> None:
        if self._find() is not None:
            return
        if not self.download:
            self._check_own_folder()
            looked = " and ".join(str(folder) for folder in self.folders)
            names = ", ".join(f"{name}[.gz]" for names in FASHION_FILES.values() for name in names)
            raise DataError(f"Fashion-MNIST not found: looked for {names} in {looked}", _GET_HINT)
        self._download()
        self._check_own_folder()
        if self._find() is None:
            raise DataError(
                f"torchvision's download did not leave the four idx files in {self.data_dir / TORCHVISION_FOLDER}",
                f"delete {self.data_dir / 'FashionMNIST'} and retry, or run 'make data'",
            )

    def setup(self, stage: str | None = None) -> None:
        if self.test_set is not None:
            return
        self.prepare_data()
        files = self._find()
        assert files is not None  # prepare_data raised otherwise
        images, labels = read_split(*files["train"])
        test_images, test_labels = read_split(*files["test"])
        # 2-pixel padding, not CIFAR's 4: the items nearly fill the 28x28 frame, and a larger shift crops them.
        hold_out_validation(self, images, labels, test_images, test_labels, padding=2)

    def _content_identity(self) -> dict[str, Any]:
        self.prepare_data()
        files = self._find()
        assert files is not None  # prepare_data raised otherwise
        return content_identity({Path(path.name).stem if path.suffix == ".gz" else path.name: path for pair in files.values() for path in pair})
