"""CIFAR-10 read from the official python pickles, plus the helpers the other file-backed datasets share.

The pickles are read here rather than through ``torchvision.datasets.CIFAR10`` because torchvision
checks every file's md5 (refusing any other copy, the test fakes included) and unpickles with the
full unpickler; ours only rebuilds numpy arrays, so a tampered batch file cannot run code.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets.utils import download_url, extract_archive

from robustness.data.base import DatasetInfo, ImageDataModule, check_val_fraction, content_identity, hold_out_validation, missing_data_error
from robustness.errors import DataError
from robustness.registry import register

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_FOLDER = "cifar-10-batches-py"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_BATCH = "test_batch"
_META = "batches.meta"


# --------------------------------------------------------------------------- shared helpers


def _manual_hint(url: str, target: Path) -> str:
    return f"check the network connection and retry, or fetch {url} by hand and unpack it into {target} (then leave dataset.download=false)"


def _ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test.")
        probe.close()
    except OSError as exc:
        raise DataError(
            f"cannot write downloads into {folder}: {exc.strerror or exc}",
            "point paths.data_dir=... at a writable folder",
        ) from None


def fetch_file(url: str, md5: str, destination: Path, dataset: str) -> None:
    """Download ``url`` to ``destination`` after checking its md5; the file appears whole or not at all."""
    _ensure_writable(destination.parent)
    partial = destination.with_name(f".{destination.name}.part")
    try:
        # torchvision re-downloads a partial file whose md5 does not match, so a rerun resumes cleanly.
        download_url(url, str(destination.parent), filename=partial.name, md5=md5)
    except Exception as exc:  # noqa: BLE001 - any failure below is reported as one DataError
        raise DataError(
            f"downloading {dataset} from {url} failed ({type(exc).__name__}: {exc})",
            f"check the network connection and retry, or fetch {url} by hand and save it as {destination} (then leave dataset.download=false)",
        ) from None
    os.replace(partial, destination)


def fetch_archive(url: str, md5: str, data_dir: Path, folder: str, dataset: str) -> Path:
    """Download and unpack the archive at ``url`` (whose top folder is ``folder``) into ``data_dir``.

    The archive is unpacked into a temporary folder and moved into place afterwards; files already
    in ``data_dir/folder`` are kept, only missing ones are filled in, so a user's copy is never overwritten.
    """
    _ensure_writable(data_dir)
    target = data_dir / folder
    archive_name = url.rsplit("/", 1)[-1]
    try:
        download_url(url, str(data_dir), filename=archive_name, md5=md5)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"downloading {dataset} from {url} failed ({type(exc).__name__}: {exc})", _manual_hint(url, data_dir)) from None
    staging = Path(tempfile.mkdtemp(prefix=f".{folder}.", dir=data_dir))
    try:
        try:
            extract_archive(str(data_dir / archive_name), str(staging))
        except Exception as exc:  # noqa: BLE001
            raise DataError(
                f"unpacking {data_dir / archive_name} failed ({type(exc).__name__}: {exc})",
                f"delete {data_dir / archive_name} and retry with dataset.download=true, or unpack it by hand into {data_dir}",
            ) from None
        unpacked = staging / folder
        if not unpacked.is_dir():
            raise DataError(
                f"the archive {data_dir / archive_name} has no top folder '{folder}'",
                f"delete {data_dir / archive_name} and retry with dataset.download=true",
            )
        _merge_missing(unpacked, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _merge_missing(source: Path, target: Path) -> None:
    if not target.exists():
        os.replace(source, target)
        return
    for entry in source.iterdir():
        dest = target / entry.name
        if entry.is_dir() and dest.is_dir():
            _merge_missing(entry, dest)
        elif not dest.exists():
            os.replace(entry, dest)


# --------------------------------------------------------------------------- CIFAR-10 pickles


_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numpy arrays, nothing that could run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module == "numpy.core.multiarray" and hasattr(np, "_core"):
            module = "numpy._core.multiarray"  # numpy 2 moved it; the official files name the old path
        return super().find_class(module, name)


def _corrupt(path: Path, why: str) -> DataError:
    return DataError(
        f"CIFAR-10 file {path} is truncated or corrupted: {why}",
        f"delete {path.parent} and rerun with dataset.download=true, or unpack the official archive ({CIFAR10_URL}) there again",
    )


def read_cifar_pickle(path: Path) -> dict[str, Any]:
    """One CIFAR python pickle as a dict with ``str`` keys; a DataError for anything unreadable."""
    try:
        with open(path, "rb") as handle:
            # The official files were written by Python 2; latin1 is the byte-preserving decoding numpy needs.
            obj = _ArrayUnpickler(handle, encoding="latin1").load()
    except PermissionError as exc:
        raise DataError(f"cannot read CIFAR-10 file {path}: {exc.strerror or exc}", "check the file's permissions") from None
    except Exception as exc:  # noqa: BLE001 - EOFError, UnpicklingError, ValueError, ... all mean a bad file
        raise _corrupt(path, f"{type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise _corrupt(path, f"it holds a {type(obj).__name__}, not a dict")
    return {key.decode("latin1") if isinstance(key, bytes) else str(key): value for key, value in obj.items()}


def read_cifar_batch(path: Path, num_classes: int) -> tuple[Tensor, Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) of one data batch."""
    batch = read_cifar_pickle(path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", None)
        raise _corrupt(path, f"'data' should be a uint8 array of shape (N, 3072), found {type(data).__name__} {shape}")
    if labels is None or len(labels) != len(data):
        raise _corrupt(path, f"'labels' should list {len(data)} labels, found {None if labels is None else len(labels)}")
    labels_t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    if len(labels_t) and (labels_t.min() < 0 or labels_t.max() >= num_classes):
        raise _corrupt(path, f"labels should lie in [0, {num_classes - 1}], found {labels_t.min().item()}..{labels_t.max().item()}")
    # Each row is the red plane, then green, then blue, each 32 rows of 32 pixels.
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())
    return images, labels_t


@register("dataset", "cifar10")
class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10: 50k training images (a seeded stratified part held out for validation), 10k test images.

    Reads ``<data_dir>/cifar-10-batches-py``; downloads the official archive only when ``download=True``.
    """

    info = DatasetInfo(
        name="cifar10",
        num_classes=10,
        image_shape=(3, 32, 32),
        class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        # Per-channel statistics of the official 50k training images.
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    )

    def __init__(self, val_fraction: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.val_fraction = check_val_fraction(val_fraction)

    @property
    def root(self) -> Path:
        return self.data_dir / CIFAR10_FOLDER

    def _missing(self) -> list[str]:
        return [name for name in (*_TRAIN_BATCHES, _TEST_BATCH, _META) if not (self.root / name).is_file()]

    def prepare_data(self) -> None:
        missing = self._missing()
        if not missing:
            return
        if not self.download:
            what = f"{CIFAR10_FOLDER}/ (the official python batches)" if not self.root.exists() else ", ".join(f"{CIFAR10_FOLDER}/{m}" for m in missing)
            raise missing_data_error("CIFAR-10", self.data_dir, what)
        fetch_archive(CIFAR10_URL, CIFAR10_MD5, self.data_dir, CIFAR10_FOLDER, "CIFAR-10")
        still = self._missing()
        if still:
            raise DataError(
                f"the CIFAR-10 archive did not provide {', '.join(still)} in {self.root}",
                f"delete {self.data_dir / CIFAR10_URL.rsplit('/', 1)[-1]} and {self.root}, then retry with dataset.download=true",
            )

    def setup(self, stage: str | None = None) -> None:
        if self.test_set is not None:
            return
        self.prepare_data()
        meta = read_cifar_pickle(self.root / _META)
        names = meta.get("label_names")
        if not isinstance(names, (list, tuple)) or len(names) != self.info.num_classes:
            raise _corrupt(self.root / _META, f"'label_names' should list {self.info.num_classes} names, found {names!r:.80}")
        class_names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)

        parts = [read_cifar_batch(self.root / name, self.info.num_classes) for name in _TRAIN_BATCHES]
        images = torch.cat([p[0] for p in parts])
        labels = torch.cat([p[1] for p in parts])
        test_images, test_labels = read_cifar_batch(self.root / _TEST_BATCH, self.info.num_classes)

        self.info = replace(self.info, class_names=class_names)
        hold_out_validation(self, images, labels, test_images, test_labels)

    def _content_identity(self) -> dict[str, Any]:
        self.prepare_data()
        return content_identity({name: self.root / name for name in (*_TRAIN_BATCHES, _TEST_BATCH, _META)})
