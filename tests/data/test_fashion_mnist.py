"""dataset=fashion_mnist on small idx files written by robustness.data.layouts; nothing downloads.

torchvision's own idx reader is the oracle for the pixels and labels. The Debian package's folder
is pointed at a temporary folder in every test, so an installed package never changes a result.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets
from omegaconf import OmegaConf
from torchvision.datasets.mnist import read_image_file, read_label_file

from robustness.data import fashion_mnist as fmnist
from robustness.data import layouts
from robustness.data.fashion_mnist import FashionMNISTDataModule
from robustness.errors import ConfigError, DataError
from robustness.registry import build

CONF = Path(__file__).resolve().parents[2] / "conf" / "dataset" / "fashion_mnist.yaml"
RAW = Path("FashionMNIST") / "raw"


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No Debian package and no downloader unless a test puts one there."""
    debian = tmp_path / "debian"
    monkeypatch.setattr(fmnist, "DEBIAN_FOLDER", debian)

    class NoDownloads:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise AssertionError(f"torchvision's downloader was called: {args} {kwargs}")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", NoDownloads)
    return debian


def test_reads_torchvision_layout_pixel_for_pixel(tmp_path: Path) -> None:
    raw = layouts.write_fashion_mnist(tmp_path / "data", per_class=6, seed=1, test_per_class=3)
    dm = FashionMNISTDataModule(data_dir=tmp_path / "data", val_fraction=1 / 6, seed=0, batch_size=16)
    dm.setup()
    assert dm.info.class_names[0] == "T-shirt/top" and dm.info.class_names[9] == "Ankle boot" and dm.info.num_classes == 10
    assert dm.info.image_shape == (1, 28, 28) and dm.info.mean == (0.2860,) and dm.info.std == (0.3530,)
    assert len(dm.train_set) == 50 and len(dm.val_set) == 10 and len(dm.test_set) == 30

    x, y = dm.split_tensors("test")
    expected_x = read_image_file(str(raw / "t10k-images-idx3-ubyte")).unsqueeze(1).float() / 255
    expected_y = read_label_file(str(raw / "t10k-labels-idx1-ubyte"))
    assert x.shape == (30, 1, 28, 28) and x.dtype == torch.float32
    torch.testing.assert_close(x, expected_x, rtol=0, atol=0)
    assert y.tolist() == expected_y.tolist() and sorted(y.tolist()) == sorted(list(range(10)) * 3)

    # validation: one image of every class, each one of the official training images
    xv, yv = dm.split_tensors("val")
    assert sorted(yv.tolist()) == list(range(10))
    train_rows = {row.numpy().tobytes() for row in read_image_file(str(raw / "train-images-idx3-ubyte"))}
    assert all((image[0] * 255).round().to(torch.uint8).numpy().tobytes() in train_rows for image in xv)

    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (16, 1, 28, 28) and 0 <= xb.min() and xb.max() <= 1 and yb.dtype == torch.long


def test_gzipped_files_read_the_same(tmp_path: Path) -> None:
    layouts.write_fashion_mnist(tmp_path / "plain", per_class=3, seed=4)
    layouts.write_fashion_mnist(tmp_path / "gz", per_class=3, seed=4, gz=True)
    assert sorted(p.name for p in (tmp_path / "gz" / RAW).iterdir()) == sorted(f"{n}.gz" for names in layouts.FASHION_FILES.values() for n in names)
    split = {}
    for name in ("plain", "gz"):
        dm = FashionMNISTDataModule(data_dir=tmp_path / name, val_fraction=0.34)
        dm.setup()
        split[name] = dm.split_tensors("train") + dm.split_tensors("test")
    for a, b in zip(split["plain"], split["gz"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_debian_folder_is_used_and_a_copy_in_data_dir_comes_first(tmp_path: Path, _isolated: Path) -> None:
    # The Debian package's layout: the four .gz files directly in one folder.
    raw = layouts.write_fashion_mnist(tmp_path / "src", per_class=2, seed=0, gz=True)
    shutil.copytree(raw, _isolated)
    dm = FashionMNISTDataModule(data_dir=tmp_path / "empty", val_fraction=0.5)
    dm.setup()
    assert len(dm.test_set) == 20
    plain = tmp_path / "t10k-images-idx3-ubyte"
    plain.write_bytes(gzip.decompress((raw / "t10k-images-idx3-ubyte.gz").read_bytes()))
    torch.testing.assert_close(dm.split_tensors("test")[0], read_image_file(str(plain)).unsqueeze(1).float() / 255, rtol=0, atol=0)

    layouts.write_fashion_mnist(tmp_path / "own", per_class=2, seed=0, test_per_class=1)
    own = FashionMNISTDataModule(data_dir=tmp_path / "own", val_fraction=0.5)
    own.setup()
    assert len(own.test_set) == 10  # data_dir's copy, not the package's 20


def test_missing_data_names_both_folders_and_both_ways_to_get_it(tmp_path: Path, _isolated: Path) -> None:
    with pytest.raises(DataError) as err:
        FashionMNISTDataModule(data_dir=tmp_path / "nowhere").setup()
    text = str(err.value)
    assert str(tmp_path / "nowhere" / RAW) in text and str(_isolated) in text
    assert "train-images-idx3-ubyte" in text and "make data" in text and "dataset.download=true" in text
    assert not (tmp_path / "nowhere").exists()



def test_a_user_folder_missing_a_file_is_an_error_never_a_switch_to_the_package_copy(tmp_path: Path, _isolated: Path) -> None:
    """Issue 32: with one idx file removed from paths.data_dir/FashionMNIST/raw, a complete Debian
    copy used to stand in silently; the user's folder is the copy in use, so its gap is an error."""
    shutil.copytree(layouts.write_fashion_mnist(tmp_path / "package", per_class=2, seed=5, gz=True), _isolated)
    raw = layouts.write_fashion_mnist(tmp_path / "own", per_class=1, seed=0)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as err:
        FashionMNISTDataModule(data_dir=tmp_path / "own").setup()
    message, hint = err.value.message, err.value.hint
    assert f"{raw} lacks t10k-labels-idx1-ubyte[.gz]" in message
    assert "train-images" not in message  # only what is missing is named
    assert "dataset.download=true" in hint and f"remove {raw}" in hint and str(_isolated) in hint
    with pytest.raises(DataError, match="lacks t10k-labels"):
        FashionMNISTDataModule(data_dir=tmp_path / "own").data_identity()

    # the folder without any of the files is no copy at all: the package's serves
    for path in raw.iterdir():
        path.unlink()
    dm = FashionMNISTDataModule(data_dir=tmp_path / "own", val_fraction=0.5)
    dm.setup()
    assert len(dm.test_set) == 20


def test_data_identity_names_the_files_read_by_content(tmp_path: Path, _isolated: Path) -> None:
    a = layouts.write_fashion_mnist(tmp_path / "a", per_class=2, seed=0)
    layouts.write_fashion_mnist(tmp_path / "b", per_class=2, seed=1)  # the same layout and size, other images
    ident = {name: FashionMNISTDataModule(data_dir=tmp_path / name).data_identity() for name in ("a", "b")}
    expected = {name: hashlib.sha256((a / name).read_bytes()).hexdigest() for names in layouts.FASHION_FILES.values() for name in names}
    assert ident["a"] == {"sha256": expected}
    assert ident["b"]["sha256"]["train-images-idx3-ubyte"] != expected["train-images-idx3-ubyte"]
    # a copy of the same bytes elsewhere is the same data
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    assert FashionMNISTDataModule(data_dir=tmp_path / "copy").data_identity() == ident["a"]


def test_download_uses_torchvision_and_reports_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class FakeDownloader:
        """Stands in for torchvision.datasets.FashionMNIST: leaves the files where it would."""

        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            calls.append((root, download))
            layouts.write_fashion_mnist(Path(root), per_class=2, seed=3)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeDownloader)
    dm = FashionMNISTDataModule(data_dir=tmp_path / "a", download=True, val_fraction=0.5)
    dm.setup()
    assert calls == [(str(tmp_path / "a"), True)] and len(dm.test_set) == 20
    FashionMNISTDataModule(data_dir=tmp_path / "a", download=True).setup()
    assert len(calls) == 1  # the files are there now: no second download

    class Offline:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    with pytest.raises(DataError) as err:
        FashionMNISTDataModule(data_dir=tmp_path / "b", download=True).setup()
    assert "downloading Fashion-MNIST" in str(err.value) and "Error downloading" in str(err.value) and "make data" in str(err.value)


@pytest.mark.parametrize("damage", ["truncated", "magic", "bad_gzip", "label_range", "count_mismatch", "image_size"])
def test_damaged_files_are_data_errors_naming_the_file(tmp_path: Path, damage: str) -> None:
    raw = layouts.write_fashion_mnist(tmp_path, per_class=2, gz=(damage == "bad_gzip"))
    images, labels = raw / "train-images-idx3-ubyte", raw / "train-labels-idx1-ubyte"
    if damage == "truncated":
        images.write_bytes(images.read_bytes()[:-100])
        named, expected = images, "the header promises"
    elif damage == "magic":
        images.write_bytes(struct.pack(">I", 0x0801) + images.read_bytes()[4:])
        named, expected = images, "magic number 0x00000801, expected 0x00000803"
    elif damage == "bad_gzip":
        gz = raw / "train-images-idx3-ubyte.gz"
        gz.write_bytes(gz.read_bytes()[:200])
        named, expected = gz, "truncated or corrupted"
    elif damage == "label_range":
        labels.write_bytes(layouts.idx_bytes(np.full(20, 10, dtype=np.uint8)))
        named, expected = labels, "labels should lie in 0..9"
    elif damage == "count_mismatch":
        labels.write_bytes(layouts.idx_bytes(np.zeros(19, dtype=np.uint8)))
        named, expected = labels, "holds 20 images"
    else:
        images.write_bytes(layouts.idx_bytes(np.zeros((20, 32, 32), dtype=np.uint8)))
        named, expected = images, "32x32 pixels, expected 28x28"
    with pytest.raises(DataError) as err:
        FashionMNISTDataModule(data_dir=tmp_path).setup()
    assert str(named) in str(err.value) and expected in str(err.value)


def test_idx_writer_matches_torchvision_reader(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(layouts.idx_bytes(array))
    gz = tmp_path / "x-idx3-ubyte.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert read_image_file(str(path)).tolist() == array.tolist()
    assert fmnist.read_idx(path, layouts.IDX_IMAGES_MAGIC, 3).tolist() == array.tolist()
    assert fmnist.read_idx(gz, layouts.IDX_IMAGES_MAGIC, 3).tolist() == array.tolist()


def test_config_builds_the_module_and_checks_val_fraction(tmp_path: Path) -> None:
    cfg = OmegaConf.load(CONF)
    assert cfg.name == "fashion_mnist" and cfg.download is False
    layouts.write_fashion_mnist(tmp_path, per_class=10)
    dm = build("dataset", cfg, data_dir=str(tmp_path), seed=0)
    dm.setup()
    assert dm.info.name == "fashion_mnist" and dm.batch_size == cfg.batch_size and len(dm.val_set) == 10
    augmented = FashionMNISTDataModule(data_dir=tmp_path, augment=True)
    augmented.setup()
    image, _ = augmented.train_set[0]
    assert image.shape == (1, 28, 28) and 0 <= image.min() and image.max() <= 1
    for fraction in (0.0, 1.0):
        with pytest.raises(ConfigError, match="val_fraction"):
            FashionMNISTDataModule(data_dir=tmp_path, val_fraction=fraction)

