"""The Lightning module shared by every training variant."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from robustness.errors import ConfigError, TrainingError
from robustness.training.regularizer import Regularizer


class ClassifierModule(pl.LightningModule):
    """Cross-entropy classification with AdamW + ExponentialLR and a pluggable regularizer.

    A step whose loss is not finite never updates the weights: it is skipped and counted
    (``train/skipped_steps``); ``max_bad_steps`` consecutive ones stop the run with an error.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        regularizer: Regularizer | None = None,
        lr: float = 1e-2,
        weight_decay: float = 5e-4,
        gamma: float = 0.7,
        optimizer: str = "adamw",
        momentum: float = 0.9,
        max_bad_steps: int = 20,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ConfigError(f"the learning rate must be > 0, got {lr}", "set optim.lr to a positive number, e.g. optim.lr=1e-3")
        if weight_decay < 0:
            raise ConfigError(f"weight decay must be >= 0, got {weight_decay}", "set optim.weight_decay=0 or a positive number")
        if not 0 < gamma <= 1:
            raise ConfigError(f"the ExponentialLR gamma must lie in (0, 1], got {gamma}", "set optim.gamma, e.g. optim.gamma=0.7")
        if optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"unknown optimizer '{optimizer}'", "choose optim.optimizer=adamw or optim.optimizer=sgd")
        self.model = model
        self.regularizer = regularizer or Regularizer()
        self.lr, self.weight_decay, self.gamma = lr, weight_decay, gamma
        self.optimizer_name, self.momentum = optimizer, momentum
        self.max_bad_steps = max_bad_steps
        self.consecutive_bad_steps = 0
        self.skipped_steps = 0
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    @property
    def _normalisation_buffers(self) -> list[Tensor]:
        return [
            buffer
            for module in self.model.modules()
            if isinstance(module, nn.modules.batchnorm._NormBase)
            for buffer in module.buffers(recurse=False)
        ]

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        x, y = batch
        # The forward of a bad batch already moved the normalisation statistics; a skipped step
        # must leave the model exactly as it was, so keep a copy to put back.
        statistics = [b.detach().clone() for b in self._normalisation_buffers]
        out = self.regularizer.training_loss(self.model, x, y, self.current_epoch)
        finite = bool(torch.isfinite(out.loss))
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            # Every rank skips, or none: a rank that skipped alone would leave the others waiting in backward.
            finite = not trainer.strategy.reduce_boolean_decision(not finite, all=False)
        if not finite:
            with torch.no_grad():
                for buffer, saved in zip(self._normalisation_buffers, statistics):
                    buffer.copy_(saved)
            self.consecutive_bad_steps += 1
            self.skipped_steps += 1
            self.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)
            if self.consecutive_bad_steps >= self.max_bad_steps:
                raise TrainingError(
                    f"{self.consecutive_bad_steps} consecutive training steps had a non-finite loss (last: {float(out.loss)})",
                    "lower optim.lr or the regularizer weight (e.g. regularizer.lam), or raise trainer.max_bad_steps",
                )
            return None  # Lightning skips backward and the optimiser step
        self.consecutive_bad_steps = 0
        # sync_dist: under DDP an epoch's mean is over every rank's batches (a no-op in one process).
        self.log("train/loss", out.loss.detach(), on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        for key, value in out.logs.items():
            self.log(f"train/{key}", value, on_step=True, on_epoch=True, sync_dist=True)
        if out.logits is not None:
            self.train_acc(out.logits.detach(), y[: len(out.logits)])
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return out.loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self.model(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), on_epoch=True, prog_bar=stage == "val", sync_dist=True)
        metric(logits, y)
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._agree_on_stopping()

    def on_train_epoch_end(self) -> None:
        self._agree_on_stopping()

    def _agree_on_stopping(self) -> None:
        """Under DDP, stop every rank when a callback stopped one (Lightning reduces only its own
        early stopping): a callback measuring on a rank's own batch-norm statistics can decide
        differently on each, and a rank that leaves the loop alone leaves the others waiting."""
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            trainer.should_stop = trainer.strategy.reduce_boolean_decision(bool(trainer.should_stop), all=False)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.optimizer_name == "sgd":
            optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=self.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["robustness_skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_steps = int(checkpoint.get("robustness_skipped_steps", 0))
