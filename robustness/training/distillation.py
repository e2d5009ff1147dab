"""Defensive distillation (Papernot et al., 2016): variant ``distillation``.

A teacher of the same architecture is trained with its logits divided by a temperature T; the
student is then trained on the teacher's soft labels softmax(teacher_logits / T), with its own
logits also divided by T. The stored student is the plain logits network, i.e. it is used at
T = 1, where its softmax saturates: that saturation is what flattens input gradients.

The teacher is trained in :meth:`Distillation.setup` (``teacher_epochs`` epochs, the run's
optimiser settings, the student's initial weights) and cached in the store as tensors of the
variant ``distillation_teacher``, named by a hash of everything that determines it; a later run
with the same recipe loads it instead of training it again.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustness.errors import ConfigError, InputError
from robustness.io import atomic_write_json
from robustness import fingerprint
from robustness.tensors import accuracy
from robustness.training.adversarial import run_seed
from robustness.training.regularizer import Regularizer, StepOutput, TrainContext
from robustness.registry import register

log = logging.getLogger(__name__)

TEACHER_VARIANT = "distillation_teacher"


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Mean over the batch of ``-sum_k softmax(t / T)_k * log_softmax(s / T)_k``.

    No T**2 factor (Hinton et al. add one to keep gradient scales across T); Papernot's
    recipe trains on this loss as is.
    """
    if student_logits.shape != teacher_logits.shape:
        raise InputError(f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in shape")
    if not temperature > 0:
        raise InputError(f"the temperature must be > 0, got {temperature}", "set regularizer.temperature to a positive number")
    soft_labels = F.softmax(teacher_logits.detach() / temperature, dim=1)
    return -(soft_labels * F.log_softmax(student_logits / temperature, dim=1)).sum(1).mean()


class TemperatureCrossEntropy(Regularizer):
    """Cross-entropy on ``logits / T``: how the teacher is trained."""

    def __init__(self, temperature: float, variant: str = TEACHER_VARIANT, init_from: str | None = None) -> None:
        self.temperature = float(temperature)
        self.variant = variant
        self.init_from = init_from

    def training_loss(self, model: nn.Module, x: Tensor, y: Tensor, epoch: int) -> StepOutput:
        logits = model(x)
        loss = F.cross_entropy(logits / self.temperature, y)
        return StepOutput(loss=loss, logits=logits, logs={"ce_T": loss.detach()})


@register("regularizer", "distillation")
class Distillation(Regularizer):
    """The student of defensive distillation.

    temperature:    T for both the teacher's training and the student's soft labels
                    (Papernot et al. use 20-100)
    teacher_epochs: epochs the teacher is trained for when the store has none cached
    """

    variant = "distillation"
    init_from = None

    def __init__(
        self,
        variant: str = "distillation",
        init_from: str | None = None,
        temperature: float = 20.0,
        teacher_epochs: int = 10,
    ) -> None:
        self.variant = variant
        self.init_from = init_from
        if not float(temperature) > 0:
            raise ConfigError(f"regularizer.temperature must be > 0, got {temperature}", "e.g. regularizer.temperature=20")
        if int(teacher_epochs) < 1:
            raise ConfigError(f"regularizer.teacher_epochs must be >= 1, got {teacher_epochs}", "e.g. regularizer.teacher_epochs=10")
        self.temperature = float(temperature)
        self.teacher_epochs = int(teacher_epochs)
        self.teacher: nn.Module | None = None
        self.teacher_name: str | None = None
        self.teacher_from_cache = False
        self.teacher_val_acc = float("nan")

    def setup(self, ctx: TrainContext) -> None:
        dm = ctx.datamodule
        dm.setup("fit")
        ctx.model.to(ctx.device)
        optim = _optim_settings(ctx.config)
        recipe = {
            "what": "defensive distillation teacher",
            "temperature": self.temperature,
            "teacher_epochs": self.teacher_epochs,
            "optim": optim,
            "seed": run_seed(ctx),
            "dataset": dm.info.name,
            "train_fraction": getattr(dm, "train_fraction", 1.0),
            "batch_size": getattr(dm, "batch_size", None),
            "initial_weights": fingerprint.of_state(ctx.model),
        }
        self.teacher_name = f"teacher-{fingerprint.of_config(recipe)}"
        teacher = copy.deepcopy(ctx.model)
        cached = ctx.store.load_tensors(ctx.cache_key or TEACHER_VARIANT, self.teacher_name)
        if cached is not None:
            teacher.load_state_dict(cached)
            self.teacher_from_cache = True
            log.info("loaded the cached distillation teacher %s", self.teacher_name)
        else:
            self.teacher_from_cache = False
            train_teacher(teacher, dm, self.temperature, self.teacher_epochs, ctx.device, optim)
            ctx.store.save_tensors(ctx.cache_key or TEACHER_VARIANT, self.teacher_name, teacher.state_dict())
            atomic_write_json(ctx.store.tensors_path(ctx.cache_key or TEACHER_VARIANT, self.teacher_name).with_suffix(".json"), recipe)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.teacher = teacher
        x_val, y_val = dm.split_tensors("val", limit=2000)
        self.teacher_val_acc = accuracy(teacher, x_val, y_val)
        log.info("distillation teacher (T=%g): validation accuracy %.3f", self.temperature, self.teacher_val_acc)

    def training_loss(self, model: nn.Module, x: Tensor, y: Tensor, epoch: int) -> StepOutput:
        teacher = self.teacher
        if teacher is None:
            raise InputError("the distillation teacher is missing", "call setup(ctx) before training (the training stage does this)")
        if next(teacher.parameters()).device != x.device:
            teacher.to(x.device)
        with torch.no_grad():
            teacher_logits = teacher(x)
        logits = model(x)
        loss = soft_cross_entropy(logits, teacher_logits, self.temperature)
        agree = (logits.argmax(1) == teacher_logits.argmax(1)).float().mean().detach()
        return StepOutput(loss=loss, logits=logits, logs={"soft_ce": loss.detach(), "teacher_agreement": agree})

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "temperature": self.temperature,
            "teacher_epochs": self.teacher_epochs,
            "teacher": self.teacher_name,
            "teacher_val_acc": self.teacher_val_acc,
        }


def _optim_settings(config: Any) -> dict[str, Any]:
    keys = ("optimizer", "lr", "weight_decay", "gamma", "momentum")
    if config is None or "optim" not in config:
        return {}
    return {k: config["optim"][k] for k in keys if k in config["optim"]}


def train_teacher(
    model: nn.Module, datamodule: Any, temperature: float, epochs: int, device: torch.device, optim: dict[str, Any] | None = None
) -> nn.Module:
    """Fit ``model`` in place with cross-entropy on ``logits / temperature`` over the training set."""
    from robustness.training.module import ClassifierModule

    module = ClassifierModule(model, datamodule.info.num_classes, TemperatureCrossEntropy(temperature), **(optim or {}))
    trainer = pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
    return model
