"""Reliability (issue 9): interruption and exact resume, determinism, atomic artefacts,
unwritable outputs, W&B without network, errors raised inside DataLoader workers."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from helpers import compose, resume_checkpoints, run_outcome, stored_model
from robustness.errors import ConfigError, WriteError

# A short, fully specified digits run: about 10 optimiser steps per epoch, CPU, CSV logging.
SMALL_TRAIN = [
    "trainer=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=5",
    "dataset.train_fraction=0.3",
    "dataset.batch_size=32",
]


def _env() -> dict[str, str]:
    # One intra-op thread: the runs compared below then do their float reductions in the same order
    # however busy the machine is, and parallel subprocesses do not fight over cores.
    return {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _default_sigint() -> None:
    # Lightning ignores SIGINT in a process once it has handled a KeyboardInterrupt there, and an
    # ignored signal stays ignored in child processes: give the child Python's usual Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "robustness", *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_default_sigint)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"tensors differ after resuming: {different}"


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}:\n{proc.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


# --------------------------------------------------------------------------------------
# 1. interruption: SIGINT and SIGTERM keep the last epoch's checkpoint, the same command resumes,
#    and the final weights equal those of a run that was never interrupted


def test_interrupted_training_resumes_to_identical_weights(tmp_path: Path) -> None:
    overrides = [*SMALL_TRAIN, "trainer.max_epochs=6"]
    command = ["experiment=train", "logger=csv", *overrides, f"paths.output_dir={tmp_path / 'out'}", f"paths.data_dir={tmp_path / 'data'}"]
    store = tmp_path / "store"
    interrupted = [*command, f"paths.artifacts_dir={store}"]

    # Run 1: Ctrl-C once the first epoch's checkpoint exists.
    first = _cli(interrupted, cwd=tmp_path)
    _wait_for(lambda: bool(resume_checkpoints(store)), first, "the first epoch's checkpoint")
    (last,) = resume_checkpoints(store)
    entry = last.parent.parent
    first.send_signal(signal.SIGINT)
    out1 = first.communicate(timeout=240)[0]
    assert first.returncode == 130, out1[-3000:]
    assert "interrupted" in out1 and "run the same command again to resume" in out1
    assert last.is_file() and not (entry / "current").exists()
    assert "Traceback" not in out1

    # Run 2: the same command resumes; SIGTERM (a scheduler's stop) once it has saved a later epoch.
    saved = last.stat().st_ino
    epoch_before = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    second = _cli(interrupted, cwd=tmp_path)
    _wait_for(lambda: last.is_file() and last.stat().st_ino != saved, second, "a checkpoint of a later epoch")
    second.send_signal(signal.SIGTERM)
    out2 = second.communicate(timeout=240)[0]
    assert second.returncode == 143, out2[-3000:]
    assert "resuming 'base' from" in out2
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] > epoch_before
    assert not (entry / "current").exists()

    # Run 3: resumes again and completes.
    third = _cli(interrupted, cwd=tmp_path)
    out3 = third.communicate(timeout=300)[0]
    assert third.returncode == 0, out3[-3000:]
    assert "resuming 'base' from" in out3
    assert not (entry / "resume").exists()  # dropped once the run is complete

    # The uninterrupted run (in this process: same code, same config, one thread like the CLI runs).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_outcome("train", overrides, tmp_path, artifacts_dir=tmp_path / "reference")
    finally:
        torch.set_num_threads(threads)
    ref_variant = stored_model(tmp_path / "reference", "base")
    variant = stored_model(store, "base")
    _assert_same_weights(ref_variant / "model.pt", variant / "model.pt")
    ref_metrics = json.loads((ref_variant / "metrics.json").read_text())
    metrics = json.loads((variant / "metrics.json").read_text())
    assert metrics["test/acc"] == ref_metrics["test/acc"] and metrics["epochs"] == ref_metrics["epochs"] == 6


class _NoisyModule(pl.LightningModule):
    """A tiny classifier whose steps draw from the torch, numpy and python RNGs (like augmentation
    or random attack starts); records one draw of each per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(6, 3)
        self.draws: list[tuple[float, float, float]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        if batch_idx == 0:
            self.draws.append((torch.rand(()).item(), float(np.random.rand()), random.random()))
        x = x + 0.1 * torch.randn_like(x) + 0.01 * float(np.random.rand()) + 0.01 * random.random()
        return F.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.05)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.7), "interval": "epoch"}}


class _StopAt(pl.Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise KeyboardInterrupt


def _fit_noisy(directory: Path, stop_at: int | None = None, resume: bool = False):
    from pytorch_lightning.callbacks import ModelCheckpoint

    from robustness.data.base import EpochSeededSampler
    from robustness.training.resume import AtomicCheckpointIO, RandomState, last_checkpoint

    pl.seed_everything(7, verbose=False)
    module = _NoisyModule()
    data = torch.utils.data.TensorDataset(torch.randn(48, 6), torch.randint(0, 3, (48,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8, sampler=EpochSeededSampler(48, 7), generator=torch.Generator().manual_seed(7))
    checkpoint = ModelCheckpoint(dirpath=directory, filename="last", save_top_k=1, save_last=False, every_n_epochs=1,
                                 save_on_train_epoch_end=True, enable_version_counter=False)
    trainer = pl.Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_progress_bar=False, plugins=[AtomicCheckpointIO()],
                         enable_model_summary=False, callbacks=[checkpoint, RandomState(), *([_StopAt(stop_at)] if stop_at is not None else [])])
    ckpt = last_checkpoint(directory) if resume else None
    assert (ckpt is not None) == resume
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt, weights_only=True)
    return module, trainer


def test_resume_restores_random_streams_optimiser_and_schedule(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Unit level: a fit stopped after epoch 2 and resumed from Lightning's last.ckpt draws the same
    random numbers, reaches the same learning rate and ends with the same weights as one never stopped."""
    from robustness.training.resume import discard_checkpoints, last_checkpoint

    whole, whole_trainer = _fit_noisy(tmp_path / "whole")
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's answer to a KeyboardInterrupt inside fit()
            _fit_noisy(tmp_path / "split", stop_at=2)
    finally:
        signal.signal(signal.SIGINT, sigint)  # Lightning left Ctrl-C ignored in this process
    resumed, resumed_trainer = _fit_noisy(tmp_path / "split", resume=True)
    assert resumed.draws == whole.draws[2:]  # epochs 2 and 3 drew exactly what the uninterrupted run drew
    assert resumed_trainer.optimizers[0].param_groups[0]["lr"] == whole_trainer.optimizers[0].param_groups[0]["lr"]
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name

    # A damaged checkpoint is not resumed from; a completed run removes its own.
    last = tmp_path / "split" / "last.ckpt"
    assert last_checkpoint(last.parent) == last
    with caplog.at_level(logging.WARNING, logger="robustness"):
        last.write_bytes(last.read_bytes()[:300])
        assert last_checkpoint(last.parent) is None
        assert "cannot be read safely" in caplog.text
    discard_checkpoints(last.parent)
    assert not last.parent.exists()


# --------------------------------------------------------------------------------------
# 2. determinism: same config and seed, same numbers (CPU)


def test_training_twice_gives_identical_metrics_and_weights(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Also: a damaged resume checkpoint in the entry is ignored, not resumed from."""
    from robustness.stages import variants

    overrides = [*SMALL_TRAIN, "trainer.max_epochs=2"]
    first = run_outcome("train", overrides, tmp_path / "a", artifacts_dir=tmp_path / "a" / "store")
    key = variants.of_training_config(compose("train", overrides)).key
    assert first.metrics["fingerprint"] == key
    damaged = tmp_path / "b" / "store" / "digits" / "smallcnn" / "entries" / key / "resume" / "last.ckpt"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="robustness"):
        second = run_outcome("train", overrides, tmp_path / "b", artifacts_dir=tmp_path / "b" / "store")
    assert "cannot be read safely" in caplog.text
    assert first.metrics == second.metrics and first.metrics["epochs"] == 2
    _assert_same_weights(stored_model(tmp_path / "a" / "store", "base") / "model.pt", stored_model(tmp_path / "b" / "store", "base") / "model.pt")
    assert not damaged.parent.exists()


def test_probe_twice_gives_identical_tables(tmp_path: Path) -> None:
    # Table 1 (random Gaussian probes for ||H||_F^2, DeepFool for the distance) on the shared base model;
    # ++recompute=true: the second run must compute again, not reuse the first run's cached result.
    overrides = ["variants=[base]", "probe.num_images=4", "probe.num_samples=4", "probe.chunk_size=4",
                 "attack.num_candidates=4", "trainer=cpu", "++recompute=true"]
    from robustness.probes.base import ProbeResult

    results, csvs = [], []
    for name in ("a", "b"):
        out = run_outcome("table1_curvature", overrides, tmp_path / name).output_dir
        results.append(ProbeResult.load(out / "results" / "table1"))
        csvs.append((out / "table1_curvature.csv").read_text(encoding="utf-8"))
    a, b = results
    assert a.tables == b.tables and a.tables
    assert csvs[0] == csvs[1]
    assert a.arrays.keys() == b.arrays.keys() and a.arrays
    for key in a.arrays:
        assert torch.equal(a.arrays[key], b.arrays[key]), key


# --------------------------------------------------------------------------------------
# 3. nothing half-written: atomic store writes


def _digits_models():
    from robustness.data.digits import DigitsDataModule
    from robustness.registry import build

    cfg = compose("train", ["logger=csv"])
    info = DigitsDataModule.info
    torch.manual_seed(1)
    a = build("model", cfg.model, info=info)
    torch.manual_seed(2)
    b = build("model", cfg.model, info=info)
    return cfg, info, a, b


@pytest.mark.parametrize(("failure", "raised"), [(OSError(28, "No space left on device"), WriteError), (KeyboardInterrupt(), KeyboardInterrupt)],
                         ids=["disk-full", "ctrl-c"])
def test_failed_save_leaves_the_previous_model_and_no_temporary_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException,
                                                                      raised: type) -> None:
    from robustness import io as robustness_io
    from robustness.registry import build
    from robustness.store import ModelStore

    cfg, info, old, new = _digits_models()
    store = ModelStore(tmp_path, "digits", "smallcnn")
    store.save("base", old, info, {"name": "smallcnn"})
    real_write = robustness_io._write_all

    def dies_half_way(tmp: Path, data: bytes) -> None:  # the disk fills up (or Ctrl-C arrives) mid-write
        real_write(tmp, bytes(data)[: len(data) // 2])
        raise failure

    monkeypatch.setattr(robustness_io, "_write_all", dies_half_way)
    with pytest.raises(raised):
        store.save("base", new, info, {"name": "smallcnn"})
    monkeypatch.undo()

    entry = store.entry_dir("base")
    assert sorted(p.name for p in entry.rglob("*.tmp")) == []
    assert [p.name for p in entry.iterdir() if p.name.startswith("v-")] == [store.version_dir("base").name]
    assert store.has("base")
    loaded = store.load_into("base", build("model", cfg.model, info=info), info, {"name": "smallcnn"})
    for (name, a), (_, b) in zip(old.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_reader_never_sees_a_half_written_model(tmp_path: Path) -> None:
    import threading

    from robustness.registry import build
    from robustness.store import ModelStore

    cfg, info, a, b = _digits_models()
    store = ModelStore(tmp_path, "digits", "smallcnn")
    store.save("base", a, info, {"name": "smallcnn"})
    versions = [a.state_dict(), b.state_dict()]
    done = threading.Event()

    def writer() -> None:
        for i in range(40):
            store.save("base", (b, a)[i % 2], info, {"name": "smallcnn"})
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    reads = 0
    try:
        while not done.is_set() or reads < 5:
            state = store.load_into("base", build("model", cfg.model, info=info), info, {"name": "smallcnn"}).state_dict()
            assert any(all(torch.equal(state[k], v[k]) for k in state) for v in versions)
            reads += 1
    finally:
        thread.join()
    assert reads >= 5


# --------------------------------------------------------------------------------------
# 4. an output directory that cannot be written


def test_unwritable_output_directory_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for args in (["experiment=train", f"paths.output_dir={blocker / 'out'}"],
                 ["-m", "experiment=train", "optim.lr=1e-3,1e-2", f"hydra.sweep.dir={blocker / 'sweep'}"]):
        out = subprocess.run([sys.executable, "-m", "robustness", *args], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
        assert out.returncode == 2, out.stderr[-2000:]
        assert out.stderr.startswith("error: cannot write to the output directory ")
        assert f"({blocker} is a file, not a folder)" in out.stderr
        assert "fix: choose a writable place with paths.output_dir=..." in out.stderr
        assert "Traceback" not in out.stderr

    # Called from Python (report sections, tests) the pipeline checks too.
    from robustness.stages import run

    cfg = compose("train", ["logger=csv"])
    with pytest.raises(ConfigError, match=r"cannot write to the output directory .*a-file/sub") as err:
        run(cfg, blocker / "sub")
    assert "paths.output_dir" in err.value.hint


# --------------------------------------------------------------------------------------
# 5. W&B never blocks


def test_wandb_online_without_network_falls_back_to_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A syntactically valid key, so that wandb really tries to reach its server (there is no
    # network route here; where there is one, the key is refused): either way, online init fails.
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-home"))
    timeout = 5
    started = time.time()
    with pytest.warns(UserWarning, match=r"(?s)W&B online init failed .*logging offline instead"):
        outcome = run_outcome("train", [*SMALL_TRAIN, "trainer.max_epochs=1", "logger.mode=online", f"logger.init_timeout={timeout}"],
                              tmp_path, artifacts_dir=tmp_path / "store", logger="wandb")
    assert outcome.metrics["test/acc"] > 0.2
    (run_dir,) = (outcome.output_dir / "wandb").glob("offline-run-*")
    assert list(run_dir.glob("*.wandb"))
    # The offline run started within a bounded time (wandb's own default wait is 90 s); its
    # folder is named after its start time, offline-run-YYYYMMDD_HHMMSS-<id>.
    stamp = run_dir.name.split("-")[2]
    fallback_at = datetime.strptime(stamp, "%Y%m%d_%H%M%S").timestamp() - started
    assert fallback_at < timeout + 45, f"the offline run started {fallback_at:.0f} s after the run began"


# --------------------------------------------------------------------------------------
# 6. an error raised inside a DataLoader worker reaches the user as our message


def test_data_error_in_a_dataloader_worker_prints_only_our_message(tmp_path: Path) -> None:
    from helpers import make_fake_tiny

    root = make_fake_tiny(tmp_path / "data")
    broken = sorted((root / "train").glob("*/images/*.JPEG"))[5]
    broken.write_bytes(b"this is not a JPEG " * 20)
    out = subprocess.run(
        [sys.executable, "-m", "robustness", "experiment=train", "recipe=tinyimagenet", "model=smallcnn", "trainer=cpu", "logger=csv",
         "trainer.enable_progress_bar=false", "trainer.max_epochs=1", "dataset.num_workers=2", "dataset.batch_size=4",
         "dataset.eval_batch_size=4", f"paths.data_dir={tmp_path / 'data'}", f"paths.artifacts_dir={tmp_path / 'store'}",
         f"paths.output_dir={tmp_path / 'out'}"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    error = out.stderr[out.stderr.index("error: "):]
    assert error.startswith(f"error: cannot read image {broken}: UnidentifiedImageError")
    assert error.rstrip().endswith("fix: replace it with the file from the official archive, or delete it")
    assert "DataLoader worker" not in error and "Traceback" not in error
