"""A user's own data: dataset=imagefolder (PNG class folders) and dataset=arrays (an .npz), both read
into the shared decoded-image cache; and the cache's content check (issue 32).

The oracles: PIL's own decoding of each file and NumPy's float64 mean and standard deviation.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli_in_process
from PIL import Image

from robustness.data import imagefolder as imagefolder_mod
from robustness.data import layouts
from robustness.data.arrays import ArraysDataModule
from robustness.data.imagefolder import ImageFolderDataModule
from robustness.data.tinyimagenet import TinyImageNetDataModule
from robustness.errors import ConfigError, DataError

NAMES = ("cat", "dog", "emu")
REPO = Path(__file__).resolve().parents[2]


def _png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _decoded(path: Path, mode: str = "RGB") -> np.ndarray:
    pixels = np.asarray(Image.open(path).convert(mode))
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _folder(tmp_path: Path, **kwargs) -> Path:
    return layouts.write_imagefolder(tmp_path / "data", per_class=4, seed=0, test_per_class=2, class_names=NAMES, size=12, **kwargs)


def _module(root: Path, tmp_path: Path, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(root=str(root), data_dir=tmp_path / "data_dir", seed=0, **kwargs)


# --------------------------------------------------------------------------- imagefolder


def test_imagefolder_reads_every_png_with_folder_names_as_classes_and_its_own_statistics(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    dm = _module(root, tmp_path, val_fraction=0.25)
    dm.setup()
    assert dm.info.name == "imagefolder" and dm.info.class_names == NAMES and dm.info.num_classes == 3
    assert dm.info.image_shape == (3, 12, 12)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (9, 3, 6)  # one of each class's 4 held out

    # the test split, pixel for pixel as PIL decodes it, in sorted class then file order
    files = [p for name in NAMES for p in sorted((root / "test" / name).iterdir())]
    x, y = dm.split_tensors("test")
    torch.testing.assert_close(x, torch.from_numpy(np.stack([_decoded(p) for p in files])).float() / 255, rtol=0, atol=0)
    assert y.tolist() == [0, 0, 1, 1, 2, 2]

    # mean and std: float64 over every pixel of every train/ image, per channel (the population std)
    train = np.stack([_decoded(p) for name in NAMES for p in sorted((root / "train" / name).iterdir())]).astype(np.float64) / 255
    np.testing.assert_allclose(dm.info.mean, train.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(dm.info.std, train.std(axis=(0, 2, 3)), rtol=0, atol=1e-12)

    # validation: one image per class, each one of train/'s, none of them in the training set
    xv, yv = dm.split_tensors("val")
    assert sorted(yv.tolist()) == [0, 1, 2]
    train_rows = {(row * 255).round().to(torch.uint8).numpy().tobytes() for row in dm.split_tensors("train")[0]}
    assert not any((image * 255).round().to(torch.uint8).numpy().tobytes() in train_rows for image in xv)
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape[1:] == (3, 12, 12) and yb.dtype == torch.long


def test_imagefolder_uses_val_when_present_and_reads_greyscale_as_one_channel(tmp_path: Path) -> None:
    root = _folder(tmp_path, val_per_class=1)
    dm = _module(root, tmp_path)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (12, 3)
    files = [p for name in NAMES for p in sorted((root / "val" / name).iterdir())]
    torch.testing.assert_close(dm.split_tensors("val")[0], torch.from_numpy(np.stack([_decoded(p) for p in files])).float() / 255, rtol=0, atol=0)

    grey = tmp_path / "grey"
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for name in ("a", "b"):
            for k in range(2):
                _png(grey / split / name / "deeper" / f"{k}.png", rng.integers(0, 256, (5, 7), dtype=np.uint8))  # in a sub-folder
    dm = _module(grey, tmp_path, val_fraction=0.5)
    dm.setup()
    assert dm.info.image_shape == (1, 5, 7) and len(dm.info.mean) == 1
    first = sorted((grey / "test" / "a" / "deeper").iterdir())[0]
    torch.testing.assert_close(dm.split_tensors("test")[0][0], torch.from_numpy(_decoded(first, "L")).float() / 255, rtol=0, atol=0)

    # one RGB image among greys: all are read as RGB, the greys widened to three equal channels
    _png(grey / "train" / "b" / "rgb.png", rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    dm = _module(grey, tmp_path, val_fraction=0.5)
    dm.setup()
    assert dm.info.image_shape == (3, 5, 7)
    image = dm.split_tensors("test")[0][0]
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    torch.testing.assert_close(image[0], torch.from_numpy(_decoded(first, "L")[0]).float() / 255, rtol=0, atol=0)


def test_imagefolder_cache_is_built_once_and_rebuilt_when_the_folder_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _folder(tmp_path)
    first = _module(root, tmp_path)
    first.setup()
    cache = first.cache
    assert cache.parent == tmp_path / "data_dir" / "imagefolder-cache" and (cache / "manifest.json").is_file()
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["class_names"] == list(NAMES) and manifest["image_shape"] == [3, 12, 12]

    with monkeypatch.context() as patch:
        patch.setattr(imagefolder_mod, "read_image", lambda *a, **k: pytest.fail("an image was decoded although the cache is current"))
        patch.setattr(imagefolder_mod, "image_header", lambda *a, **k: pytest.fail("an image was read although the cache is current"))
        again = _module(root, tmp_path)
        again.setup()
    torch.testing.assert_close(again.split_tensors("test")[0], first.split_tensors("test")[0], rtol=0, atol=0)
    assert again.data_identity() == first.data_identity()

    changed = sorted((root / "test" / "dog").iterdir())[0]
    new_pixels = np.full((12, 12, 3), 7, dtype=np.uint8)
    _png(changed, new_pixels)
    dm = _module(root, tmp_path)
    dm.setup()
    assert torch.equal(dm.split_tensors("test")[0][2], torch.full((3, 12, 12), 7 / 255))
    assert dm.data_identity() != first.data_identity()


def test_data_identity_is_the_content_so_two_folders_never_share_it_and_a_copy_does(tmp_path: Path) -> None:
    a = layouts.write_imagefolder(tmp_path / "a", per_class=2, seed=0, class_names=NAMES, size=8)
    b = layouts.write_imagefolder(tmp_path / "b", per_class=2, seed=1, class_names=NAMES, size=8)  # same shape and classes, other pixels
    shutil.copytree(a, tmp_path / "copy")
    ident = {name: _module(root, tmp_path).data_identity() for name, root in (("a", a), ("b", b), ("copy", tmp_path / "copy"))}
    assert ident["a"] != ident["b"]
    assert ident["a"] == ident["copy"]
    assert set(ident["a"]["sha256"]) == {"train_images.npy", "train_labels.npy", "test_images.npy", "test_labels.npy"}


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("no classes", "{root}/train holds no class folders, so there are no classes"),
        ("test lacks a class", "the class folders of {root}/test differ from those of {root}/train: test/ lacks emu"),
        ("val has another", "{root}/val differ from those of {root}/train: val/ lacks emu; val/ has kiwi, which train/ lacks"),
        ("unreadable", "cannot read image {root}/train/dog/00005.png"),
        ("truncated", "cannot read image {root}/test/cat/00000.png"),
        ("non-image", "{root}/train/cat/notes.txt is not an image file"),
        ("loose image", "{root}/train/loose.png is an image directly in the split folder"),
        ("mixed sizes", "the images of {root} have mixed sizes: {root}/train/cat/00000.png is 12x12 pixels, {root}/train/dog/big.png is 20x16"),
        ("no test", "the image folder {root} has no test/ folder"),
        ("empty class", "class folder {root}/train/emu holds no images"),
        ("missing root", "the image folder {root} does not exist"),
    ],
)
def test_imagefolder_bad_folders_are_data_errors_naming_the_file(tmp_path: Path, damage: str, expected: str) -> None:
    root = _folder(tmp_path)
    if damage == "no classes":
        for name in NAMES:
            shutil.rmtree(root / "train" / name)
    elif damage == "test lacks a class":
        shutil.rmtree(root / "test" / "emu")
    elif damage == "val has another":
        shutil.copytree(root / "test", root / "val")
        shutil.move(root / "val" / "emu", root / "val" / "kiwi")
        shutil.move(root / "test" / "emu", root / "test" / "kiwi")
    elif damage == "unreadable":
        (root / "train" / "dog" / "00005.png").write_bytes(b"not a png at all" * 8)
    elif damage == "truncated":
        path = root / "test" / "cat" / "00000.png"
        path.write_bytes(path.read_bytes()[:60])
    elif damage == "non-image":
        (root / "train" / "cat" / "notes.txt").write_text("hello")
        (root / "train" / "cat" / ".DS_Store").write_bytes(b"\0")  # hidden metadata is skipped
    elif damage == "loose image":
        shutil.copy(root / "train" / "cat" / "00000.png", root / "train" / "loose.png")
    elif damage == "mixed sizes":
        _png(root / "train" / "dog" / "big.png", np.zeros((16, 20, 3), dtype=np.uint8))
    elif damage == "no test":
        shutil.rmtree(root / "test")
    elif damage == "empty class":
        for path in (root / "train" / "emu").iterdir():
            path.unlink()
    elif damage == "missing root":
        root = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        _module(root, tmp_path).setup()
    assert expected.format(root=root) in err.value.message, err.value.message
    assert err.value.hint
    assert not (tmp_path / "data_dir" / "imagefolder-cache").exists() or not any((tmp_path / "data_dir" / "imagefolder-cache").iterdir())


def test_imagefolder_without_a_root_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dataset=imagefolder needs dataset.root"):
        ImageFolderDataModule(root=None, data_dir=tmp_path)


# --------------------------------------------------------------------------- arrays


def _arrays(tmp_path: Path, **arrays: np.ndarray) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "mine.npz"
    np.savez(path, **arrays)
    return path


def _base_arrays(n: int = 6, size: int = 5, channels: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8),
        "y_train": np.arange(n) % 3,
        "x_test": rng.integers(0, 256, (3, size, size, channels), dtype=np.uint8),
        "y_test": np.array([2, 0, 1]),
    }


def _arrays_module(path: Path, tmp_path: Path, **kwargs) -> ArraysDataModule:
    return ArraysDataModule(path=str(path), data_dir=tmp_path / "data_dir", seed=0, val_fraction=0.5, **kwargs)


def test_arrays_nhwc_uint8_and_nchw_float_give_the_same_images(tmp_path: Path) -> None:
    base = _base_arrays()
    nhwc = _arrays(tmp_path / "a", **base)
    nchw = _arrays(tmp_path / "b", **{**base, "x_train": base["x_train"].transpose(0, 3, 1, 2).astype(np.float32) / 255,
                                      "x_test": base["x_test"].transpose(0, 3, 1, 2).astype(np.float64) / 255})
    modules = [_arrays_module(path, tmp_path) for path in (nhwc, nchw)]
    for dm in modules:
        dm.setup()
        assert dm.info.name == "arrays" and dm.info.image_shape == (3, 5, 5) and dm.info.class_names == ("0", "1", "2")
        x, y = dm.split_tensors("test")
        torch.testing.assert_close(x, torch.from_numpy(base["x_test"].transpose(0, 3, 1, 2)).float() / 255, rtol=0, atol=0)
        assert y.tolist() == [2, 0, 1]
        np.testing.assert_allclose(dm.info.mean, base["x_train"].astype(np.float64).mean(axis=(0, 1, 2)) / 255, rtol=0, atol=1e-12)
        np.testing.assert_allclose(dm.info.std, (base["x_train"].astype(np.float64) / 255).std(axis=(0, 1, 2)), rtol=0, atol=1e-12)
        assert (len(dm.train_set), len(dm.val_set)) == (3, 3)
    assert modules[0].data_identity() == modules[1].data_identity()  # the same pixels, whatever form they came in


def test_arrays_greyscale_class_names_and_validation_arrays(tmp_path: Path) -> None:
    base = _base_arrays()
    grey = base["x_train"][..., 0]
    path = _arrays(tmp_path, x_train=grey, y_train=base["y_train"].reshape(-1, 1), x_test=base["x_test"][..., 0], y_test=base["y_test"],
                   x_val=grey[:2], y_val=np.array([1, 0]), class_names=np.array(["ant", "bee", "cow", "doe"]))
    dm = _arrays_module(path, tmp_path)
    dm.setup()
    assert dm.info.image_shape == (1, 5, 5) and dm.info.class_names == ("ant", "bee", "cow", "doe") and dm.info.num_classes == 4
    assert len(dm.train_set) == 6 and dm.split_tensors("val")[1].tolist() == [1, 0]
    torch.testing.assert_close(dm.split_tensors("val")[0][:, 0], torch.from_numpy(grey[:2]).float() / 255, rtol=0, atol=0)


def test_layouts_write_both_user_forms_and_they_carry_a_class_signal(tmp_path: Path) -> None:
    root = layouts.write_imagefolder(tmp_path, per_class=3, seed=0)
    path = layouts.write_arrays(tmp_path, per_class=3, seed=0, layout="NCHW", floating=True)
    for dm in (_module(root, tmp_path), _arrays_module(path, tmp_path)):
        dm.setup()
        assert dm.info.num_classes == 10 and dm.info.image_shape == (3, 32, 32) and dm.info.class_names == layouts.CIFAR10_NAMES
        x, y = dm.split_tensors("test")
        # each class's colour: an image's mean pixel is nearest its own class's colour
        colours = torch.from_numpy(layouts.class_colours(10)).float() / 255
        nearest = torch.cdist(x.mean(dim=(2, 3)), colours).argmin(dim=1)
        assert torch.equal(nearest, y)


@pytest.mark.parametrize(
    "change, expected",
    [
        ("missing keys", "lacks x_test, y_test (it holds: x_train, y_train)"),
        ("label out of range", "'y_test' holds the label 3 (at index 1), outside 0..2"),
        ("negative label", "'y_train' holds the label -1 (at index 0), outside 0..2"),
        ("label beyond class_names", "'y_train' holds the label 2 (at index 2), outside 0..1 (class_names lists 2 classes)"),
        ("float labels", "'y_train' has dtype float64; labels must be integers"),
        ("one-hot labels", "'y_train' has shape (6, 3); labels must be one integer per image"),
        ("lengths differ", "'y_train' holds 5 labels for the 6 images of 'x_train'"),
        ("sizes differ", "the images of 'x_test' are 4x4 with 3 channel(s), those of 'x_train' 5x5 with 3 channel(s)"),
        ("float above 1", "'x_train' holds values outside [0, 1]: image 2 has values in [0.0"),
        ("nan", "'x_test' holds NaN or infinite values (the first in image 1)"),
        ("int64 images", "'x_train' has dtype int64; images must be uint8 with values 0..255, or float16/32/64"),
        ("four channels", "neither its second nor its last axis holds 1 or 3 channels"),
        ("ambiguous", "could be NCHW or NHWC"),
        ("object names", "'class_names' holds Python objects"),
        ("not an npz", "cannot read {path} as an .npz archive"),
        ("missing file", "the arrays file {path} does not exist"),
    ],
)
def test_arrays_bad_files_are_data_errors_naming_the_file_and_array(tmp_path: Path, change: str, expected: str) -> None:
    arrays = _base_arrays()
    if change == "missing keys":
        arrays = {k: arrays[k] for k in ("x_train", "y_train")}
    elif change == "label out of range":
        arrays["y_test"] = np.array([2, 3, 1])
    elif change == "negative label":
        arrays["y_train"] = np.array([-1, 1, 2, 0, 1, 2])
    elif change == "label beyond class_names":
        arrays["class_names"] = np.array(["a", "b"])
    elif change == "float labels":
        arrays["y_train"] = arrays["y_train"].astype(np.float64)
    elif change == "one-hot labels":
        arrays["y_train"] = np.eye(3)[arrays["y_train"]].astype(np.int64)
    elif change == "lengths differ":
        arrays["y_train"] = arrays["y_train"][:5]
    elif change == "sizes differ":
        arrays["x_test"] = arrays["x_test"][:, :4, :4]
    elif change == "float above 1":
        arrays["x_train"] = arrays["x_train"].astype(np.float32) / 255
        arrays["x_train"][2, 1:] = 2.0
    elif change == "nan":
        arrays["x_test"] = arrays["x_test"].astype(np.float32) / 255
        arrays["x_test"][1, 0, 0, 0] = np.nan
    elif change == "int64 images":
        arrays["x_train"] = arrays["x_train"].astype(np.int64)
    elif change == "four channels":
        arrays["x_train"] = np.zeros((6, 5, 5, 4), dtype=np.uint8)
    elif change == "ambiguous":
        arrays["x_train"] = np.zeros((6, 3, 5, 3), dtype=np.uint8)
    elif change == "object names":
        arrays["class_names"] = np.array(["a", None, "c"], dtype=object)
    path = tmp_path / "mine.npz"
    if change == "not an npz":
        path.write_bytes(b"PK\x03\x04 this is no zip archive")
    elif change != "missing file":
        np.savez(path, **arrays)
    with pytest.raises(DataError) as err:
        _arrays_module(path, tmp_path).setup()
    assert str(path) in err.value.message and expected.format(path=path) in err.value.message, err.value.message
    assert err.value.hint


def test_arrays_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dataset=arrays needs dataset.path"):
        ArraysDataModule(path=None, data_dir=tmp_path)
    with pytest.raises(ConfigError, match="dataset.layout must be one of auto, NHWC, NCHW"):
        ArraysDataModule(path="x.npz", layout="HWC", data_dir=tmp_path)
    # an explicit layout settles what auto cannot
    arrays = {**_base_arrays(), "x_train": np.arange(6 * 3 * 5 * 3, dtype=np.uint8).reshape(6, 3, 5, 3)}
    arrays["x_test"] = np.zeros((3, 3, 5, 3), dtype=np.uint8)
    path = _arrays(tmp_path, **arrays)
    dm = _arrays_module(path, tmp_path, layout="NHWC")
    dm.setup()
    assert dm.info.image_shape == (3, 3, 5)
    torch.testing.assert_close(dm.split_tensors("train", indices=[0])[0][0] if 0 in dm.train_set.indices else dm.split_tensors("val", indices=[0])[0][0],
                               torch.from_numpy(arrays["x_train"][0].transpose(2, 0, 1)).float() / 255, rtol=0, atol=0)


# --------------------------------------------------------------------------- the cache's content check


def _zero_pixels(npy: Path) -> None:
    """Every pixel of a cached .npy set to 0, its header and size unchanged (issue 32's tampering)."""
    images = np.load(npy, mmap_mode="r+")
    images[:] = 0
    images.flush()
    del images


@pytest.mark.parametrize("dataset", ["tinyimagenet", "imagefolder", "arrays"])
def test_a_tampered_cache_is_caught_by_its_digest_and_rebuilt(tmp_path: Path, dataset: str, caplog: pytest.LogCaptureFixture) -> None:
    if dataset == "tinyimagenet":
        layouts.write_tinyimagenet(tmp_path, 3, seed=0, val_per_class=1, num_classes=3)
        make = lambda: TinyImageNetDataModule(data_dir=tmp_path, val_fraction=0.34)  # noqa: E731
    elif dataset == "imagefolder":
        root = _folder(tmp_path)
        make = lambda: _module(root, tmp_path)  # noqa: E731
    else:
        path = layouts.write_arrays(tmp_path, per_class=2, seed=0, size=6)
        make = lambda: _arrays_module(path, tmp_path)  # noqa: E731
    first = make()
    first.setup()
    expected = first.split_tensors("train")[0]
    assert expected.max() > 0
    npy = first.cache / "train_images.npy"
    size, mtime = npy.stat().st_size, npy.stat().st_mtime_ns
    _zero_pixels(npy)
    os.utime(npy, ns=(mtime, mtime))  # even with its modification time put back
    assert npy.stat().st_size == size and npy.stat().st_mtime_ns == mtime

    with caplog.at_level(logging.WARNING, logger="robustness"):
        again = make()
        again.setup()
    torch.testing.assert_close(again.split_tensors("train")[0], expected, rtol=0, atol=0)
    assert f"the decoded cache {first.cache} no longer holds what was written there (train_images.npy" in caplog.text
    assert np.load(npy).max() > 0  # rebuilt from the source
    assert again.data_identity() == first.data_identity()


# --------------------------------------------------------------------------- through the command line


def test_a_bad_image_folder_is_reported_by_the_cli_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    root = _folder(tmp_path)
    _png(root / "train" / "dog" / "big.png", np.zeros((16, 20, 3), dtype=np.uint8))
    monkeypatch.chdir(tmp_path)
    code, stderr = cli_in_process(["experiment=train", "dataset=imagefolder", f"dataset.root={root}", "trainer=cpu", "logger=csv",
                                   f"paths.artifacts_dir={tmp_path / 'store'}", f"paths.output_dir={tmp_path / 'out'}",
                                   f"paths.data_dir={tmp_path / 'd'}"], capsys, monkeypatch)
    assert code == 2, stderr[-2000:]
    assert f"error: the images of {root} have mixed sizes" in stderr and "fix: resize them to one size" in stderr
    assert "Traceback" not in stderr
    assert not list((tmp_path / "store").rglob("model.pt"))
