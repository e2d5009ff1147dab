"""Small datasets written in each official on-disk layout, for the rehearsal and for tests.

Every writer produces the real file formats at the real image size (and, by default, the real
class count), so the loaders read them exactly as they read the official downloads; only the
number of images differs. A user's own data gets the two forms it may come in: PNG class
folders (``dataset=imagefolder``) and an ``.npz`` of arrays (``dataset=arrays``). Images carry a
learnable class signal: each class has its own colour (Fashion-MNIST, being grey, a bright block
in its own place), with per-pixel Gaussian noise on top, so a model trained for a few steps beats
chance while no two images are alike.

``python -m robustness.data.layouts DATA_DIR [--per-class N]`` writes all of them.
"""

from __future__ import annotations

import argparse
import gzip
import pickle
import struct
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import scipy.io
from PIL import Image

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TINY_NUM_CLASSES = 200
# Colours stay this far inside [0, 255], so the noise is rarely clipped and an image's mean is its class colour.
_COLOUR_RANGE = (48, 208)
_NOISE_STD = 16.0
_FASHION_BLOCK = 7  # Fashion-MNIST's signal: a 7x7 bright block in one of 12 places of the 28x28 image


def class_colours(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` uint8: the colour of each class, the same for every seed and every dataset.

    Picked greedily, each the candidate farthest from those already picked, so classes stay as far
    apart as the range allows (the first k colours are the same for any ``num_classes``).
    """
    rng = np.random.default_rng(20_240_601)
    candidates = rng.integers(_COLOUR_RANGE[0], _COLOUR_RANGE[1] + 1, size=(max(4096, 8 * num_classes), 3)).astype(np.float64)
    picked = [0]
    nearest = np.linalg.norm(candidates - candidates[0], axis=1)
    while len(picked) < num_classes:
        picked.append(int(nearest.argmax()))
        nearest = np.minimum(nearest, np.linalg.norm(candidates - candidates[picked[-1]], axis=1))
    return candidates[picked].astype(np.uint8)


def colour_images(labels: np.ndarray, num_classes: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``(N, size, size, 3)`` uint8 images: the colour of each label plus Gaussian pixel noise."""
    base = class_colours(num_classes)[labels].astype(np.float32)[:, None, None, :]
    noise = rng.normal(0.0, _NOISE_STD, size=(len(labels), size, size, 3)).astype(np.float32)
    return np.clip(np.rint(base + noise), 0, 255).astype(np.uint8)


def fashion_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``(N, 28, 28)`` uint8 images: a bright block placed by the label, on a dark noisy background."""
    images = rng.normal(30.0, _NOISE_STD, size=(len(labels), 28, 28)).astype(np.float32)
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(int(label), 4)
        top, left = 1 + row * 9, 1 + col * _FASHION_BLOCK
        images[i, top : top + _FASHION_BLOCK, left : left + _FASHION_BLOCK] += 170.0
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def _shuffled_labels(num_classes: int, per_class: int, rng: np.random.Generator) -> np.ndarray:
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    return rng.permutation(np.repeat(np.arange(num_classes), per_class))


# --------------------------------------------------------------------------- CIFAR-10


def write_cifar10(
    data_dir: Path, per_class: int, seed: int = 0, test_per_class: int | None = None, label_names: Sequence[str] = CIFAR10_NAMES
) -> Path:
    """``data_dir/cifar-10-batches-py``: data_batch_1..5 with ``per_class`` images of every class
    each, test_batch with ``test_per_class`` (default ``per_class``), batches.meta; returns the folder.

    As in the official pickles: ``data`` is uint8 (N, 3072), the red plane then green then blue,
    row by row; ``labels`` a list of ints; labels in shuffled order.
    """
    if len(label_names) != 10:
        raise ValueError(f"CIFAR-10 has 10 classes, got {len(label_names)} names")
    rng = np.random.default_rng(seed)
    root = Path(data_dir) / "cifar-10-batches-py"
    root.mkdir(parents=True, exist_ok=True)
    files = [(f"data_batch_{i}", f"training batch {i} of 5", per_class) for i in range(1, 6)]
    files.append(("test_batch", "testing batch 1 of 1", per_class if test_per_class is None else test_per_class))
    for name, batch_label, count in files:
        labels = _shuffled_labels(10, count, rng)
        pixels = colour_images(labels, 10, 32, rng).transpose(0, 3, 1, 2).reshape(len(labels), 3072)
        batch = {
            "batch_label": batch_label,
            "labels": labels.tolist(),
            "data": np.ascontiguousarray(pixels),
            "filenames": [f"{name}_{j:05d}.png" for j in range(len(labels))],
        }
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {"label_names": list(label_names), "num_cases_per_batch": 10 * per_class, "num_vis": 3072}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


# --------------------------------------------------------------------------- SVHN


def write_svhn(data_dir: Path, per_class: int, seed: int = 0, test_per_class: int | None = None) -> Path:
    """``data_dir/svhn/{train,test}_32x32.mat``; returns the folder.

    As in the official files: ``X`` is uint8 (32, 32, 3, N), ``y`` is (N, 1) with labels 1..10,
    where 10 stands for the digit 0.
    """
    rng = np.random.default_rng(seed)
    folder = Path(data_dir) / "svhn"
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", per_class), ("test", per_class if test_per_class is None else test_per_class)):
        digits = _shuffled_labels(10, count, rng)
        images = colour_images(digits, 10, 32, rng)
        y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(-1, 1)
        scipy.io.savemat(str(folder / f"{split}_32x32.mat"), {"X": np.ascontiguousarray(images.transpose(1, 2, 3, 0)), "y": y})
    return folder


# --------------------------------------------------------------------------- Tiny-ImageNet


def tiny_imagenet_classes(num_classes: int = TINY_NUM_CLASSES) -> list[tuple[str, str]]:
    """``(wnid, first synonym)`` of each class, in the (unsorted) order wnids.txt lists them."""
    rng = np.random.default_rng(200)
    numbers = rng.choice(np.arange(1_000_000, 15_000_000), size=num_classes, replace=False)
    return [(f"n{int(n):08d}", f"thing {i:03d}") for i, n in enumerate(numbers)]


def write_tinyimagenet(
    data_dir: Path, per_class: int, seed: int = 0, val_per_class: int | None = None, num_classes: int = TINY_NUM_CLASSES
) -> Path:
    """``data_dir/tiny-imagenet-200`` as unpacked from the official zip; returns that folder.

    wnids.txt (unsorted), words.txt (more ids than wnids.txt, several synonyms a line),
    train/<wnid>/images/<wnid>_<i>.JPEG with train/<wnid>/<wnid>_boxes.txt, val/images/val_<k>.JPEG
    labelled by val/val_annotations.txt, and unlabelled test/images/test_<k>.JPEG; 64x64 JPEGs.
    ``val_per_class`` defaults to a tenth of ``per_class`` (the official 50 to 500). As in the real
    set, some images are greyscale JPEGs: here the first training image of the last class in wnids.txt.
    """
    rng = np.random.default_rng(seed)
    classes = tiny_imagenet_classes(num_classes)
    index = {wnid: i for i, (wnid, _) in enumerate(sorted(classes))}
    val_per_class = max(1, per_class // 10) if val_per_class is None else val_per_class
    root = Path(data_dir) / "tiny-imagenet-200"
    root.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(f"{wnid}\n" for wnid, _ in classes))
    words = ["n00001740\tentity"] + [f"{wnid}\t{name}, synonym of {name}" for wnid, name in sorted(classes)] + ["n15102894\tunused, other"]
    (root / "words.txt").write_text("\n".join(words) + "\n")

    def save(path: Path, pixels: np.ndarray, grey: bool = False) -> None:
        image = Image.fromarray(pixels, "RGB")
        (image.convert("L") if grey else image).save(path, format="JPEG", quality=90)

    for wnid, _ in classes:
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True, exist_ok=True)
        images = colour_images(np.full(per_class, index[wnid]), num_classes, 64, rng)
        for i, pixels in enumerate(images):
            save(folder / f"{wnid}_{i}.JPEG", pixels, grey=(i == 0 and wnid == classes[-1][0]))
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(f"{wnid}_{i}.JPEG\t0\t0\t63\t63\n" for i in range(per_class)))

    val_wnids = [classes[i][0] for i in _shuffled_labels(num_classes, val_per_class, rng)]
    (root / "val" / "images").mkdir(parents=True, exist_ok=True)
    images = colour_images(np.array([index[w] for w in val_wnids]), num_classes, 64, rng)
    lines = []
    for k, (wnid, pixels) in enumerate(zip(val_wnids, images)):
        save(root / "val" / "images" / f"val_{k}.JPEG", pixels)
        lines.append(f"val_{k}.JPEG\t{wnid}\t0\t3\t60\t61\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))

    (root / "test" / "images").mkdir(parents=True, exist_ok=True)
    for k, pixels in enumerate(colour_images(rng.integers(0, num_classes, size=len(val_wnids)), num_classes, 64, rng)):
        save(root / "test" / "images" / f"test_{k}.JPEG", pixels)
    return root


# --------------------------------------------------------------------------- Fashion-MNIST

FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, three dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, one dimension


def idx_bytes(array: np.ndarray) -> bytes:
    """A uint8 array in the idx format: magic (0, 0, type 0x08, ndim), big-endian int32 sizes, data."""
    if array.dtype != np.uint8:
        raise ValueError(f"idx files here hold uint8, got {array.dtype}")
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def write_fashion_mnist(data_dir: Path, per_class: int, seed: int = 0, test_per_class: int | None = None, gz: bool = False) -> Path:
    """``data_dir/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (``.gz`` with ``gz``),
    the layout torchvision's ``FashionMNIST`` downloads into; returns the raw folder."""
    rng = np.random.default_rng(seed)
    raw = Path(data_dir) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", per_class), ("test", per_class if test_per_class is None else test_per_class)):
        labels = _shuffled_labels(10, count, rng).astype(np.uint8)
        images_name, labels_name = FASHION_FILES[split]
        for name, array in ((images_name, fashion_images(labels, rng)), (labels_name, labels)):
            data = idx_bytes(array)
            if gz:
                (raw / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
            else:
                (raw / name).write_bytes(data)
    return raw


# --------------------------------------------------------------------------- a user's own images

IMAGEFOLDER = "imagefolder"
ARRAYS_FILE = "arrays.npz"


def write_imagefolder(
    data_dir: Path, per_class: int, seed: int = 0, test_per_class: int | None = None, val_per_class: int = 0,
    class_names: Sequence[str] = CIFAR10_NAMES, size: int = 32,
) -> Path:
    """``data_dir/imagefolder/{train,test}/<class name>/<k>.png`` (and ``val/`` with ``val_per_class``),
    the layout ``dataset=imagefolder`` reads; RGB PNGs of ``size`` x ``size``; returns the folder."""
    rng = np.random.default_rng(seed)
    root = Path(data_dir) / IMAGEFOLDER
    counts = {"train": per_class, "test": per_class if test_per_class is None else test_per_class, "val": val_per_class}
    for split, count in counts.items():
        if count == 0:
            continue
        labels = np.repeat(np.arange(len(class_names)), count)
        for k, (label, pixels) in enumerate(zip(labels, colour_images(labels, len(class_names), size, rng))):
            folder = root / split / class_names[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, "RGB").save(folder / f"{k:05d}.png")
    return root


def write_arrays(
    data_dir: Path, per_class: int, seed: int = 0, test_per_class: int | None = None,
    class_names: Sequence[str] | None = CIFAR10_NAMES, size: int = 32, layout: str = "NHWC", floating: bool = False,
) -> Path:
    """``data_dir/arrays.npz`` with x_train, y_train, x_test, y_test (and class_names unless None),
    the file ``dataset=arrays`` reads: uint8 images (float in [0, 1] with ``floating``) in ``layout``."""
    rng = np.random.default_rng(seed)
    num_classes = 10 if class_names is None else len(class_names)
    arrays: dict[str, np.ndarray] = {}
    for split, count in (("train", per_class), ("test", per_class if test_per_class is None else test_per_class)):
        labels = _shuffled_labels(num_classes, count, rng)
        images = colour_images(labels, num_classes, size, rng)
        if layout == "NCHW":
            images = images.transpose(0, 3, 1, 2)
        arrays[f"x_{split}"] = images.astype(np.float32) / 255.0 if floating else np.ascontiguousarray(images)
        arrays[f"y_{split}"] = labels.astype(np.int64)
    if class_names is not None:
        arrays["class_names"] = np.array(list(class_names))
    path = Path(data_dir) / ARRAYS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


# --------------------------------------------------------------------------- all of them


def write_all(data_dir: Path, per_class: int, seed: int = 0, per_class_of: Mapping[str, int] | None = None) -> dict[str, Path]:
    """Every layout above under ``data_dir`` (the folder ``paths.data_dir`` names); returns name -> folder.

    per_class_of: a count of its own for some layouts (e.g. ``{"tinyimagenet": 1}``), ``per_class`` for the rest.
    """
    data_dir = Path(data_dir)
    writers = {"cifar10": write_cifar10, "svhn": write_svhn, "tinyimagenet": write_tinyimagenet, "fashion_mnist": write_fashion_mnist,
               "imagefolder": write_imagefolder, "arrays": write_arrays}
    counts = dict(per_class_of or {})
    unknown = sorted(set(counts) - set(writers))
    if unknown:
        raise ValueError(f"no layout named {unknown}; the layouts are {sorted(writers)}")
    return {name: write(data_dir, counts.get(name, per_class), seed) for name, write in writers.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m robustness.data.layouts", description="Write small datasets in the official layouts.")
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--per-class", type=int, default=10, help="images per class in each file (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name, folder in write_all(args.data_dir, args.per_class, args.seed).items():
        print(f"{name}: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
