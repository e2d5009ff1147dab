"""The interface every training variant implements, and the plain (no-regularizer) one.

A regularizer owns the training loss of a step: it receives the model and a batch and
returns the loss, the clean logits (for accuracy) and scalars to log. This lets a variant
reuse the clean forward (CURE), replace the batch (PGD training) or change the target
(distillation) without the Lightning module knowing which one it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from robustness.registry import register

if TYPE_CHECKING:  # pragma: no cover
    import pytorch_lightning as pl

    from robustness.data.base import ImageDataModule
    from robustness.store import ModelStore


@dataclass
class StepOutput:
    loss: Tensor
    logits: Tensor | None = None  # logits on the clean batch, when the step computed them
    logs: dict[str, Tensor | float] = field(default_factory=dict)


@dataclass
class TrainContext:
    """What a regularizer may use while preparing itself (before ``fit``)."""

    model: nn.Module
    datamodule: "ImageDataModule"
    store: "ModelStore"
    device: torch.device
    config: Any = None  # the whole resolved run config
    cache_key: str | None = None  # the store entry that caches what the regularizer derives (default: its variant name)


class Regularizer:
    """Base class; the default is plain cross-entropy (variant ``base``)."""

    #: store variant that this training produces
    variant: str = "base"
    #: variant whose weights initialise the model (None: random initialisation)
    init_from: str | None = None

    def setup(self, ctx: TrainContext) -> None:
        """Prepare before training (load a teacher, build an adversarial set, ...)."""

    def train_dataset(self, clean: Dataset) -> Dataset:
        """The training set to fit on; the default keeps the clean one."""
        return clean

    def callbacks(self) -> list["pl.Callback"]:
        """Extra Lightning callbacks (early stopping on a target metric, ...)."""
        return []

    def training_loss(self, model: nn.Module, x: Tensor, y: Tensor, epoch: int) -> StepOutput:
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return StepOutput(loss=loss, logits=logits, logs={"ce": loss.detach()})

    def check_precision(self, precision: str | int) -> None:
        """Raise ConfigError if this regularizer cannot train at ``trainer.precision``; plain losses can at any."""

    def describe(self) -> dict[str, Any]:
        """Hyper-parameters recorded with the checkpoint."""
        return {"variant": self.variant, "init_from": self.init_from}


@register("regularizer", "none")
class NoRegularizer(Regularizer):
    """Plain cross-entropy training: the ``base`` variant."""

    def __init__(self, variant: str = "base", init_from: str | None = None) -> None:
        self.variant = variant
        self.init_from = init_from
