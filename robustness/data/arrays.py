"""A user's images as NumPy arrays: ``dataset=arrays dataset.path=FILE.npz``.

The ``.npz`` file (``np.savez`` or ``np.savez_compressed``) holds:

- ``x_train``, ``x_test`` (and optionally ``x_val``): images, either
  uint8 with values 0..255, or floating point (float16/32/64) with values in [0, 1];
  shaped (N, H, W, C) or (N, C, H, W) with C = 1 or 3 channels, or (N, H, W) for greyscale.
  ``dataset.layout`` says which (NHWC or NCHW); ``auto`` tells them apart by which axis has 1 or 3
  entries and refuses a shape where both could.
- ``y_train``, ``y_test`` (and ``y_val`` with ``x_val``): integer class labels, shape (N,) or (N, 1).
- optionally ``class_names``: an array of K strings; labels then lie in 0..K-1. Without it the
  classes are 0..K-1 with K = the largest training label + 1, named "0".."K-1".

Without ``x_val``, a seeded stratified ``dataset.val_fraction`` of the training images is held out.
Anything else (other integer dtypes, 4 channels, NaN, values outside the range, labels out of range,
lengths that disagree) is refused with an error that names the file and the array.

The arrays are written once into the decoded-image cache (:mod:`robustness.data.cache`) at
``<paths.data_dir>/arrays-cache/<SHA-256 of the file's absolute path>/`` as uint8 (floating-point
images are rounded to the nearest of the 256 levels, x * 255), with the per-channel mean and
standard deviation of the training images; it is rebuilt when the file's size or modification time
or the cache's content changes.
"""

from __future__ import annotations

import functools
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from robustness import fingerprint
from robustness.data.base import DatasetInfo, ImageDataModule, check_val_fraction
from robustness.data.cache import SplitSource, build_cache, cache_identity, cache_splits, open_cache
from robustness.errors import ConfigError, DataError
from robustness.registry import register

LAYOUTS = ("auto", "NHWC", "NCHW")
REQUIRED_KEYS = ("x_train", "y_train", "x_test", "y_test")
_SOURCE_FORMAT = 1
_CHUNK = 4096  # images converted at a time, so float input never doubles in memory at once
_ACCEPTED = "uint8 with values 0..255, or float16/32/64 with values in [0, 1]"


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file, without unpickling anything; a DataError naming the file otherwise."""
    if not path.is_file():
        raise DataError(f"the arrays file {path} does not exist" if not path.exists() else f"{path} is a folder, not an .npz file",
                        "set dataset.path=FILE.npz, a file saved with np.savez(FILE, x_train=..., y_train=..., x_test=..., y_test=...)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise DataError(f"{path} holds one array, not an .npz archive of named arrays",
                                "save it with np.savez(FILE, x_train=..., y_train=..., x_test=..., y_test=...)")
            names = list(archive.files)
            missing = [key for key in REQUIRED_KEYS if key not in names]
            if missing:
                raise DataError(f"{path} lacks {', '.join(missing)} (it holds: {', '.join(names) or 'nothing'})",
                                "save all four: np.savez(FILE, x_train=..., y_train=..., x_test=..., y_test=...)")
            wanted = [*REQUIRED_KEYS, *(k for k in ("x_val", "y_val", "class_names") if k in names)]
            arrays = {}
            for key in wanted:
                try:
                    arrays[key] = archive[key]
                except ValueError as exc:  # object arrays need unpickling, which could run code
                    raise DataError(f"{path}: '{key}' holds Python objects ({exc}); refusing to unpickle it",
                                    f"save '{key}' as a plain array (numbers, or strings for class_names)") from None
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"cannot read {path} as an .npz archive: {type(exc).__name__}: {exc}",
                        "save it again with np.savez or np.savez_compressed") from None
    if ("x_val" in arrays) != ("y_val" in arrays):
        raise DataError(f"{path} holds {'x_val' if 'x_val' in arrays else 'y_val'} without {'y_val' if 'x_val' in arrays else 'x_val'}",
                        "save both validation arrays, or neither (a part of x_train is then held out)")
    return arrays


def to_nchw(x: np.ndarray, key: str, path: Path, layout: str) -> np.ndarray:
    """``x`` as a (N, C, H, W) view (no copy), its layout checked or told apart."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise DataError(f"{path}: '{key}' has shape {x.shape}; images must be (N, H, W, C), (N, C, H, W) or (N, H, W)",
                        "save the images as one array with the image index first")
    first, last = x.shape[1] in (1, 3), x.shape[3] in (1, 3)
    if layout == "auto":
        if first and last:
            raise DataError(f"{path}: '{key}' has shape {x.shape}, which could be NCHW or NHWC",
                            "say which with dataset.layout=NCHW or dataset.layout=NHWC")
        if not (first or last):
            raise DataError(f"{path}: '{key}' has shape {x.shape}: neither its second nor its last axis holds 1 or 3 channels",
                            "save greyscale (1 channel) or RGB (3 channels) images; drop an alpha channel")
        layout = "NCHW" if first else "NHWC"
    if layout == "NHWC":
        if not last:
            raise DataError(f"{path}: '{key}' has shape {x.shape}, which is not NHWC with 1 or 3 channels",
                            "fix dataset.layout (NCHW?), or save greyscale or RGB images")
        return x.transpose(0, 3, 1, 2)
    if not first:
        raise DataError(f"{path}: '{key}' has shape {x.shape}, which is not NCHW with 1 or 3 channels",
                        "fix dataset.layout (NHWC?), or save greyscale or RGB images")
    return x


def check_pixels(x: np.ndarray, key: str, path: Path) -> None:
    """Refuse dtypes other than uint8 and floating point, and float values outside [0, 1] or not finite."""
    if x.dtype == np.uint8:
        return
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{path}: '{key}' has dtype {x.dtype}; images must be {_ACCEPTED}",
                        f"convert it, e.g. {key}.astype(np.uint8) for values 0..255, or {key} / 255.0 as float32")
    for start in range(0, len(x), _CHUNK):
        block = x[start : start + _CHUNK]
        finite = np.isfinite(block)
        if not finite.all():
            first = start + int(np.argwhere(~finite)[0][0])
            raise DataError(f"{path}: '{key}' holds NaN or infinite values (the first in image {first})", "replace or drop those images")
        if float(block.min()) < 0.0 or float(block.max()) > 1.0:
            first = int(np.argwhere((block < 0.0) | (block > 1.0))[0][0])
            image = block[first]
            raise DataError(
                f"{path}: '{key}' holds values outside [0, 1]: image {start + first} has values in [{float(image.min()):g}, {float(image.max()):g}]; "
                "float images must lie in [0, 1]",
                "scale them into [0, 1] (values 0..255: divide by 255), or save them as uint8",
            )


def check_labels(y: np.ndarray, key: str, path: Path, count: int) -> np.ndarray:
    """``y`` as int64 (N,), checked to be integers, one per image."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{path}: '{key}' has shape {y.shape}; labels must be one integer per image, shape (N,)",
                        "save class indices, not one-hot rows: y.argmax(axis=1)")
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
        raise DataError(f"{path}: '{key}' has dtype {y.dtype}; labels must be integers (class indices 0..K-1)",
                        f"save {key}.astype(np.int64) if its values are whole numbers")
    if len(y) != count:
        x_key = "x" + key[1:]
        raise DataError(f"{path}: '{key}' holds {len(y)} labels for the {count} images of '{x_key}'", f"save one label per image of '{x_key}'")
    return y.astype(np.int64)


def load_arrays(path: Path, layout: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    """``(split -> images (N, C, H, W) as stored, split -> labels, class names)``, every check done."""
    arrays = read_npz(path)
    splits = [s for s in ("train", "val", "test") if f"x_{s}" in arrays]
    images = {s: to_nchw(arrays[f"x_{s}"], f"x_{s}", path, layout) for s in splits}
    shape = images["train"].shape[1:]
    for split in splits:
        if images[split].shape[1:] != shape:
            raise DataError(f"{path}: the images of 'x_{split}' are {_shape(images[split].shape[1:])}, those of 'x_train' {_shape(shape)}",
                            "save every split with the same image size and channels")
        if len(images[split]) == 0:
            raise DataError(f"{path}: 'x_{split}' holds no images", "save at least one image per split")
        check_pixels(arrays[f"x_{split}"], f"x_{split}", path)
    labels = {s: check_labels(arrays[f"y_{s}"], f"y_{s}", path, len(images[s])) for s in splits}
    if "class_names" in arrays:
        names = arrays["class_names"]
        if names.ndim != 1 or not (np.issubdtype(names.dtype, np.str_) or np.issubdtype(names.dtype, np.bytes_)):
            raise DataError(f"{path}: 'class_names' should be a 1-D array of strings, found {names.dtype} of shape {names.shape}",
                            "save np.array(['cat', 'dog', ...]) as class_names")
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
        source = "class_names lists"
    else:
        classes = [str(i) for i in range(int(labels["train"].max()) + 1)]
        source = "y_train's largest label makes"
    for split in splits:
        y = labels[split]
        bad = np.flatnonzero((y < 0) | (y >= len(classes)))
        if len(bad):
            raise DataError(
                f"{path}: 'y_{split}' holds the label {y[bad[0]]} (at index {bad[0]}), outside 0..{len(classes) - 1} ({source} {len(classes)} classes)",
                "labels are class indices 0..K-1; save class_names with all K names to declare classes that y_train lacks",
            )
    if len(classes) < 2:
        raise DataError(f"{path}: there is one class; a classifier needs two or more", "save labels of at least two classes")
    return images, labels, classes


def _shape(chw: tuple[int, ...]) -> str:
    return f"{chw[1]}x{chw[2]} with {chw[0]} channel(s)"


def _write_uint8(target: np.ndarray, source: np.ndarray) -> None:
    for start in range(0, len(source), _CHUNK):
        block = source[start : start + _CHUNK]
        target[start : start + len(block)] = block if block.dtype == np.uint8 else np.rint(block.astype(np.float32) * 255.0).astype(np.uint8)


@register("dataset", "arrays")
class ArraysDataModule(ImageDataModule):
    """A user's ``.npz`` of images and labels (see the module docstring); ``info`` describes the data after :meth:`setup`."""

    info = DatasetInfo(name="arrays", num_classes=0, image_shape=(0, 0, 0), class_names=(), mean=(), std=())

    def __init__(self, path: str | None = None, layout: str = "auto", val_fraction: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not path:
            raise ConfigError("dataset=arrays needs dataset.path, an .npz file holding x_train, y_train, x_test, y_test",
                              "e.g. dataset.path=/data/my_images.npz")
        if layout not in LAYOUTS:
            raise ConfigError(f"dataset.layout must be one of {', '.join(LAYOUTS)}, got {layout!r}", "e.g. dataset.layout=NHWC")
        self.path = Path(str(path)).expanduser().absolute()
        self.layout = layout
        self.val_fraction = check_val_fraction(val_fraction)
        self.manifest: dict[str, Any] | None = None

    @property
    def cache(self) -> Path:
        return self.data_dir / "arrays-cache" / fingerprint.of_bytes(str(self.path).encode())

    def _source_fingerprint(self) -> str:
        if not self.path.is_file():
            read_npz(self.path)  # says what is wrong with the path
        stat = self.path.stat()
        return fingerprint.of_config({"format": _SOURCE_FORMAT, "file": str(self.path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                      "layout": self.layout})

    def setup(self, stage: str | None = None) -> None:
        if self.test_set is not None:
            return
        source = self._source_fingerprint()
        manifest = open_cache(self.cache, source)
        if manifest is None:
            images, labels, classes = load_arrays(self.path, self.layout)
            splits = {
                split: SplitSource(labels[split], functools.partial(_write_uint8, source=images[split])) for split in images
            }
            description = {"source": str(self.path), "class_names": classes, "what": f"the images of {self.path} as uint8 (N, C, H, W)"}
            manifest = build_cache(self.cache, source, images["train"].shape[1:], splits, f"the arrays {self.path}", description)
        self.manifest = manifest
        channels, height, width = manifest["image_shape"]
        stats = manifest["statistics"]
        classes = list(manifest["class_names"])
        self.info = DatasetInfo("arrays", len(classes), (channels, height, width), tuple(classes), tuple(stats["mean"]), tuple(stats["std"]))
        cache_splits(self, self.cache, manifest, padding=max(1, min(height, width) // 8))

    def _content_identity(self) -> dict[str, Any]:
        self.setup()
        assert self.manifest is not None
        return cache_identity(self.manifest)
