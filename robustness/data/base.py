"""Shared pieces of every data module: dataset facts and the loaders."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from robustness import fingerprint
from robustness.errors import ConfigError, DataError


@dataclass(frozen=True)
class DatasetInfo:
    """What a model builder and a probe need to know about a dataset."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (channels, height, width)
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def in_channels(self) -> int:
        return self.image_shape[0]


class ImageDataModule(pl.LightningDataModule):
    """A LightningDataModule whose datasets yield ``(image in [0, 1] as float CxHxW, label)``.

    Subclasses set ``info`` and fill ``train_set``, ``val_set`` and ``test_set`` in :meth:`setup`.
    """

    info: DatasetInfo

    def __init__(
        self,
        data_dir: str | Path = "data",
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        seed: int = 0,
        train_fraction: float = 1.0,
        download: bool = False,
        augment: bool = False,
    ) -> None:
        super().__init__()
        if batch_size <= 0 or eval_batch_size <= 0:
            raise ConfigError(f"batch sizes must be positive, got {batch_size} and {eval_batch_size}", "set dataset.batch_size to a positive integer")
        if not 0.0 < train_fraction <= 1.0:
            raise ConfigError(f"dataset.train_fraction must lie in (0, 1], got {train_fraction}", "e.g. dataset.train_fraction=0.1 for 10% of the training set")
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.train_fraction = float(train_fraction)
        self.download = bool(download)
        self.augment = bool(augment)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self._data_identity: dict[str, Any] | None = None

    # Subclasses implement this; it must be idempotent.
    def setup(self, stage: str | None = None) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def data_identity(self) -> dict[str, Any]:
        """The data this module serves, named by its content (digests of the files or the decoded
        cache it reads), so that two different copies under the same config never share a model
        fingerprint. The config says which options were chosen; this says which bytes they chose.

        Computed once per module (and each file's digest once per process while the file is
        unchanged); it may read the data, set-up included, so call it where the data is needed anyway.
        """
        if self._data_identity is None:
            self._data_identity = self._content_identity()
        return self._data_identity

    def _content_identity(self) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _subsample_train(self, dataset: Dataset, labels: Sequence[int] | Tensor | None = None) -> Dataset:
        """Keep ``train_fraction`` of the training set, stratified by class, chosen by the seed."""
        if self.train_fraction >= 1.0:
            return dataset
        n = len(dataset)  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(self.seed)
        if labels is None:
            keep = torch.randperm(n, generator=generator)[: max(1, int(round(n * self.train_fraction)))]
            return Subset(dataset, sorted(keep.tolist()))
        labels = torch.as_tensor(labels)
        kept: list[int] = []
        for cls in labels.unique().tolist():
            idx = (labels == cls).nonzero().flatten()
            take = max(1, int(round(len(idx) * self.train_fraction)))
            kept.extend(idx[torch.randperm(len(idx), generator=generator)[:take]].tolist())
        return Subset(dataset, sorted(kept))

    def _loader(self, dataset: Dataset | None, shuffle: bool, batch_size: int) -> DataLoader:
        if dataset is None:
            self.setup()
            raise DataError(f"{type(self).__name__}.setup() did not create the requested split")
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=EpochSeededSampler(len(dataset), self.seed) if shuffle else None,  # type: ignore[arg-type]
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # Creating a batch iterator draws the workers' base seed: from a generator of the
            # loader's own, so that it never moves the global random stream (exact resume).
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False, batch_size=self.eval_batch_size)

    def split_tensors(self, split: str = "test", limit: int | None = None, indices: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        """The first ``limit`` images (or the given ``indices``) of a split as ``(x, y)`` tensors."""
        self.setup()
        dataset = {"train": self.train_set, "val": self.val_set, "test": self.test_set}.get(split)
        if dataset is None:
            raise ConfigError(f"unknown split '{split}'", "use one of: train, val, test")
        n = len(dataset)  # type: ignore[arg-type]
        if indices is None:
            indices = range(n if limit is None else min(limit, n))
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise ConfigError(f"image index {bad[0]} is outside the {split} split (it has {n} images)", f"pick an index in [0, {n - 1}]")
        items = [dataset[i] for i in indices]
        if not items:
            return torch.empty(0, *self.info.image_shape), torch.empty(0, dtype=torch.long)
        x = torch.stack([item[0] for item in items])
        y = torch.as_tensor([int(item[1]) for item in items], dtype=torch.long)
        return x, y


class EpochSeededSampler(Sampler[int]):
    """A random order that is a function of (seed, epoch) alone.

    Lightning calls ``set_epoch`` before every epoch, so a run resumed at an epoch boundary
    sees exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


class TensorImageDataset(Dataset):
    """Images held in memory as one tensor; optional random-crop/flip augmentation."""

    def __init__(self, images: Tensor, labels: Tensor, augment: bool = False) -> None:
        self.images = images
        self.labels = labels.long()
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index]
        if self.augment:
            image = _random_crop_flip(image)
        return image, self.labels[index]


def _random_crop_flip(image: Tensor, padding: int = 4) -> Tensor:
    return random_crop_flip_batch(image.unsqueeze(0), padding)[0]


def random_crop_flip_batch(images: Tensor, padding: int = 4) -> Tensor:
    """Flip each image of ``(B, C, H, W)`` left-right with probability 1/2, then crop it at a random
    offset from its ``padding``-pixel reflect-padded copy. Any dtype (uint8 moves a quarter of the bytes).

    The random numbers are drawn per batch (all flips, then all offsets), so a batch of one draws
    exactly what one image would; padding the batch at once is what makes batched loading cheap.
    """
    b, _, h, w = images.shape
    flips = (torch.rand(b) < 0.5).tolist()
    offsets = torch.randint(0, 2 * padding + 1, (b, 2)).tolist()
    padded = torch.nn.functional.pad(images, (padding,) * 4, mode="reflect")
    # Reflect padding is symmetric, so the padded flipped image is the flipped padded one: one flip
    # of the batch, then every image is a crop (a view) of one or the other, and one stack copies them.
    mirrored = padded.flip(-1) if any(flips) else padded
    return torch.stack([
        (mirrored if flip else padded)[i, :, top : top + h, left : left + w] for i, ((top, left), flip) in enumerate(zip(offsets, flips))
    ])


class UInt8ImageDataset(TensorImageDataset):
    """Images kept as uint8 (a quarter of the memory of float32), scaled to [0, 1] per item."""

    def __init__(self, images: Tensor, labels: Tensor, augment: bool = False, padding: int = 4) -> None:
        if images.dtype != torch.uint8:
            raise TypeError(f"UInt8ImageDataset needs uint8 images, got {images.dtype}")
        super().__init__(images, labels, augment=augment)
        self.padding = padding

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = self.images[index].float().div_(255.0)
        if self.augment:
            image = _random_crop_flip(image, padding=self.padding)
        return image, self.labels[index]


def check_val_fraction(val_fraction: float) -> float:
    """``val_fraction`` as a float, or a ConfigError when it leaves no training or no validation data."""
    if not 0.0 < float(val_fraction) < 1.0:
        raise ConfigError(
            f"dataset.val_fraction must lie in (0, 1), got {val_fraction}",
            "e.g. dataset.val_fraction=0.1 holds out 10% of the official training set for validation",
        )
    return float(val_fraction)


def stratified_holdout(labels: Sequence[int] | Tensor, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split indices into (keep, held out), holding out ``fraction`` of every class, chosen by ``seed``.

    Every class with at least two members gives at least one image to each side, so a tiny
    dataset still has each class in validation.
    """
    labels = torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(int(seed))
    keep: list[int] = []
    held: list[int] = []
    for cls in labels.unique().tolist():
        idx = (labels == cls).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_held = min(max(1, int(round(len(idx) * fraction))), len(idx) - 1) if len(idx) > 1 else 0
        held.extend(idx[:n_held].tolist())
        keep.extend(idx[n_held:].tolist())
    return sorted(keep), sorted(held)


def hold_out_validation(module: ImageDataModule, images: Tensor, labels: Tensor, test_images: Tensor, test_labels: Tensor, padding: int = 4) -> None:
    """Fill ``module``'s splits from uint8 images: validation is a seeded stratified
    ``module.val_fraction`` of the official training images, test the official test images."""
    keep, held = stratified_holdout(labels, module.val_fraction, module.seed)
    train = UInt8ImageDataset(images[keep], labels[keep], augment=module.augment, padding=padding)
    module.train_set = module._subsample_train(train, labels[keep])
    module.val_set = UInt8ImageDataset(images[held], labels[held])
    module.test_set = UInt8ImageDataset(test_images, test_labels)


# File digests of this process, by what identifies a file's state: a file that keeps its device,
# inode, size, modification and change times keeps its bytes (the change time cannot be set back
# by a user, unlike the modification time).
_DIGESTS: dict[tuple[int, int, int, int, int], str] = {}


def content_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes, read once per process while the file stays unchanged."""
    try:
        stat = os.stat(path)
        key = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        if key not in _DIGESTS:
            _DIGESTS[key] = fingerprint.of_file(path)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}", "check that the file exists and is readable") from None
    return _DIGESTS[key]


def content_identity(files: Mapping[str, Path]) -> dict[str, Any]:
    """A data identity from the files a dataset reads: each one's SHA-256, by a name of its role."""
    return {"sha256": {name: content_digest(path) for name, path in sorted(files.items())}}


def missing_data_error(dataset: str, looked_in: Path, what: str) -> DataError:
    """The error for a dataset absent from disk with downloads off."""
    return DataError(
        f"{dataset} not found: looked for {what} in {looked_in}",
        "download it with 'dataset.download=true', or point 'paths.data_dir=...' at the folder that holds it",
    )
