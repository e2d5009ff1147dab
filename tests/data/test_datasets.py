"""CIFAR-10, SVHN and Tiny-ImageNet loaders on small copies in each official on-disk layout,
written by :mod:`robustness.data.layouts`.

Nothing here reaches the internet: downloads are exercised against a local HTTP server (or a
closed local port) and every test with ``download=False`` fails if a download function is called.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import pickle
import shutil
import socket
import tarfile
import threading
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from helpers import make_fake_tiny
import scipy.io
import torch
from omegaconf import OmegaConf
from PIL import Image

from robustness.data import cifar as cifar_mod
from robustness.data import layouts
from robustness.data import svhn as svhn_mod
from robustness.data import tinyimagenet as tiny_mod
from robustness.data.base import random_crop_flip_batch
from robustness.data.cifar import CIFAR10DataModule
from robustness.data.svhn import SVHNDataModule
from robustness.data.tinyimagenet import RESTRUCTURED_MARKER, TinyImageNetDataModule
from robustness.errors import ConfigError, DataError
from robustness.registry import build

CONF = Path(__file__).resolve().parents[2] / "conf" / "dataset"
FAKE_CIFAR_NAMES = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "lorry"]


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _no_network_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep urllib away from any proxy, so that only local test servers are ever contacted."""
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")


def _forbid_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a download was attempted with download=False: {args}")

    monkeypatch.setattr(cifar_mod, "download_url", fail)
    monkeypatch.setattr(cifar_mod, "extract_archive", fail)


def _closed_port_url(name: str) -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on localhost: (folder, base URL)."""
    served = tmp_path / "served"
    served.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_side_effect(path: str) -> None:
    Path(path).write_text("code ran")


class _Exploit:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple:
        return (_write_side_effect, (self.path,))


# --------------------------------------------------------------------------- CIFAR-10 fakes


def make_fake_cifar(data_dir: Path, per_class: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """layouts' CIFAR-10 pickles (``per_class`` images of every class in each training batch, two in
    the test batch, our own class names), and their contents read back with the plain unpickler."""
    root = layouts.write_cifar10(data_dir, per_class, seed, test_per_class=2, label_names=FAKE_CIFAR_NAMES)
    batches = [pickle.loads((root / f"data_batch_{i}").read_bytes(), encoding="latin1") for i in range(1, 6)]
    test = pickle.loads((root / "test_batch").read_bytes(), encoding="latin1")
    return {
        "train_images": np.concatenate([b["data"] for b in batches]),
        "train_labels": np.concatenate([b["labels"] for b in batches]),
        "test_images": test["data"],
        "test_labels": np.asarray(test["labels"]),
    }


def test_cifar_reads_official_pickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_downloads(monkeypatch)
    fake = make_fake_cifar(tmp_path, per_class=1)
    # bytes keys, as Python 3 sees the official files with encoding="bytes": the reader accepts both kinds
    test_batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    as_bytes = {key.encode(): value for key, value in pickle.loads(test_batch.read_bytes(), encoding="latin1").items()}
    test_batch.write_bytes(pickle.dumps(as_bytes, protocol=2))
    dm = CIFAR10DataModule(data_dir=tmp_path, seed=0, val_fraction=0.2, batch_size=8)
    dm.setup()
    assert dm.info.class_names == tuple(FAKE_CIFAR_NAMES)  # from batches.meta, not the built-in names
    assert dm.info.num_classes == 10 and dm.info.image_shape == (3, 32, 32)
    assert len(dm.train_set) == 40 and len(dm.val_set) == 10 and len(dm.test_set) == 20

    # the test split keeps file order: pixel for pixel the fake data, R plane then G then B
    x, y = dm.split_tensors("test")
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32
    expected = torch.from_numpy(fake["test_images"].reshape(20, 3, 32, 32)).float() / 255
    torch.testing.assert_close(x, expected)
    assert x[3, 1, 0, 5].item() == pytest.approx(fake["test_images"][3, 1024 + 5] / 255)
    assert y.tolist() == fake["test_labels"].tolist()

    # validation: one image of each class, all of them training images
    xv, yv = dm.split_tensors("val")
    assert sorted(yv.tolist()) == list(range(10))
    train_rows = {row.tobytes() for row in fake["train_images"]}
    assert all((img * 255).round().to(torch.uint8).numpy().reshape(-1).tobytes() in train_rows for img in xv)

    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (8, 3, 32, 32) and xb.min() >= 0 and xb.max() <= 1 and yb.dtype == torch.long

    dm.setup()  # idempotent: the same split objects survive a second call
    assert dm.split_tensors("val")[1].tolist() == yv.tolist()


def test_cifar_split_is_seeded_and_train_fraction_subsamples(tmp_path: Path) -> None:
    make_fake_cifar(tmp_path, per_class=2)
    val = {}
    for seed in (0, 0, 1):
        dm = CIFAR10DataModule(data_dir=tmp_path, seed=seed, val_fraction=0.2)
        dm.setup()
        val.setdefault(seed, []).append(dm.split_tensors("val")[0])
    torch.testing.assert_close(val[0][0], val[0][1])
    assert not torch.equal(val[0][0], val[1][0])

    dm = CIFAR10DataModule(data_dir=tmp_path, seed=0, val_fraction=0.2, train_fraction=0.5, augment=True)
    dm.setup()
    assert len(dm.train_set) == 40  # 8 per class kept after hold-out, half of them
    image, label = dm.train_set[0]
    assert image.shape == (3, 32, 32) and 0 <= image.min() and image.max() <= 1 and 0 <= int(label) < 10


def test_cifar_missing_data_names_path_and_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_downloads(monkeypatch)
    dm = CIFAR10DataModule(data_dir=tmp_path / "nowhere", download=False)
    with pytest.raises(DataError) as err:
        dm.setup()
    text = str(err.value)
    assert str(tmp_path / "nowhere") in text and "cifar-10-batches-py" in text
    assert "dataset.download=true" in text and "paths.data_dir" in text
    assert not (tmp_path / "nowhere").exists()  # nothing created, nothing fetched

    make_fake_cifar(tmp_path / "partial")
    (tmp_path / "partial" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        CIFAR10DataModule(data_dir=tmp_path / "partial").setup()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "exploit", "wrong_shape", "bad_labels"])
def test_cifar_damaged_batch_is_a_data_error(tmp_path: Path, damage: str) -> None:
    make_fake_cifar(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    marker = tmp_path / "exploited"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a pickle at all" * 50)
    elif damage == "exploit":
        path.write_bytes(pickle.dumps({"data": _Exploit(marker), "labels": []}, protocol=2))
    elif damage == "wrong_shape":
        path.write_bytes(pickle.dumps({"data": np.zeros((10, 100), np.uint8), "labels": list(range(10))}, protocol=2))
    else:
        path.write_bytes(pickle.dumps({"data": np.zeros((10, 3072), np.uint8), "labels": [12] * 10}, protocol=2))
    with pytest.raises(DataError) as err:
        CIFAR10DataModule(data_dir=tmp_path).setup()
    assert str(path) in str(err.value) and "truncated or corrupted" in str(err.value)
    assert "dataset.download=true" in str(err.value)
    assert not marker.exists()


def test_cifar_download_failure_says_how_to_place_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = _closed_port_url("cifar-10-python.tar.gz")
    monkeypatch.setattr(cifar_mod, "CIFAR10_URL", url)
    with pytest.raises(DataError) as err:
        CIFAR10DataModule(data_dir=tmp_path, download=True).setup()
    text = str(err.value)
    assert "downloading CIFAR-10" in text and "failed" in text and url in text
    assert "by hand" in text and str(tmp_path) in text


def test_cifar_download_unpacks_and_keeps_existing_files(tmp_path: Path, http_dir: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    served, base = http_dir
    make_fake_cifar(tmp_path / "src")
    archive = served / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    monkeypatch.setattr(cifar_mod, "CIFAR10_URL", f"{base}/cifar-10-python.tar.gz")
    monkeypatch.setattr(cifar_mod, "CIFAR10_MD5", _md5(archive))

    # a local copy lacking two files: the download fills those in and leaves the rest untouched
    data_dir = tmp_path / "data"
    make_fake_cifar(data_dir, seed=7)
    own = data_dir / "cifar-10-batches-py" / "data_batch_1"
    own_bytes = own.read_bytes()
    (data_dir / "cifar-10-batches-py" / "data_batch_4").unlink()
    (data_dir / "cifar-10-batches-py" / "test_batch").unlink()
    dm = CIFAR10DataModule(data_dir=data_dir, download=True)
    dm.setup()
    assert own.read_bytes() == own_bytes
    assert (data_dir / "cifar-10-batches-py" / "test_batch").read_bytes() == (tmp_path / "src" / "cifar-10-batches-py" / "test_batch").read_bytes()
    assert len(dm.test_set) == 20
    assert not [p for p in data_dir.iterdir() if p.name.startswith(".cifar")]  # staging folder cleaned up

    wrong = CIFAR10DataModule(data_dir=tmp_path / "fresh", download=True)
    monkeypatch.setattr(cifar_mod, "CIFAR10_MD5", "0" * 32)
    with pytest.raises(DataError, match="downloading CIFAR-10"):
        wrong.setup()


# --------------------------------------------------------------------------- SVHN fakes


def make_fake_svhn(folder: Path, n_train_per_class: int = 4, n_test_per_class: int = 2) -> dict[str, np.ndarray]:
    """layouts' SVHN .mat files moved into ``folder``, and their X (32, 32, 3, N) and y (N, 1) read back."""
    written = layouts.write_svhn(folder / ".layouts", n_train_per_class, seed=0, test_per_class=n_test_per_class)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split in ("train", "test"):
        path = shutil.move(written / f"{split}_32x32.mat", folder / f"{split}_32x32.mat")
        mat = scipy.io.loadmat(str(path))
        out[f"{split}_x"], out[f"{split}_y"] = mat["X"], mat["y"]
    shutil.rmtree(folder / ".layouts")
    return out


def test_svhn_reads_official_mat_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_downloads(monkeypatch)
    monkeypatch.setattr(svhn_mod, "fetch_file", lambda *a, **k: pytest.fail("download attempted"))
    fake = make_fake_svhn(tmp_path / "svhn")
    dm = SVHNDataModule(data_dir=tmp_path, seed=3, val_fraction=0.25)
    dm.setup()
    assert dm.info.class_names == tuple(str(d) for d in range(10)) and dm.info.num_classes == 10
    assert len(dm.train_set) == 30 and len(dm.val_set) == 10 and len(dm.test_set) == 20
    x, y = dm.split_tensors("test")
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y.tolist() == [int(v) % 10 for v in fake["test_y"].reshape(-1)]
    assert 0 in y.tolist() and 10 not in y.tolist()  # label 10 is the digit 0
    torch.testing.assert_close(x[5], torch.from_numpy(fake["test_x"][:, :, :, 5].transpose(2, 0, 1)).float() / 255)
    assert sorted(dm.split_tensors("val")[1].tolist()) == list(range(10))


def test_svhn_accepts_torchvision_layout_and_rejects_augment(tmp_path: Path) -> None:
    make_fake_svhn(tmp_path)  # files directly in data_dir, where torchvision's SVHN puts them
    dm = SVHNDataModule(data_dir=tmp_path)
    dm.setup()
    assert len(dm.test_set) == 20
    with pytest.raises(ConfigError, match="augment"):
        SVHNDataModule(data_dir=tmp_path, augment=True)


def test_svhn_missing_data_names_path_and_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_downloads(monkeypatch)
    with pytest.raises(DataError) as err:
        SVHNDataModule(data_dir=tmp_path).setup()
    text = str(err.value)
    assert str(tmp_path / "svhn") in text and "train_32x32.mat" in text and "dataset.download=true" in text


@pytest.mark.parametrize("damage", ["truncate", "garbage", "labels"])
def test_svhn_damaged_file_is_a_data_error(tmp_path: Path, damage: str) -> None:
    make_fake_svhn(tmp_path / "svhn")
    path = tmp_path / "svhn" / "train_32x32.mat"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:5000])
    elif damage == "garbage":
        path.write_bytes(b"this is not a MATLAB file" * 20)
    else:
        scipy.io.savemat(str(path), {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.array([[0], [11]], np.uint8)})
    with pytest.raises(DataError) as err:
        SVHNDataModule(data_dir=tmp_path).setup()
    assert str(path) in str(err.value)
    assert ("labels should lie in 1..10" if damage == "labels" else "truncated or corrupted") in str(err.value)


def test_svhn_download_failure_and_success(tmp_path: Path, http_dir: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    bad = {"train": (_closed_port_url("train_32x32.mat"), "0" * 32), "test": (_closed_port_url("test_32x32.mat"), "0" * 32)}
    monkeypatch.setattr(svhn_mod, "SVHN_URLS", bad)
    with pytest.raises(DataError) as err:
        SVHNDataModule(data_dir=tmp_path / "a", download=True).setup()
    assert "downloading SVHN" in str(err.value) and "by hand" in str(err.value)
    assert not (tmp_path / "a" / "svhn" / "train_32x32.mat").exists()  # no half file under the real name

    served, base = http_dir
    make_fake_svhn(served)
    good = {s: (f"{base}/{s}_32x32.mat", _md5(served / f"{s}_32x32.mat")) for s in ("train", "test")}
    monkeypatch.setattr(svhn_mod, "SVHN_URLS", good)
    dm = SVHNDataModule(data_dir=tmp_path / "b", download=True)
    dm.setup()
    assert (tmp_path / "b" / "svhn" / "test_32x32.mat").is_file() and len(dm.test_set) == 20


# --------------------------------------------------------------------------- Tiny-ImageNet fakes

TINY_CLASSES = layouts.tiny_imagenet_classes(3)
WNIDS = [wnid for wnid, _ in TINY_CLASSES]  # in wnids.txt order, which is unsorted, as the official file is
NAMES = dict(TINY_CLASSES)
COLOURS = {wnid: tuple(layouts.class_colours(3)[i].tolist()) for i, wnid in enumerate(sorted(WNIDS))}
GREY_WNID = WNIDS[-1]  # layouts writes its first training image as a greyscale JPEG, as the real set has some


def _jpeg(path: Path, colour: tuple[int, int, int], size: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, format="JPEG", quality=95)


def _val_labels(root: Path) -> dict[str, str]:
    """file name -> wnid, as val/val_annotations.txt labels them."""
    return dict(line.split("\t")[:2] for line in (root / "val" / "val_annotations.txt").read_text().splitlines())


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_tinyimagenet_loads_and_restructures_val(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_downloads(monkeypatch)
    root = make_fake_tiny(tmp_path)
    dm = TinyImageNetDataModule(data_dir=tmp_path, seed=0, val_fraction=0.25, batch_size=4)
    dm.setup()
    ordered = sorted(WNIDS)
    assert dm.info.class_names == tuple(NAMES[w] for w in ordered)  # first synonym, sorted wnid order
    assert dm.info.num_classes == 3 and dm.info.image_shape == (3, 64, 64)
    assert len(dm.train_set) == 9 and len(dm.val_set) == 3 and len(dm.test_set) == 6

    greys = 0
    for split in ("train", "val", "test"):
        x, y = dm.split_tensors(split)
        assert x.shape[1:] == (3, 64, 64) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        for image, label in zip(x, y.tolist()):
            colour = torch.tensor(COLOURS[ordered[label]]).float() / 255
            if (image[0] == image[1]).all() and (image[1] == image[2]).all():
                assert ordered[label] == GREY_WNID  # the greyscale one, widened to three equal channels
                greys += 1
            else:
                torch.testing.assert_close(image.mean(dim=(1, 2)), colour, atol=4 / 255, rtol=0)
    assert greys == 1
    assert sorted(dm.split_tensors("test")[1].tolist()) == [0, 0, 1, 1, 2, 2]

    # val/ now has the layout of train/, with a marker; the annotations stay
    val = root / "val"
    assert (val / RESTRUCTURED_MARKER).is_file() and not (val / "images").exists() and (val / "val_annotations.txt").is_file()
    labelled = _val_labels(root)
    assert sorted(p.name for p in (val / WNIDS[0] / "images").iterdir()) == sorted(n for n, w in labelled.items() if w == WNIDS[0])
    assert len(labelled) == 6

    # a second run on the restructured folder changes nothing and loads the same test split
    before = _tree(root)
    marker_time = (val / RESTRUCTURED_MARKER).stat().st_mtime_ns
    again = TinyImageNetDataModule(data_dir=tmp_path, val_fraction=0.25)
    again.setup()
    assert _tree(root) == before and (val / RESTRUCTURED_MARKER).stat().st_mtime_ns == marker_time
    torch.testing.assert_close(again.split_tensors("test")[0], dm.split_tensors("test")[0])

    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 3, 64, 64) and yb.dtype == torch.long


def test_tinyimagenet_interrupted_restructure_is_completed(tmp_path: Path) -> None:
    root = make_fake_tiny(tmp_path)
    # an earlier run moved two files and was then stopped before writing the marker
    labelled = _val_labels(root)
    for name, wnid in (("val_0.JPEG", labelled["val_0.JPEG"]), ("val_4.JPEG", labelled["val_4.JPEG"])):
        (root / "val" / wnid / "images").mkdir(parents=True, exist_ok=True)
        shutil.move(root / "val" / "images" / name, root / "val" / wnid / "images" / name)
    dm = TinyImageNetDataModule(data_dir=tmp_path, augment=True)
    dm.setup()
    assert (root / "val" / RESTRUCTURED_MARKER).is_file() and not (root / "val" / "images").exists()
    assert len(dm.test_set) == 6 and sum(len(list((root / "val" / w / "images").iterdir())) for w in WNIDS) == 6
    image, _ = dm.train_set[0]
    assert image.shape == (3, 64, 64)


def test_tinyimagenet_accepts_val_already_in_class_folders(tmp_path: Path) -> None:
    root = make_fake_tiny(tmp_path)
    TinyImageNetDataModule(data_dir=tmp_path).setup()
    (root / "val" / RESTRUCTURED_MARKER).unlink()
    (root / "val" / "val_annotations.txt").unlink()  # as some other tools leave it
    dm = TinyImageNetDataModule(data_dir=tmp_path)
    dm.setup()
    assert len(dm.test_set) == 6


@pytest.mark.parametrize(
    "line, expected",
    [
        ("val_2.JPEG", "line 3 is malformed"),
        ("val_2.JPEG\tn00000000\t0\t0\t1\t1", "line 3: class 'n00000000' is not listed in wnids.txt"),
        (f"../../escape.JPEG\t{WNIDS[1]}\t0\t0\t1\t1", "line 3: '../../escape.JPEG' is not the name of an image file"),
        (f"val_0.JPEG\t{WNIDS[1]}\t0\t0\t1\t1", "line 3: val_0.JPEG is already labelled on line 1"),
        (f"val_99.JPEG\t{WNIDS[1]}\t0\t0\t1\t1", "line 3 labels val_99.JPEG, but neither"),
    ],
)
def test_tinyimagenet_malformed_annotations_name_the_line(tmp_path: Path, line: str, expected: str) -> None:
    root = make_fake_tiny(tmp_path)
    path = root / "val" / "val_annotations.txt"
    lines = path.read_text().splitlines()
    lines[2] = line
    path.write_text("\n".join(lines) + "\n")
    before = _tree(root)
    with pytest.raises(DataError) as err:
        TinyImageNetDataModule(data_dir=tmp_path).setup()
    assert expected in str(err.value) and str(path) in str(err.value)
    assert _tree(root) == before  # checked before anything moves


def test_tinyimagenet_missing_files_are_data_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_downloads(monkeypatch)
    with pytest.raises(DataError) as err:
        TinyImageNetDataModule(data_dir=tmp_path / "none").setup()
    assert str(tmp_path / "none") in str(err.value) and "tiny-imagenet-200" in str(err.value)
    assert "dataset.download=true" in str(err.value) and "paths.data_dir" in str(err.value)

    root = make_fake_tiny(tmp_path / "a")
    (root / "val" / "val_annotations.txt").unlink()
    with pytest.raises(DataError, match="no val/val_annotations.txt"):
        TinyImageNetDataModule(data_dir=tmp_path / "a").setup()

    root = make_fake_tiny(tmp_path / "b")
    (root / "wnids.txt").unlink()
    with pytest.raises(DataError, match="has no wnids.txt"):
        TinyImageNetDataModule(data_dir=tmp_path / "b").setup()

    root = make_fake_tiny(tmp_path / "c")
    shutil.rmtree(root / "train" / WNIDS[1] / "images")
    with pytest.raises(DataError, match=rf"class folder .*{WNIDS[1]}.* is missing"):
        TinyImageNetDataModule(data_dir=tmp_path / "c").setup()


def test_tinyimagenet_non_image_file_is_named_at_setup(tmp_path: Path) -> None:
    root = make_fake_tiny(tmp_path)
    stray = root / "train" / WNIDS[1] / "images" / "notes.txt"
    stray.write_text("not an image")
    (root / "train" / WNIDS[1] / "images" / ".DS_Store").write_bytes(b"\x00")  # hidden metadata is skipped
    with pytest.raises(DataError) as err:
        TinyImageNetDataModule(data_dir=tmp_path).setup()
    assert f"{stray} is not an image file" in str(err.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_size"])
def test_tinyimagenet_unreadable_image_is_named_when_the_cache_is_built(tmp_path: Path, damage: str) -> None:
    root = make_fake_tiny(tmp_path)
    bad = root / "val" / "images" / "val_2.JPEG"
    if damage == "garbage":
        bad.write_bytes(b"GIF? no: random bytes " * 10)
    elif damage == "truncated":
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        bad.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    else:
        _jpeg(bad, (1, 2, 3), size=40)
    moved = root / "val" / _val_labels(root)["val_2.JPEG"] / "images" / "val_2.JPEG"
    # names are fine, so the index is built; the content is checked when the cache decodes it, before any training
    with pytest.raises(DataError) as err:
        TinyImageNetDataModule(data_dir=tmp_path).setup()
    assert str(moved) in str(err.value)
    assert ("40x40 pixels" if damage == "wrong_size" else "cannot read image") in str(err.value)
    # a failed build leaves neither a cache nor its staging folder behind, so the next setup fails alike
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-imagenet-200"]
    with pytest.raises(DataError):
        TinyImageNetDataModule(data_dir=tmp_path).setup()


def _decoded(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def test_tinyimagenet_cache_is_built_once_and_serves_decoded_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_fake_tiny(tmp_path)
    dm = TinyImageNetDataModule(data_dir=tmp_path, val_fraction=0.25)
    dm.setup()
    cache = tmp_path / "tiny-imagenet-200.cache"
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 12, "test": 6} and manifest["source"] == str(root)
    images = np.load(cache / "train_images.npy", mmap_mode="r")
    assert images.shape == (12, 3, 64, 64) and images.dtype == np.uint8
    assert np.load(cache / "train_labels.npy").tolist() == [0] * 4 + [1] * 4 + [2] * 4

    # pixel for pixel what PIL decodes from the file, in sorted wnid then file order
    first_of_class_1 = root / "train" / sorted(WNIDS)[1] / "images" / f"{sorted(WNIDS)[1]}_0.JPEG"
    torch.testing.assert_close(torch.from_numpy(np.array(images[4])).float() / 255, _decoded(first_of_class_1), rtol=0, atol=0)
    x_test = dm.split_tensors("test")[0]
    expected = torch.stack([_decoded(p) for w in sorted(WNIDS) for p in sorted((root / "val" / w / "images").iterdir())])
    torch.testing.assert_close(x_test, expected, rtol=0, atol=0)

    # a second module reads the cache and decodes nothing
    monkeypatch.setattr(tiny_mod, "load_rgb", lambda *a, **k: pytest.fail("a JPEG was decoded although the cache is current"))
    again = TinyImageNetDataModule(data_dir=tmp_path, val_fraction=0.25)
    again.setup()
    torch.testing.assert_close(again.split_tensors("val")[0], dm.split_tensors("val")[0], rtol=0, atol=0)

    # the datasets pickle without their mapping (a spawned worker maps the file, never copies it)
    blob = pickle.dumps(again.test_set)
    assert len(blob) < 10_000
    torch.testing.assert_close(pickle.loads(blob)[3][0], x_test[3], rtol=0, atol=0)


@pytest.mark.parametrize("change", ["replaced image", "added image", "damaged cache", "cache from elsewhere"])
def test_tinyimagenet_cache_is_rebuilt_when_it_no_longer_matches(tmp_path: Path, change: str) -> None:
    root = make_fake_tiny(tmp_path)
    TinyImageNetDataModule(data_dir=tmp_path).setup()
    cache = tmp_path / "tiny-imagenet-200.cache"
    first = min(WNIDS)
    target = root / "train" / first / "images" / f"{first}_1.JPEG"
    expected_train = 12
    if change == "replaced image":
        _jpeg(target, (1, 250, 3))
    elif change == "added image":
        _jpeg(target.with_name("extra.JPEG"), (1, 250, 3))
        expected_train = 13
    elif change == "damaged cache":
        path = cache / "train_images.npy"
        path.write_bytes(path.read_bytes()[:1000])
    else:
        manifest = json.loads((cache / "manifest.json").read_text())
        (cache / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": "0" * 64}))
    dm = TinyImageNetDataModule(data_dir=tmp_path, val_fraction=0.25)
    dm.setup()
    assert json.loads((cache / "manifest.json").read_text())["counts"]["train"] == expected_train
    images = np.load(cache / "train_images.npy", mmap_mode="r")
    assert images.shape[0] == expected_train
    if change != "damaged cache":
        row = 0 if change == "added image" else 1  # "extra.JPEG" sorts before the numbered files
        torch.testing.assert_close(torch.from_numpy(np.array(images[row])).float() / 255, _decoded(target.with_name("extra.JPEG") if change == "added image" else target), rtol=0, atol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging or retired folders left


def test_tinyimagenet_cache_build_keeps_an_equal_cache_and_reports_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_fake_tiny(tmp_path)
    dm = TinyImageNetDataModule(data_dir=tmp_path)
    dm.setup()
    cache = tmp_path / "tiny-imagenet-200.cache"
    manifest = json.loads((cache / "manifest.json").read_text())
    inode = (cache / "train_images.npy").stat().st_ino
    # a second job of a multirun that built the same cache meanwhile leaves the first one in place (its readers keep their files)
    root = tmp_path / "tiny-imagenet-200"
    files = {"train": [root / "train" / w / "images" / f"{w}_{i}.JPEG" for w in sorted(WNIDS) for i in range(4)],
             "test": [p for w in sorted(WNIDS) for p in sorted((root / "val" / w / "images").iterdir())]}
    labels = {"train": [i // 4 for i in range(12)], "test": [i // 2 for i in range(6)]}
    assert tiny_mod.source_fingerprint(root, sorted(WNIDS), files) == manifest["fingerprint"]
    tiny_mod.build_tiny_cache(cache, root, manifest["fingerprint"], files, labels)
    assert (cache / "train_images.npy").stat().st_ino == inode

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    _jpeg(files["train"][0], (9, 9, 9))  # the source changed, so a rebuild is due
    monkeypatch.setattr(tiny_mod.np.lib.format, "open_memmap", disk_full)
    with pytest.raises(DataError) as err:
        TinyImageNetDataModule(data_dir=tmp_path).setup()
    assert "No space left on device" in str(err.value) and f"free about 0.2 MB in {tmp_path}" in str(err.value)  # 18 images of 3x64x64 bytes
    assert json.loads((cache / "manifest.json").read_text()) == manifest  # the old cache is left as it was
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_random_crop_flip_batch_crops_flipped_reflect_padded_images() -> None:
    torch.manual_seed(0)
    images = torch.rand(64, 2, 5, 6)
    out = random_crop_flip_batch(images, padding=2)
    assert out.shape == images.shape
    flipped = 0
    for image, crop in zip(images, out):
        matches = [
            flip
            for flip in (False, True)
            for top in range(5)
            for left in range(5)
            if torch.equal(torch.nn.functional.pad((image.flip(-1) if flip else image)[None], (2,) * 4, mode="reflect")[0, :, top : top + 5, left : left + 6], crop)
        ]
        assert matches, "an output is no crop of the padded (flipped) image"
        flipped += matches[0]
    assert 16 <= flipped <= 48  # about half flipped


def test_tinyimagenet_download_failure_and_success(tmp_path: Path, http_dir: tuple[Path, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiny_mod, "TINY_URL", _closed_port_url("tiny-imagenet-200.zip"))
    with pytest.raises(DataError) as err:
        TinyImageNetDataModule(data_dir=tmp_path / "a", download=True).setup()
    assert "downloading Tiny-ImageNet" in str(err.value) and "by hand" in str(err.value)

    served, base = http_dir
    src = make_fake_tiny(tmp_path / "src")
    archive = served / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(src.rglob("*")):
            zf.write(path, path.relative_to(src.parent))
    monkeypatch.setattr(tiny_mod, "TINY_URL", f"{base}/tiny-imagenet-200.zip")
    monkeypatch.setattr(tiny_mod, "TINY_MD5", _md5(archive))
    dm = TinyImageNetDataModule(data_dir=tmp_path / "b", download=True)
    dm.setup()
    assert len(dm.test_set) == 6 and (tmp_path / "b" / "tiny-imagenet-200" / "val" / RESTRUCTURED_MARKER).is_file()


# --------------------------------------------------------------------------- configs and options


@pytest.mark.parametrize("name, make", [("cifar10", make_fake_cifar), ("svhn", lambda d: make_fake_svhn(d / "svhn")), ("tinyimagenet", make_fake_tiny)])
def test_dataset_configs_build_their_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, make) -> None:
    _forbid_downloads(monkeypatch)
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert cfg.name == name and cfg.download is False
    make(tmp_path)
    dm = build("dataset", cfg, data_dir=str(tmp_path), seed=0)
    dm.setup()
    assert dm.info.name == name and dm.batch_size == cfg.batch_size and dm.val_fraction == cfg.val_fraction
    assert len(dm.info.class_names) == dm.info.num_classes


@pytest.mark.parametrize("cls", [CIFAR10DataModule, SVHNDataModule, TinyImageNetDataModule])
@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_val_fraction_out_of_range_is_a_config_error(tmp_path: Path, cls: type, fraction: float) -> None:
    with pytest.raises(ConfigError, match="val_fraction"):
        cls(data_dir=tmp_path, val_fraction=fraction)


# --------------------------------------------------------------------------- layouts at full scale


def test_layouts_write_all_at_the_real_sizes_and_class_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_downloads(monkeypatch)
    from robustness.data import fashion_mnist

    monkeypatch.setattr(fashion_mnist, "DEBIAN_FOLDER", tmp_path / "no-debian-package")
    with pytest.raises(ValueError, match=r"no layout named \['tiny'\]"):
        layouts.write_all(tmp_path, per_class=2, per_class_of={"tiny": 1})
    written = layouts.write_all(tmp_path, per_class=2, per_class_of={"tinyimagenet": 1})  # as the rehearsal writes them
    assert (written["tinyimagenet"] / "wnids.txt").read_text().split() == [w for w, _ in layouts.tiny_imagenet_classes()]
    expected = {"cifar10": (10, (3, 32, 32), 100), "svhn": (10, (3, 32, 32), 20), "tinyimagenet": (200, (3, 64, 64), 200), "fashion_mnist": (10, (1, 28, 28), 20),
                "imagefolder": (10, (3, 32, 32), 20), "arrays": (10, (3, 32, 32), 20)}
    assert set(written) == set(expected)
    where = {"imagefolder": {"root": str(written["imagefolder"])}, "arrays": {"path": str(written["arrays"])}}
    for name, (classes, shape, train_images) in expected.items():
        dm = build("dataset", {"name": name, "val_fraction": 0.5, **where.get(name, {})}, data_dir=str(tmp_path), seed=0)
        dm.setup()
        x, y = dm.split_tensors("train")
        assert dm.info.num_classes == classes and len(dm.info.class_names) == classes, name
        assert x.shape[1:] == shape and len(dm.train_set) + len(dm.val_set) == train_images, name
        assert sorted(set(y.tolist()) | set(dm.split_tensors("val")[1].tolist())) == list(range(classes)), name


@pytest.mark.parametrize("name", ["cifar10", "fashion_mnist"])
def test_layouts_images_carry_a_learnable_class_signal(tmp_path: Path, name: str) -> None:
    """A linear classifier trained for 100 steps on layouts' images beats chance (0.1) by far on the test split."""
    write = {"cifar10": layouts.write_cifar10, "fashion_mnist": layouts.write_fashion_mnist}[name]
    write(tmp_path, per_class=4 if name == "cifar10" else 20, seed=0, test_per_class=10)
    dm = build("dataset", {"name": name, "val_fraction": 0.1}, data_dir=str(tmp_path), seed=0)
    dm.setup()
    x, y = dm.split_tensors("train")
    xt, yt = dm.split_tensors("test")
    torch.manual_seed(0)
    model = torch.nn.Linear(x[0].numel(), 10)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(100):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x.flatten(1)), y).backward()
        optimiser.step()
    assert (model(xt.flatten(1)).argmax(1) == yt).float().mean().item() >= 0.9


# --------------------------------------------------------------------------- what the data is


@pytest.mark.parametrize("name", ["cifar10", "svhn", "tinyimagenet"])
def test_data_identity_tells_two_copies_of_one_layout_apart_by_content(tmp_path: Path, name: str) -> None:
    """Two folders under the same config (same class count, sizes, file names), other pixels: other
    identities. The same bytes elsewhere: the same identity."""
    write = {"cifar10": layouts.write_cifar10, "svhn": layouts.write_svhn,
             "tinyimagenet": lambda d, per_class, seed: layouts.write_tinyimagenet(d, per_class, seed=seed, num_classes=3)}[name]
    for seed in (0, 1):
        write(tmp_path / f"seed{seed}", per_class=2, seed=seed)
    shutil.copytree(tmp_path / "seed0", tmp_path / "copy", ignore=shutil.ignore_patterns("*.cache"))
    ident = {folder: build("dataset", {"name": name, "val_fraction": 0.5}, data_dir=str(tmp_path / folder), seed=0).data_identity()
             for folder in ("seed0", "seed1", "copy")}
    assert ident["seed0"] != ident["seed1"] and ident["seed0"] == ident["copy"]
    digests = ident["seed0"]["sha256"]
    assert all(len(d) == 64 for d in digests.values())
    if name == "cifar10":
        batch = tmp_path / "seed0" / "cifar-10-batches-py" / "data_batch_3"
        assert digests["data_batch_3"] == hashlib.sha256(batch.read_bytes()).hexdigest() and len(digests) == 7


def test_data_identity_of_the_embedded_digits_is_their_content() -> None:
    from sklearn.datasets import load_digits

    from robustness import fingerprint
    from robustness.data.colour_digits import ColourDigitsDataModule
    from robustness.data.digits import DigitsDataModule

    bunch = load_digits()
    expected = {"sha256": fingerprint.of_tensors(torch.as_tensor(bunch.images), torch.as_tensor(bunch.target))}
    assert DigitsDataModule().data_identity() == expected == ColourDigitsDataModule().data_identity()
