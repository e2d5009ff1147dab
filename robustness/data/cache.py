"""The decoded-image cache that Tiny-ImageNet, image folders and NumPy arrays share.

A dataset whose source is slow to read (JPEGs, PNGs, a compressed ``.npz``) decodes it once, at
the first setup, into one folder::

    <cache>/<split>_images.npy     uint8 (N, C, H, W), one per split
    <cache>/<split>_labels.npy     int64 (N,)
    <cache>/manifest.json          what it was built from, what it holds, each file's SHA-256

Training and evaluation slice the memory-mapped arrays (:class:`CachedImageDataset`), so no epoch
decodes an image and DataLoader workers share the page cache instead of each holding a copy.

A cache serves only while two things hold, checked at every first open in a process:

- **its source is unchanged**: the manifest holds a fingerprint of what the cache was built from
  (for files: every path, size and modification time); another fingerprint rebuilds the cache;
- **its content is what was written**: the manifest holds each array file's SHA-256, computed
  when the file was written; a process reads each file once in full before first using it, and
  a file whose bytes differ (every pixel zeroed, same size; a flipped byte) rebuilds the cache
  with a warning that names it. A full digest, not a sample: a sampled check misses a changed
  pixel. It costs one sequential read per process (seconds for Tiny-ImageNet's 1.2 GB), and a
  report's sections, run in one process, pay it once.

The cache is assembled in a staging folder and swapped in whole, so a reader finds the old
cache, the new one or none, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from robustness.data.base import content_digest, random_crop_flip_batch, stratified_holdout
from robustness.errors import DataError
from robustness.io import atomic_write_json

log = logging.getLogger("robustness")

CACHE_FORMAT = 2
MANIFEST = "manifest.json"
# Standard deviations below this (a channel that is constant in every training image) are raised
# to it, so that the model's Normalize layer stays finite.
_MIN_STD = 1.0 / 255.0


def images_file(cache: Path, split: str) -> Path:
    return cache / f"{split}_images.npy"


def labels_file(cache: Path, split: str) -> Path:
    return cache / f"{split}_labels.npy"


@dataclass(frozen=True)
class SplitSource:
    """What one split of a cache is written from: its labels, and a function that fills the
    writable uint8 ``(N, C, H, W)`` array it is given with the images, in the labels' order."""

    labels: np.ndarray
    write: Callable[[np.ndarray], None]


def open_cache(cache: Path, source_fingerprint: str) -> dict[str, Any] | None:
    """The manifest of the cache in ``cache`` when it was built from the source ``source_fingerprint``
    names and every array file holds what was written there; None when it must be (re)built."""
    try:
        manifest = json.loads((cache / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != CACHE_FORMAT or manifest.get("fingerprint") != source_fingerprint:
            return None
        shape = tuple(manifest["image_shape"])
        for split, count in manifest["counts"].items():
            images = np.load(images_file(cache, split), mmap_mode="r")
            labels = np.load(labels_file(cache, split), mmap_mode="r")
            if images.shape != (count, *shape) or images.dtype != np.uint8 or labels.shape != (count,):
                return None
        for name, digest in manifest["sha256"].items():
            if content_digest(cache / name) != digest:
                log.warning("the decoded cache %s no longer holds what was written there (%s has another SHA-256 than its "
                            "manifest records): decoding its source again", cache, name)
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, DataError):
        return None
    return manifest


def build_cache(
    cache: Path,
    source_fingerprint: str,
    image_shape: Sequence[int],
    splits: Mapping[str, SplitSource],
    what: str,
    description: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write every split of ``splits`` into ``cache`` and return its manifest (see the module docstring).

    The manifest also holds the per-channel mean and standard deviation of the ``train`` split's
    pixels in [0, 1] (``statistics``), and whatever ``description`` adds. ``what`` names the data in
    error messages ("Tiny-ImageNet", "the image folder <root>").
    """
    shape = tuple(int(s) for s in image_shape)
    needed = sum(len(s.labels) for s in splits.values()) * int(np.prod(shape))
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    except OSError as exc:
        raise DataError(
            f"cannot write the decoded cache of {what} in {cache.parent}: {exc.strerror or exc}",
            "make paths.data_dir writable, or point paths.data_dir=... at a writable folder",
        ) from None
    try:
        for split, source in splits.items():
            images = np.lib.format.open_memmap(images_file(staging, split), mode="w+", dtype=np.uint8, shape=(len(source.labels), *shape))
            source.write(images)
            images.flush()
            del images
            np.save(labels_file(staging, split), np.asarray(source.labels, dtype=np.int64))
        mean, std = channel_statistics(images_file(staging, "train")) if "train" in splits else (None, None)
        names = [p.name for split in splits for p in (images_file(staging, split), labels_file(staging, split))]
        manifest = {
            "format": CACHE_FORMAT,
            "fingerprint": source_fingerprint,
            "counts": {split: len(source.labels) for split, source in splits.items()},
            "image_shape": list(shape),
            "statistics": {"mean": mean, "std": std},
            "sha256": {name: content_digest(staging / name) for name in names},
            **dict(description or {}),
        }
        atomic_write_json(staging / MANIFEST, manifest)
        return _swap_in(staging, cache, source_fingerprint, what) or manifest
    except OSError as exc:  # a full disk, most likely
        raise DataError(
            f"cannot write the decoded cache of {what} into {staging}: {exc.strerror or exc}",
            f"free about {_size(needed)} in {cache.parent}, or point paths.data_dir=... at a folder with room",
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _swap_in(staging: Path, cache: Path, source_fingerprint: str, what: str) -> dict[str, Any] | None:
    """Move ``staging`` to ``cache``; returns the manifest of a cache found there first, if any."""
    existing = open_cache(cache, source_fingerprint)
    if existing is not None:
        return existing  # another job of a multirun built the same cache first; keep the one its readers may have open
    retired = cache.with_name(f".{cache.name}.retired.{os.getpid()}")
    try:
        if cache.exists():
            os.replace(cache, retired)
        os.replace(staging, cache)
    except OSError as exc:
        # Another job of a multirun may have swapped in its own copy meanwhile; the same source gives the same cache.
        existing = open_cache(cache, source_fingerprint)
        if existing is None:
            raise DataError(f"cannot move the decoded cache of {what} into {cache}: {exc}", f"delete {cache} and rerun") from None
        return existing
    finally:
        shutil.rmtree(retired, ignore_errors=True)
    return None


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.1f} GB" if n_bytes >= 1e8 else f"{max(n_bytes / 1e6, 0.1):.1f} MB"


def channel_statistics(path: Path, chunk: int = 1024) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of a uint8 (N, C, H, W) ``.npy`` file's pixels scaled
    to [0, 1]: exact, from each channel's histogram of the 256 byte values."""
    images = np.load(path, mmap_mode="r")
    counts = np.zeros((images.shape[1], 256), dtype=np.int64)
    for start in range(0, len(images), chunk):
        block = np.asarray(images[start : start + chunk])
        for channel in range(images.shape[1]):
            counts[channel] += np.bincount(block[:, channel].reshape(-1), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    total = counts.sum(axis=1)
    if not total.all():
        return [0.0] * images.shape[1], [1.0] * images.shape[1]
    mean = counts @ values / total
    var = counts @ values**2 / total - mean**2
    std = np.maximum(np.sqrt(np.maximum(var, 0.0)), _MIN_STD)
    return mean.tolist(), std.tolist()


# --------------------------------------------------------------------------- decoding image files


def read_image(path: str | Path, mode: str, size: tuple[int, int], hint: str) -> np.ndarray:
    """One image file as uint8 (C, H, W) in PIL ``mode`` ("RGB" or "L"); ``size`` is (width, height).
    Greyscale and palette images become RGB under "RGB"; an alpha channel is dropped."""
    try:
        with Image.open(path) as image:
            converted = image.convert(mode)
    except FileNotFoundError:
        raise DataError(f"image {path} disappeared after the dataset was indexed", "rerun; the index is rebuilt at setup") from None
    except Exception as exc:  # noqa: BLE001 - PIL signals damaged files with many exception types
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}", hint) from None
    if converted.size != tuple(size):
        raise DataError(f"image {path} is {converted.size[0]}x{converted.size[1]} pixels, expected {size[0]}x{size[1]}", hint)
    pixels = np.asarray(converted, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


class _PerFile(Dataset):
    """Applies ``read`` to each file, for the DataLoader that spreads the work over processes; a bad
    file comes back as its error, so that the caller raises our DataError in the main process
    rather than a worker's wrapped traceback."""

    def __init__(self, paths: Sequence[Path], read: Callable[[str], Any]) -> None:
        self.paths = np.array([str(p) for p in paths])  # shared by forked workers, not copied on access
        self.read = read

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, DataError | None]:
        try:
            return self.read(str(self.paths[index])), None
        except DataError as exc:
            return None, exc


def _keep_as_list(batch: list) -> list:
    """The batches hold results and errors side by side, which the default collate cannot stack."""
    return batch


def each_file(paths: Sequence[Path], read: Callable[[str], Any], num_workers: int = 0) -> Iterator[Any]:
    """``read(path)`` of every path, in order, computed in ``num_workers`` processes; the first
    DataError raised for a file is raised here. ``read`` must pickle (a module-level function or a
    ``functools.partial`` of one)."""
    loader = DataLoader(_PerFile(paths, read), batch_size=256, num_workers=num_workers, collate_fn=_keep_as_list)
    for batch in loader:
        for result, error in batch:
            if error is not None:
                raise DataError(error.message, error.hint)
            yield result


def decode_into(images: np.ndarray, paths: Sequence[Path], read: Callable[[str], np.ndarray], num_workers: int = 0) -> None:
    """Fill ``images[i]`` with ``read(paths[i])`` for every i."""
    for index, pixels in enumerate(each_file(paths, read, num_workers)):
        images[index] = pixels


# --------------------------------------------------------------------------- serving the cache


class CachedImageDataset(Dataset):
    """Rows ``indices`` of a memory-mapped uint8 (N, C, H, W) ``.npy`` file, scaled to [0, 1], with
    their labels; optional random crop and flip.

    The DataLoader asks for whole batches (``__getitems__``): one fancy index into the mapped file
    and one padding of the batch instead of one of each per image. The mapping is opened lazily in
    each process, and never pickled, so a spawned worker maps the file instead of copying it.
    """

    def __init__(self, images_path: Path, indices: Sequence[int] | np.ndarray, labels: Tensor, augment: bool = False, padding: int = 8) -> None:
        if len(indices) != len(labels):
            raise ValueError(f"{len(indices)} indices but {len(labels)} labels")
        self.images_path = Path(images_path)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.augment = augment
        self.padding = padding
        self._images: np.ndarray | None = None

    def images(self) -> np.ndarray:
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")
        return self._images

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_images": None}

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, batch: Sequence[int]) -> list[tuple[Tensor, Tensor]]:
        rows = self.indices[np.asarray(batch, dtype=np.int64)]
        images = torch.from_numpy(np.ascontiguousarray(self.images()[rows]))
        if self.augment:
            images = random_crop_flip_batch(images, padding=self.padding)  # on uint8: a quarter of the bytes to move
        images = images.float().div_(255.0)
        return list(zip(images.unbind(0), self.labels[list(batch)].unbind(0)))


def split_labels(cache: Path, split: str) -> Tensor:
    """The labels of one split of a cache, as a long tensor."""
    return torch.from_numpy(np.load(labels_file(cache, split)).astype(np.int64))


def cache_splits(module: Any, cache: Path, manifest: Mapping[str, Any], padding: int) -> None:
    """Fill ``module``'s train, val and test sets from a cache: its ``val`` split where it has one,
    else a seeded stratified ``module.val_fraction`` held out of ``train``."""
    train_labels = split_labels(cache, "train")
    train_images = images_file(cache, "train")
    if "val" in manifest["counts"]:
        keep = list(range(len(train_labels)))
        val = CachedImageDataset(images_file(cache, "val"), range(manifest["counts"]["val"]), split_labels(cache, "val"))
    else:
        keep, held = stratified_holdout(train_labels, module.val_fraction, module.seed)
        val = CachedImageDataset(train_images, held, train_labels[held])
    train = CachedImageDataset(train_images, keep, train_labels[keep], augment=module.augment, padding=padding)
    module.train_set = module._subsample_train(train, train_labels[keep])
    module.val_set = val
    module.test_set = CachedImageDataset(images_file(cache, "test"), range(manifest["counts"]["test"]), split_labels(cache, "test"))


def cache_identity(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The data identity of a cache: the SHA-256 of each of its array files (checked at open)."""
    return {"sha256": dict(sorted(manifest["sha256"].items()))}
