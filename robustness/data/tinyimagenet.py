"""Tiny-ImageNet (200 classes of 64x64 RGB images) read from the official ``tiny-imagenet-200/`` folder.

Layout (as unpacked from the official zip)::

    tiny-imagenet-200/wnids.txt                    the 200 class ids, one a line
    tiny-imagenet-200/words.txt                    "<wnid>\\t<synonym>, <synonym>, ..." for every WordNet id
    tiny-imagenet-200/train/<wnid>/images/*.JPEG   500 training images per class
    tiny-imagenet-200/val/images/*.JPEG            10,000 labelled images ...
    tiny-imagenet-200/val/val_annotations.txt      ... labelled here: "<file>\\t<wnid>\\t<bbox>"

The official test images carry no labels, so the official ``val/`` serves as our test split and our
validation split is held out of ``train/``. ``val/`` is restructured once into ``val/<wnid>/images/``
(the layout of ``train/``); a marker file records that it is done.

The JPEGs are decoded once, at the first setup, into the shared decoded-image cache
(:mod:`robustness.data.cache`) next to the folder: ``tiny-imagenet-200.cache/``, one uint8 array of
shape (N, 3, 64, 64) and one of labels per split, ~1.2 GB for the full set. Training and evaluation
slice the memory-mapped arrays, so no epoch decodes a JPEG. The cache is rebuilt when the folder's
listing (every image's path, size and modification time, and the class list) changes, or when its
content no longer matches the SHA-256 recorded when it was written. A file with an image name but
unreadable content is reported, by name, while the cache is built, before any training starts.
"""

from __future__ import annotations

import functools
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from robustness.data.base import DatasetInfo, ImageDataModule, check_val_fraction, missing_data_error
from robustness.data.cache import SplitSource, build_cache, cache_identity, cache_splits, decode_into, open_cache, read_image
from robustness.data.cifar import fetch_archive
from robustness.errors import DataError
from robustness.fingerprint import of_bytes
from robustness.io import atomic_write_text
from robustness.registry import register

TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_FOLDER = "tiny-imagenet-200"
RESTRUCTURED_MARKER = ".restructured"
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})
_IMAGE_SIZE = (64, 64)
_RESTORE_HINT = f"restore it from the official archive ({TINY_URL}), or rerun with dataset.download=true to fill in missing files"


def read_wnids(root: Path) -> list[str]:
    """The class ids of ``root/wnids.txt``, sorted (the class index order ImageFolder would give)."""
    path = root / "wnids.txt"
    if not path.is_file():
        raise DataError(f"Tiny-ImageNet folder {root} has no wnids.txt", _RESTORE_HINT)
    seen: dict[str, int] = {}
    for number, line in enumerate(_read_lines(path), start=1):
        wnid = line.strip()
        if not wnid:
            continue
        if len(wnid.split()) != 1:
            raise DataError(f"{path} line {number}: expected one WordNet id, found {line.strip()!r}", _RESTORE_HINT)
        if wnid in seen:
            raise DataError(f"{path} line {number}: {wnid} already listed on line {seen[wnid]}", "remove the duplicate line")
        seen[wnid] = number
    if not seen:
        raise DataError(f"{path} lists no classes", _RESTORE_HINT)
    return sorted(seen)


def read_class_names(root: Path, wnids: Sequence[str]) -> tuple[str, ...]:
    """The first synonym of each wnid in ``root/words.txt`` (the wnid itself where words.txt has none)."""
    path = root / "words.txt"
    if not path.is_file():
        raise DataError(f"Tiny-ImageNet folder {root} has no words.txt (it names the classes)", _RESTORE_HINT)
    wanted = set(wnids)
    names: dict[str, str] = {}
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        wnid, tab, words = line.rstrip("\r\n").partition("\t")
        if not tab:
            raise DataError(f"{path} line {number}: expected '<wnid><TAB><names>', found {line.strip()!r:.80}", _RESTORE_HINT)
        if wnid in wanted and wnid not in names:
            names[wnid] = words.split(",")[0].strip() or wnid
    return tuple(names.get(w, w) for w in wnids)


def read_val_annotations(root: Path, wnids: Sequence[str]) -> list[tuple[str, str, int]]:
    """``(file name, wnid, line number)`` for each line of ``val/val_annotations.txt``, checked line by line."""
    path = root / "val" / "val_annotations.txt"
    if not path.is_file():
        raise DataError(
            f"Tiny-ImageNet folder {root} has no val/val_annotations.txt, so its validation images cannot be labelled",
            _RESTORE_HINT,
        )
    known = set(wnids)
    entries: list[tuple[str, str, int]] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        fields = line.rstrip("\r\n").split("\t")
        where = f"{path} line {number}"
        fix = f"correct line {number}: '<file>.JPEG<TAB><wnid><TAB>x0<TAB>y0<TAB>x1<TAB>y1', or {_RESTORE_HINT}"
        if len(fields) < 2 or not fields[0].strip() or not fields[1].strip():
            raise DataError(f"{where} is malformed: expected tab-separated '<file> <wnid> <bbox>', found {line.strip()!r:.80}", fix)
        name, wnid = fields[0].strip(), fields[1].strip()
        # Names are moved inside val/; one with a folder part could move files elsewhere.
        if Path(name).name != name or name in {".", ".."} or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{where}: {name!r} is not the name of an image file in val/images", fix)
        if wnid not in known:
            raise DataError(f"{where}: class {wnid!r} is not listed in wnids.txt", fix)
        if name in first_line:
            raise DataError(f"{where}: {name} is already labelled on line {first_line[name]}", f"remove one of lines {first_line[name]} and {number}")
        first_line[name] = number
        entries.append((name, wnid, number))
    if not entries:
        raise DataError(f"{path} is empty", _RESTORE_HINT)
    return entries


def restructure_val(root: Path, wnids: Sequence[str]) -> None:
    """Move ``val/images/<file>`` to ``val/<wnid>/images/<file>`` as labelled; safe to rerun or to resume.

    Each move is one rename, and the marker is written only after the last, so an interrupted run
    leaves every file in one of its two places and the next run completes the job. Two processes
    doing this at once (jobs of a multirun) end in the same state.
    """
    val = root / "val"
    if (val / RESTRUCTURED_MARKER).is_file():
        return
    if not (val / "val_annotations.txt").is_file() and not (val / "images").exists() and any((val / w / "images").is_dir() for w in wnids):
        return  # already in the per-class layout, put there by another tool
    entries = read_val_annotations(root, wnids)
    moves = []
    for name, wnid, number in entries:
        source, target = val / "images" / name, val / wnid / "images" / name
        if not source.is_file() and not target.is_file():
            raise DataError(
                f"{val / 'val_annotations.txt'} line {number} labels {name}, but neither {source} nor {target} exists",
                f"restore the missing image, or delete line {number}",
            )
        moves.append((source, target))
    try:
        for wnid in sorted({e[1] for e in entries}):
            (val / wnid / "images").mkdir(parents=True, exist_ok=True)
        for source, target in moves:
            try:
                os.replace(source, target)
            except FileNotFoundError:
                if not target.is_file():  # neither moved by us nor by a concurrent run
                    raise DataError(f"{source} vanished while val/ was being restructured", "restore it from the official archive and rerun") from None
        try:
            (val / "images").rmdir()
        except OSError:
            pass  # already gone, or it holds files no annotation names: leave them be
        atomic_write_text(val / RESTRUCTURED_MARKER, f"moved {len(moves)} images from val/images into val/<wnid>/images\n")
    except OSError as exc:
        raise DataError(
            f"cannot restructure {val} into per-class folders: {exc}",
            "make the folder writable, or copy tiny-imagenet-200 into a writable paths.data_dir=...",
        ) from None


def list_images(folder: Path) -> list[Path]:
    """The image files of one class folder, sorted; any other visible entry is a DataError naming it."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:
        raise DataError(f"Tiny-ImageNet class folder {folder} is missing", _RESTORE_HINT) from None
    except OSError as exc:
        raise DataError(f"cannot list {folder}: {exc.strerror or exc}", "check the folder's permissions") from None
    images = []
    for entry in entries:
        if entry.name.startswith("."):
            continue  # file-system metadata such as .DS_Store, never data
        if not entry.is_file() or Path(entry.name).suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(
                f"{Path(entry.path)} is not an image file (expected only .JPEG/.jpg/.png files in {folder})",
                "move it out of the dataset folder, or delete it",
            )
        images.append(Path(entry.path))
    return images


def load_rgb(path: str | Path, size: tuple[int, int] = _IMAGE_SIZE) -> np.ndarray:
    """One image file as uint8 (3, H, W); greyscale and palette images become RGB."""
    return read_image(path, "RGB", (size[1], size[0]), "replace it with the file from the official archive, or delete it")


CACHE_SUFFIX = ".cache"
_SPLITS = ("train", "test")
# Bumped when what the cache holds changes meaning (the source fingerprint then differs).
_SOURCE_FORMAT = 1


def source_fingerprint(root: Path, wnids: Sequence[str], files: dict[str, Sequence[Path]]) -> str:
    """A digest of what a cache is built from: the class list and every image's path, size and mtime."""
    lines = [f"format {_SOURCE_FORMAT}", "wnids " + " ".join(wnids)]
    for split in _SPLITS:
        for path in files[split]:
            stat = path.stat()
            lines.append(f"{split}\t{path.relative_to(root)}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return of_bytes("\n".join(lines).encode())


def build_tiny_cache(cache: Path, root: Path, fingerprint: str, files: dict[str, Sequence[Path]], labels: dict[str, Sequence[int]], num_workers: int = 0) -> dict[str, Any]:
    """Decode every image of ``files`` into the cache at ``cache``; returns its manifest."""
    decode = functools.partial(load_rgb, size=_IMAGE_SIZE)
    splits = {
        split: SplitSource(np.asarray(labels[split], dtype=np.int64), functools.partial(decode_into, paths=files[split], read=decode, num_workers=num_workers))
        for split in _SPLITS
    }
    description = {
        "source": str(root),
        "what": "decoded uint8 images (N, 3, 64, 64) of train/<wnid>/images and val/<wnid>/images, classes in sorted wnid order",
    }
    return build_cache(cache, fingerprint, (3, *_IMAGE_SIZE), splits, "Tiny-ImageNet", description)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}", "check the file's permissions") from None


@register("dataset", "tinyimagenet")
class TinyImageNetDataModule(ImageDataModule):
    """Tiny-ImageNet-200: 100k training images (a seeded stratified part held out for validation);
    the official 10k validation images are the test split.

    ``info.class_names`` is filled from words.txt by :meth:`setup` (the class attribute has none,
    as the names live with the data); ``info.num_classes`` then equals the number of wnids.
    """

    info = DatasetInfo(
        name="tinyimagenet",
        num_classes=200,
        image_shape=(3, 64, 64),
        class_names=(),
        # Per-channel statistics of the official 100k training images.
        mean=(0.4802, 0.4481, 0.3975),
        std=(0.2770, 0.2691, 0.2821),
    )

    def __init__(self, val_fraction: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.val_fraction = check_val_fraction(val_fraction)
        self.manifest: dict[str, Any] | None = None

    @property
    def root(self) -> Path:
        return self.data_dir / TINY_FOLDER

    @property
    def cache(self) -> Path:
        return self.data_dir / f"{TINY_FOLDER}{CACHE_SUFFIX}"

    def _incomplete(self) -> bool:
        return not all(
            [(self.root / "wnids.txt").is_file(), (self.root / "words.txt").is_file(), (self.root / "train").is_dir(), (self.root / "val").is_dir()]
        )

    def prepare_data(self) -> None:
        if self._incomplete():
            if self.download:
                fetch_archive(TINY_URL, TINY_MD5, self.data_dir, TINY_FOLDER, "Tiny-ImageNet")
            elif not self.root.is_dir():
                raise missing_data_error("Tiny-ImageNet", self.data_dir, f"{TINY_FOLDER}/ (wnids.txt, words.txt, train/, val/)")
        wnids = read_wnids(self.root)
        if not (self.root / "train").is_dir() or not (self.root / "val").is_dir():
            missing = "train/" if not (self.root / "train").is_dir() else "val/"
            raise DataError(f"Tiny-ImageNet folder {self.root} has no {missing}", _RESTORE_HINT)
        restructure_val(self.root, wnids)

    def setup(self, stage: str | None = None) -> None:
        if self.test_set is not None:
            return
        self.prepare_data()
        wnids = read_wnids(self.root)
        class_names = read_class_names(self.root, wnids)

        paths: list[Path] = []
        labels: list[int] = []
        for index, wnid in enumerate(wnids):
            found = list_images(self.root / "train" / wnid / "images")
            if not found:
                raise DataError(f"Tiny-ImageNet class folder {self.root / 'train' / wnid / 'images'} holds no images", _RESTORE_HINT)
            paths.extend(found)
            labels.extend([index] * len(found))
        test_paths: list[Path] = []
        test_labels: list[int] = []
        for index, wnid in enumerate(wnids):
            folder = self.root / "val" / wnid / "images"
            if folder.is_dir():  # a class may have no validation images in a reduced copy
                found = list_images(folder)
                test_paths.extend(found)
                test_labels.extend([index] * len(found))
        if not test_paths:
            raise DataError(f"Tiny-ImageNet folder {self.root / 'val'} holds no labelled images", _RESTORE_HINT)

        files = {"train": paths, "test": test_paths}
        labels_by_split = {"train": labels, "test": test_labels}
        fingerprint = source_fingerprint(self.root, wnids, files)
        manifest = open_cache(self.cache, fingerprint)
        if manifest is None:
            manifest = build_tiny_cache(self.cache, self.root, fingerprint, files, labels_by_split, num_workers=self.num_workers)
        self.manifest = manifest
        self.info = replace(self.info, num_classes=len(wnids), class_names=class_names)
        cache_splits(self, self.cache, manifest, padding=8)

    def _content_identity(self) -> dict[str, Any]:
        self.setup()
        return cache_identity(self.manifest)
