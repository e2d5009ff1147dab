"""Resource faults while saving (issue 32): a full disk, the file-size limit, a mount turned
read-only mid-run. Each gets our error naming the folder and what ran out; the live model stays
live, and no half-written version or temporary file is left for a later run to pick up.

The file-size limit is real (``RLIMIT_FSIZE`` in the child; Python ignores SIGXFSZ, so the write
fails with EFBIG), and so is the lost permission (mode bits changed mid-run, with root's override
dropped from the child where the tests run as root). The full disk is a real tmpfs where this
process may mount one (root in a container), skipped elsewhere. A read-only remount cannot be
made while the run holds files open for writing (the kernel refuses it as busy), so EROFS, like
EDQUOT and EIO, is checked by the in-process test of every refusal below.
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import cli_in_process

from robustness import io as robustness_io
from robustness.data.digits import DigitsDataModule
from robustness.errors import WriteError
from robustness.models.smallcnn import smallcnn
from robustness.store import ModelStore

INFO = DigitsDataModule.info
SMALLCNN = {"name": "smallcnn", "width": 32, "activation": "relu", "batch_norm": True}
TRAIN = ["experiment=train", "trainer=cpu", "logger=csv", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
         "dataset.train_fraction=0.3"]
# The stored model.pt of a width-32 smallcnn is ~388 KB and its training checkpoint ~1.2 MB; logs stay far below this.
LIMIT_BYTES = 300 * 1024


def _cli(args: list[str], cwd: Path, limit: int | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}

    def limited() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # as Python itself does: the write fails with EFBIG

    return subprocess.run([sys.executable, "-m", "robustness", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limited)


def _entry(store: Path) -> Path:
    (entry,) = store.glob("digits/smallcnn/entries/*")
    return entry


def _assert_only_the_old_version(store: Path, old: str) -> None:
    entry = _entry(store)
    assert (entry / "current").read_text().strip() == old
    assert sorted(p.name for p in entry.iterdir() if p.name.startswith("v-")) == [old], "no half-written version is left"
    assert not [p for p in store.rglob("*.tmp")], "no temporary file is left"
    ModelStore(store, "digits", "smallcnn").load_into(entry.name, smallcnn(INFO, width=32), INFO, SMALLCNN)  # the old one loads


def _our_error(out: subprocess.CompletedProcess, what: str, folder: Path) -> None:
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "inline_container" not in out.stderr, out.stderr[-3000:]
    error = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and what in error[0] and str(folder) in error[0], out.stderr[-3000:]


def _train_in_this_process(args: list[str], cwd: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A run with no fault, which only sets the stage: in this process, sparing an interpreter's imports."""
    with monkeypatch.context() as scoped:
        scoped.chdir(cwd)
        code, stderr = cli_in_process(args, capsys, scoped)
    assert code == 0, stderr[-3000:]


def _retrain() -> str:
    return "++retrain=true"  # ++: add the key, or set it where the config has it


# ---------------------------------------------------------------------------------------------
# the file-size limit (always available)


def test_a_file_size_limit_at_the_stores_save_is_our_error_and_the_old_model_stays_live(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    args = [*TRAIN, f"paths.artifacts_dir={store}", "callbacks.model_checkpoint=null"]
    _train_in_this_process(args, tmp_path, capsys, monkeypatch)
    old = (_entry(store) / "current").read_text().strip()
    out = _cli([*args, _retrain()], tmp_path, limit=LIMIT_BYTES)
    _our_error(out, "the file-size limit", _entry(store))
    assert "EFBIG" in out.stderr and "fix: raise the limit" in out.stderr
    _assert_only_the_old_version(store, old)


def test_a_file_size_limit_at_a_training_checkpoint_is_our_error_and_the_run_resumes_later(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    args = [*TRAIN, f"paths.artifacts_dir={store}"]
    out = _cli(args, tmp_path, limit=LIMIT_BYTES)
    _our_error(out, "the file-size limit", _entry(store) / "resume")
    assert not (_entry(store) / "current").exists() and not list(store.rglob("*.tmp"))
    _train_in_this_process(args, tmp_path, capsys, monkeypatch)  # with the limit lifted, the same command completes
    assert (_entry(store) / "current").is_file()


# ---------------------------------------------------------------------------------------------
# a full disk and a mount turned read-only: real tmpfs mounts where allowed


@pytest.fixture
def tmpfs(tmp_path: Path):
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"this process may not mount a tmpfs ({done.stderr.strip()}); the errno mapping is covered in-process")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_a_full_disk_at_the_stores_save_is_our_error_and_the_old_model_stays_live(tmp_path: Path, tmpfs, capsys: pytest.CaptureFixture[str],
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmpfs("600k")  # room for one model.pt (~388 KB), not two
    args = [*TRAIN, f"paths.artifacts_dir={store}", "callbacks.model_checkpoint=null"]
    _train_in_this_process(args, tmp_path, capsys, monkeypatch)
    old = (_entry(store) / "current").read_text().strip()
    out = _cli([*args, _retrain()], tmp_path)
    _our_error(out, "the file system is full", _entry(store))
    assert "ENOSPC" in out.stderr
    _assert_only_the_old_version(store, old)


def test_the_issues_one_megabyte_store_is_our_error_at_the_first_checkpoint(tmp_path: Path, tmpfs) -> None:
    store = tmpfs("1m")
    out = _cli([*TRAIN, f"paths.artifacts_dir={store}"], tmp_path)
    _our_error(out, "the file system is full", _entry(store) / "resume")
    assert not list(store.rglob("*.tmp"))


def _without_root_override() -> list[str]:
    """A prefix that runs a command without root's permission to write anywhere (so that mode bits
    bind it), or nothing when this process is not root."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: permission bits cannot bind the child")
    caps = "-dac_override,-dac_read_search,-fowner"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--"]


def test_write_permission_lost_mid_run_is_our_error_and_the_run_resumes_once_restored(tmp_path: Path) -> None:
    store = tmp_path / "store"
    args = [*TRAIN, "trainer.max_epochs=4", f"paths.artifacts_dir={store}"]
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.Popen([*_without_root_override(), sys.executable, "-m", "robustness", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not list(store.glob("digits/smallcnn/entries/*/resume/last.ckpt")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    resume = _entry(store) / "resume"
    resume.chmod(0o555)  # the next epoch's checkpoint cannot be written
    try:
        stderr = proc.communicate(timeout=240)[1]
    finally:
        resume.chmod(0o755)
    _our_error(subprocess.CompletedProcess(args, proc.returncode, "", stderr), "permission to write there was denied", resume)
    assert "EACCES" in stderr
    torch.load(resume / "last.ckpt", weights_only=True)  # the last completed epoch's checkpoint is whole
    resumed = _cli(args, tmp_path)  # the same command, once the folder is writable again
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming 'base' from" in resumed.stdout + resumed.stderr


# ---------------------------------------------------------------------------------------------
# every refusal the operating system can give, in-process


@pytest.mark.parametrize(("code", "what"), [
    (errno.ENOSPC, "the file system is full"), (errno.EDQUOT, "disk quota"), (errno.EFBIG, "the file-size limit"),
    (errno.EACCES, "permission to write there was denied"), (errno.EROFS, "mounted read-only"), (errno.EIO, "input/output error"),
])
def test_each_refused_write_names_the_folder_and_the_reason_and_keeps_the_live_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                                    code: int, what: str) -> None:
    store = ModelStore(tmp_path / "store", "digits", "smallcnn")
    old = smallcnn(INFO, width=32)
    first = store.save("k", old, INFO, SMALLCNN)
    write = robustness_io._write_all

    def refuse_the_model(tmp: Path, data: bytes) -> None:
        if ".model.pt." in tmp.name:
            write(tmp, data[: len(data) // 2])  # half of it reached the disk
            raise OSError(code, os.strerror(code))
        write(tmp, data)

    monkeypatch.setattr(robustness_io, "_write_all", refuse_the_model)
    torch.manual_seed(1)
    with pytest.raises(WriteError) as caught:
        store.save("k", smallcnn(INFO, width=32), INFO, SMALLCNN)
    assert what in caught.value.message and str(store.entry_dir("k")) in caught.value.message
    assert errno.errorcode[code] in caught.value.message
    _assert_only_the_old_version(tmp_path / "store", first.name)
    loaded = store.load_into("k", smallcnn(INFO, width=32), INFO, SMALLCNN)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), old.state_dict().values()))


def test_an_unexpected_failure_is_not_dressed_as_a_resource_fault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(tmp: Path, data: bytes) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(robustness_io, "_write_all", broken)
    with pytest.raises(OSError) as caught:
        robustness_io.atomic_write_text(tmp_path / "x.txt", "x")
    assert not isinstance(caught.value, WriteError) and caught.value.errno == errno.EINVAL
    assert not list(tmp_path.iterdir())
