"""A folder of a user's own images: ``dataset=imagefolder dataset.root=DIR``.

Layout (torchvision's ImageFolder, once per split)::

    DIR/train/<class name>/.../<image file>
    DIR/test/<class name>/.../<image file>
    DIR/val/<class name>/.../<image file>     optional; without it a seeded stratified
                                              dataset.val_fraction of train/ is held out

The class names are the folder names, class ``i`` the ``i``-th in sorted order; every split has
the same class folders. Image files end in .png, .jpg, .jpeg, .bmp, .gif, .tif, .tiff or .webp
(any case) and may sit in sub-folders of their class folder; hidden entries (``.DS_Store``) are
skipped, anything else is an error that names it. Every image has the same width and height. The
images are read as greyscale (one channel) when every one of them is greyscale, else as RGB
(greyscale and palette images widened to three channels, an alpha channel dropped); 8 bits a
channel.

The first setup reads every image once into the decoded-image cache (:mod:`robustness.data.cache`)
at ``<paths.data_dir>/imagefolder-cache/<SHA-256 of DIR's absolute path>/``, with the image shape
and the per-channel mean and standard deviation of train/'s pixels; later runs memory-map it and
rebuild it only when the folder's listing (every file's path, size and modification time) or the
cache's content changes.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from robustness import fingerprint
from robustness.data.base import DatasetInfo, ImageDataModule, check_val_fraction
from robustness.data.cache import SplitSource, build_cache, cache_identity, cache_splits, decode_into, each_file, open_cache, read_image
from robustness.errors import ConfigError, DataError
from robustness.registry import register

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
# PIL modes of one grey channel (with alpha, 1-bit, 16- and 32-bit integer, float).
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
SPLITS = ("train", "val", "test")
_SOURCE_FORMAT = 1
_REPLACE = "replace it with a readable image file, or delete it"


def _hidden(name: str) -> bool:
    return name.startswith(".")


def list_classes(folder: Path) -> dict[str, list[Path]]:
    """``class name -> its image files`` of one split folder, both sorted; a DataError names any
    entry that is not an image in a class folder, an empty class folder, or a split without classes."""
    try:
        entries = sorted((e for e in os.scandir(folder) if not _hidden(e.name)), key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"cannot list {folder}: {exc.strerror or exc}", "check the folder's permissions") from None
    classes: dict[str, list[Path]] = {}
    for entry in entries:
        path = Path(entry.path)
        if not entry.is_dir():
            where = "an image directly in the split folder" if path.suffix.lower() in IMAGE_SUFFIXES else "not an image file"
            raise DataError(f"{path} is {where}: {folder} must hold one folder per class, each holding that class's images",
                            f"move it into {folder}/<class name>/, or delete it")
        classes[entry.name] = _images_under(path)
    if not classes:
        raise DataError(f"{folder} holds no class folders, so there are no classes",
                        f"put each class's images in a folder named after the class: {folder}/<class name>/<image files>")
    return classes


def _images_under(class_folder: Path) -> list[Path]:
    images: list[Path] = []
    for current, folders, names in os.walk(class_folder, onerror=_unlistable):
        folders[:] = sorted(f for f in folders if not _hidden(f))
        for name in sorted(n for n in names if not _hidden(n)):
            path = Path(current) / name
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(
                    f"{path} is not an image file (class folders hold only {', '.join(sorted(IMAGE_SUFFIXES))} files)",
                    "move it out of the dataset folder, or delete it",
                )
            images.append(path)
    if not images:
        raise DataError(f"class folder {class_folder} holds no images", "add its images, or remove the folder (from every split)")
    return images


def _unlistable(exc: OSError) -> None:
    raise DataError(f"cannot list {exc.filename}: {exc.strerror or exc}", "check the folder's permissions")


def image_header(path: str) -> tuple[int, int, str]:
    """``(width, height, PIL mode)`` of an image file, read from its header alone."""
    try:
        with Image.open(path) as image:
            return image.size[0], image.size[1], image.mode
    except Exception as exc:  # noqa: BLE001 - PIL signals unreadable files with many exception types
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}", _REPLACE) from None


def index_folder(root: Path) -> tuple[list[str], dict[str, list[Path]], dict[str, list[int]]]:
    """``(class names, split -> files, split -> labels)`` of an image folder, checked as the module docstring says."""
    if not root.is_dir():
        raise DataError(f"the image folder {root} does not exist" if not root.exists() else f"{root} is a file, not a folder",
                        "set dataset.root=DIR, a folder holding train/ and test/ with one sub-folder per class")
    for required in ("train", "test"):
        if not (root / required).is_dir():
            raise DataError(f"the image folder {root} has no {required}/ folder",
                            "lay it out as DIR/train/<class name>/<images> and DIR/test/<class name>/<images> (DIR/val/ optional)")
    by_split = {split: list_classes(root / split) for split in SPLITS if split != "val" or (root / split).is_dir()}
    classes = list(by_split["train"])
    for split, found in by_split.items():
        if list(found) != classes:
            lacks, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
            parts = ([f"{split}/ lacks {', '.join(lacks)}"] if lacks else []) + ([f"{split}/ has {', '.join(extra)}, which train/ lacks"] if extra else [])
            raise DataError(f"the class folders of {root / split} differ from those of {root / 'train'}: {'; '.join(parts)}",
                            "give every split the same class folders (the classes are the folder names)")
    if len(classes) < 2:
        raise DataError(f"the image folder {root} has one class ({classes[0]}); a classifier needs two or more", "add a folder for each other class")
    files = {split: [p for name in classes for p in found[name]] for split, found in by_split.items()}
    labels = {split: [i for i, name in enumerate(classes) for _ in found[name]] for split, found in by_split.items()}
    return classes, files, labels


def source_fingerprint(root: Path, classes: list[str], files: dict[str, list[Path]]) -> str:
    """A digest of what the cache is built from: the classes and every file's path, size and mtime."""
    lines = [f"format {_SOURCE_FORMAT}", "classes " + "\t".join(classes)]
    for split, paths in files.items():
        for path in paths:
            stat = path.stat()
            lines.append(f"{split}\t{path.relative_to(root)}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return fingerprint.of_bytes("\n".join(lines).encode())


def build_folder_cache(cache: Path, root: Path, source: str, classes: list[str], files: dict[str, list[Path]],
                       labels: dict[str, list[int]], num_workers: int = 0) -> dict[str, Any]:
    """Read every image's header (one size for all, greyscale or not), then decode them into ``cache``."""
    paths = [p for split in files for p in files[split]]
    headers = list(each_file(paths, image_header, num_workers))
    sizes: dict[tuple[int, int], Path] = {}
    for path, (w, h, _) in zip(paths, headers):
        sizes.setdefault((w, h), path)  # the first file of each size
    if len(sizes) > 1:
        (a, path_a), (b, path_b) = list(sizes.items())[:2]
        raise DataError(
            f"the images of {root} have mixed sizes: {path_a} is {a[0]}x{a[1]} pixels, {path_b} is {b[0]}x{b[1]}",
            "resize them to one size: every image of train/, val/ and test/ must have the same width and height",
        )
    (width, height), = sizes
    channels = 1 if all(mode in GREY_MODES for _, _, mode in headers) else 3
    read = functools.partial(read_image, mode="L" if channels == 1 else "RGB", size=(width, height), hint=_REPLACE)
    splits = {
        split: SplitSource(np.asarray(labels[split], dtype=np.int64), functools.partial(decode_into, paths=files[split], read=read, num_workers=num_workers))
        for split in files
    }
    description = {"source": str(root), "class_names": classes, "what": f"decoded uint8 images ({channels}, {height}, {width}) of {root}'s splits"}
    return build_cache(cache, source, (channels, height, width), splits, f"the image folder {root}", description)


@register("dataset", "imagefolder")
class ImageFolderDataModule(ImageDataModule):
    """A user's image folder (see the module docstring); ``info`` describes the data after :meth:`setup`."""

    info = DatasetInfo(name="imagefolder", num_classes=0, image_shape=(0, 0, 0), class_names=(), mean=(), std=())

    def __init__(self, root: str | None = None, val_fraction: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not root:
            raise ConfigError("dataset=imagefolder needs dataset.root, the folder that holds train/ and test/",
                              "e.g. dataset.root=/data/my_images (train/<class name>/*.png, test/<class name>/*.png, optional val/)")
        self.root = Path(str(root)).expanduser().absolute()
        self.val_fraction = check_val_fraction(val_fraction)
        self.manifest: dict[str, Any] | None = None

    @property
    def cache(self) -> Path:
        return self.data_dir / "imagefolder-cache" / fingerprint.of_bytes(str(self.root).encode())

    def setup(self, stage: str | None = None) -> None:
        if self.test_set is not None:
            return
        classes, files, labels = index_folder(self.root)
        source = source_fingerprint(self.root, classes, files)
        manifest = open_cache(self.cache, source) or build_folder_cache(self.cache, self.root, source, classes, files, labels, self.num_workers)
        self.manifest = manifest
        channels, height, width = manifest["image_shape"]
        stats = manifest["statistics"]
        self.info = DatasetInfo("imagefolder", len(classes), (channels, height, width), tuple(classes), tuple(stats["mean"]), tuple(stats["std"]))
        # Augmentation shifts by up to an eighth of the side, as CIFAR's 4 pixels of 32 do.
        cache_splits(self, self.cache, manifest, padding=max(1, min(height, width) // 8))

    def _content_identity(self) -> dict[str, Any]:
        self.setup()
        assert self.manifest is not None
        return cache_identity(self.manifest)
