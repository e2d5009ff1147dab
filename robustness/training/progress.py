"""Training progress as log lines, so that a run without a terminal (a log file, a cluster job,
a CI machine) shows how far each training has got; Lightning's bar only redraws a terminal."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl

from robustness.progress import log


class LogProgress(pl.Callback):
    """Every ``every_s`` seconds of training: the epoch, the batch, the running loss and an
    estimate of the time left; at each epoch's end, its validation accuracy."""

    def __init__(self, every_s: float = 30.0) -> None:
        self.every_s = float(every_s)
        self._last = 0.0
        self._started = 0.0

    def _name(self, pl_module: pl.LightningModule) -> str:
        regularizer = getattr(pl_module, "regularizer", None)
        return str(getattr(regularizer, "variant", "") or "model")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = self._last = time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        per_epoch = trainer.num_training_batches
        total = per_epoch * trainer.max_epochs if isinstance(per_epoch, int) and trainer.max_epochs and trainer.max_epochs > 0 else None
        done = trainer.current_epoch * (per_epoch if isinstance(per_epoch, int) else 0) + batch_idx + 1
        loss = trainer.callback_metrics.get("train/loss_step")
        eta = f", about {(now - self._started) / done * (total - done):.0f} s left" if total and done < total else ""
        log.info("[train %s] epoch %d/%s, batch %d/%s, loss %s, %.0f s%s", self._name(pl_module), trainer.current_epoch + 1,
                 trainer.max_epochs, batch_idx + 1, per_epoch, "n/a" if loss is None else f"{float(loss):.4f}", now - self._started, eta)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        accuracy = trainer.callback_metrics.get("val/acc")
        log.info("[train %s] epoch %d/%s done in %.0f s so far, validation accuracy %s", self._name(pl_module), trainer.current_epoch + 1,
                 trainer.max_epochs, time.monotonic() - self._started, "n/a" if accuracy is None else f"{float(accuracy):.4f}")
