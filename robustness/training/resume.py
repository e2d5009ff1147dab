"""Resuming an interrupted training run exactly, the Lightning way.

- Lightning's own ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` into the store entry's
  ``resume/`` folder at every epoch end, and ``trainer.fit(ckpt_path=...)`` restores the model,
  optimiser, LR schedule and loop counters from it.
- :class:`AtomicCheckpointIO` makes every checkpoint write atomic (``io.atomic_torch_save``:
  temporary file, fsync, rename), so a run killed with SIGKILL mid-write leaves the previous
  epoch's checkpoint intact.
- :class:`RandomState` is a stateful callback: the global RNG states (torch, CUDA, numpy, python)
  at the epoch end go into the checkpoint and are put back at the start of the next epoch, so
  random attack starts, dropout and augmentation in the main process continue the sequence an
  uninterrupted run would have drawn. Shuffling is a function of (seed, epoch)
  (``EpochSeededSampler``), and the DataLoader draws its worker base seed from a generator of
  its own, so creating a batch iterator does not consume the global stream.

The entry's folder is named by the training identity, so a checkpoint there was written by a
run of exactly this config: there is nothing to compare before resuming.
(Not covered: random numbers drawn inside DataLoader worker processes.)
"""

from __future__ import annotations

import logging
import random
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins import TorchCheckpointIO

from robustness.io import atomic_torch_save

log = logging.getLogger("robustness")

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic writes and ``weights_only`` loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        # A full disk or a size limit gets our error (naming the folder), and the last checkpoint stays.
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # Everything the checkpoint holds is tensors, numbers, strings and containers of them.
        return torch.load(path, map_location=map_location if map_location is not None else "cpu", weights_only=True)


def rng_states() -> dict[str, Any]:
    """The global random states, as tensors and plain numbers (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


class RandomState(pl.Callback):
    """Carries the global RNG states through a checkpoint (see the module docstring)."""

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None
        self.interruption: BaseException | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict.get("rng")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._to_restore is not None:
            set_rng_states(self._to_restore)
            self._to_restore = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning turns a KeyboardInterrupt inside fit() into sys.exit(1); remember what it was.
        if isinstance(exception, (KeyboardInterrupt, SystemExit)):
            self.interruption = exception


def last_checkpoint(directory: Path) -> Path | None:
    """``last.ckpt`` in ``directory`` when it can be read safely; a damaged one is set aside."""
    path = directory / LAST
    if not path.is_file():
        return None
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - unreadable for any reason: start afresh
        log.warning("ignoring the resume checkpoint %s: it cannot be read safely (%s); training starts from scratch",
                    path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    return path


def discard_checkpoints(directory: Path) -> None:
    """Drop the resume folder once its run is complete."""
    for path in directory.glob("*.ckpt"):
        path.unlink(missing_ok=True)
    try:
        directory.rmdir()
    except OSError:
        pass


class Interrupted(KeyboardInterrupt):
    """A stop requested by a signal other than SIGINT (SIGTERM from a scheduler or ``kill``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"received signal {signum}")
        self.signum = signum


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (e.g. from a cluster scheduler) like Ctrl-C: stop cleanly, keep checkpoints."""

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
