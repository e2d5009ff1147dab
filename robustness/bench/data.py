"""Tiny-ImageNet loading (issue 12.4): our memory-mapped uint8 cache against torchvision's ImageFolder.

Both read the same generated folder (``robustness.data.layouts``: 200 classes x 25 training
images = 5,000 64x64 JPEGs, written once into a temporary folder) through a DataLoader with the
same batch size, in this process (``num_workers=0``), one full pass each, two interleaved passes,
the faster one counted. Times are CPU seconds of this process on one thread, so other jobs on a
shared machine skew neither side. The cache is built before timing (its cost is its own row).

Columns:
- ``row``: what was timed;
- ``augment``: random crop (8-pixel reflect padding) and flip, the training transform; off is evaluation;
- ``images``: images in one pass;
- ``images_per_s``: images over CPU seconds of the faster pass;
- ``x_imagefolder``: images_per_s over ImageFolder's with the same augmentation.

The line under the table lists each target as met or missed. :func:`loader_images_per_second` times the
loader on its own (wall clock, any worker count), for ``make bench-gpu`` on real data.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from torch.utils.data import DataLoader, RandomSampler
from torchvision import datasets, transforms

from robustness.bench import BenchRows, single_thread, verdict
from robustness.data.layouts import write_tinyimagenet
from robustness.data.tinyimagenet import TinyImageNetDataModule

BATCH_SIZE = 128
PER_CLASS = 25  # x 200 classes = 5,000 training JPEGs
TARGET = 10.0
REPEATS = 2


def _count(batches: Iterable[Any]) -> int:
    return sum(len(batch[1]) for batch in batches)


def loader_images_per_second(root: str | Path, batch_size: int = BATCH_SIZE, num_workers: int = 0, augment: bool = True) -> float:
    """Training images per wall-clock second of one pass of our Tiny-ImageNet loader over
    ``root`` (the folder holding ``tiny-imagenet-200``), after the cache is built or checked."""
    dm = TinyImageNetDataModule(data_dir=root, batch_size=batch_size, num_workers=num_workers, augment=augment)
    dm.setup()
    loader = dm.train_dataloader()
    start = time.perf_counter()
    images = _count(loader)
    return images / (time.perf_counter() - start)


def _imagefolder(train: Path, augment: bool) -> DataLoader:
    steps = [transforms.RandomHorizontalFlip(), transforms.RandomCrop(64, padding=8, padding_mode="reflect")] if augment else []
    dataset = datasets.ImageFolder(str(train), transform=transforms.Compose([*steps, transforms.ToTensor()]))
    return DataLoader(dataset, batch_size=BATCH_SIZE, sampler=RandomSampler(dataset), num_workers=0)


def _ours(data_dir: Path, augment: bool) -> DataLoader:
    dm = TinyImageNetDataModule(data_dir=data_dir, batch_size=BATCH_SIZE, num_workers=0, augment=augment, val_fraction=0.1)
    dm.setup()
    return dm.train_dataloader()


def _best_rates(loaders: dict[str, Callable[[], DataLoader]]) -> tuple[dict[str, float], dict[str, int]]:
    built = {name: make() for name, make in loaders.items()}
    seconds: dict[str, list[float]] = {name: [] for name in built}
    images: dict[str, int] = {}
    for repeat in range(REPEATS):
        # Interleaved, alternating which goes first, so that load changes hit both alike.
        for name in built if repeat % 2 == 0 else reversed(list(built)):
            start = time.process_time()
            images[name] = _count(built[name])
            seconds[name].append(time.process_time() - start)
    return {name: images[name] / min(seconds[name]) for name in built}, images


LEGEND = {
    "row": "what was timed",
    "augment": "random crop (8-pixel reflect padding) and flip, the training transform; off is evaluation",
    "images": "images in one pass",
    "images_per_s": "images over CPU seconds of the faster pass, one thread",
    "x_imagefolder": "images_per_s over ImageFolder's with the same augmentation",
}


def run() -> BenchRows:
    rows: list[dict] = []
    targets: list[str] = []
    with single_thread(), tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        data_dir = Path(tmp)
        root = write_tinyimagenet(data_dir, PER_CLASS, seed=0, val_per_class=1)
        train = root / "train"
        start = time.process_time()
        TinyImageNetDataModule(data_dir=data_dir).setup()
        build_seconds = time.process_time() - start
        n_files = sum(1 for _ in train.glob("*/images/*.JPEG")) + sum(1 for _ in (root / "val").glob("*/images/*.JPEG"))
        rows.append({"row": "cache build (once; decodes train/ and val/)", "augment": False, "images": n_files,
                     "images_per_s": round(n_files / build_seconds, 1), "x_imagefolder": float("nan")})
        for augment in (True, False):
            rates, images = _best_rates({"imagefolder": lambda a=augment: _imagefolder(train, a), "ours": lambda a=augment: _ours(data_dir, a)})
            for name, label in (("imagefolder", "torchvision ImageFolder (decodes JPEGs)"), ("ours", "tinyimagenet cache (memory-mapped)")):
                ratio = rates[name] / rates["imagefolder"]
                rows.append({"row": label, "augment": augment, "images": images[name], "images_per_s": round(rates[name], 1), "x_imagefolder": round(ratio, 2)})
                if name == "ours":
                    targets.append(f"ours {'with' if augment else 'without'} augmentation >= {TARGET:g}x ImageFolder: {verdict(ratio >= TARGET)} ({ratio:.2f}x)")
    return BenchRows(rows, LEGEND, targets)
