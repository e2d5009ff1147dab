"""Adversarial training: the report's fine-tuning on a fixed adversarial set, and Madry-style PGD.

``AdversarialFinetune`` (variant ``adversarial``, report section 2.1.1) starts from ``base``,
attacks ``per_class`` correctly classified training images per class with the runner-up attack
once, caches that set in the store and fine-tunes on a mix of it and clean images until the
model's accuracy on the set reaches ``target_accuracy``.

``PGDTraining`` (variant ``pgd``) replaces all or part of every batch by PGD examples against
the current weights.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset, Subset

from robustness.data.base import TensorImageDataset
from robustness import fingerprint
from robustness.errors import ConfigError, TrainingError
from robustness.io import atomic_write_json
from robustness.tensors import FoldedTwin, accuracy, eval_mode, model_device, predict
from robustness.registry import build
from robustness.training.regularizer import Regularizer, StepOutput, TrainContext
from robustness.registry import register

log = logging.getLogger(__name__)


@contextmanager
def without_augmentation(dataset: Dataset) -> Iterator[Dataset]:
    """Source images for the adversarial set are the stored images, not random crops or flips of them."""
    inner = dataset
    while isinstance(inner, Subset):
        inner = inner.dataset
    augment = getattr(inner, "augment", False)
    if augment:
        inner.augment = False  # type: ignore[attr-defined]
    try:
        yield dataset
    finally:
        if augment:
            inner.augment = augment  # type: ignore[attr-defined]


def _check_fraction(name: str, value: float, hint: str) -> float:
    if not 0.0 < float(value) <= 1.0:
        raise ConfigError(f"regularizer.{name} must lie in (0, 1], got {value}", hint)
    return float(value)


def _attack_config(attack: Mapping[str, Any] | None, default: Mapping[str, Any]) -> dict[str, Any]:
    cfg = dict(default) if attack is None else dict(attack)
    if "name" not in cfg:
        raise ConfigError("the regularizer's attack config has no 'name'", f"add regularizer.attack.name, e.g. {default['name']}")
    return cfg


def run_seed(ctx: TrainContext) -> int:
    config = ctx.config
    if config is not None and "seed" in config:
        return int(config["seed"])
    return int(getattr(ctx.datamodule, "seed", 0))


class AdversarialSetStop(pl.Callback):
    """Measures accuracy on the fixed adversarial set and stops training once it reaches ``target``.

    It measures after every training epoch and, with ``every_n_steps`` > 0, also after every
    n-th optimiser step, so that a set learnt within one epoch stops near the target instead of
    far past it. ``history`` holds ``(global_step, accuracy)`` per measurement. At each epoch end
    the latest value is logged as ``adv_set/acc`` (and the initial model's as ``adv_set/initial_acc``).
    """

    def __init__(self, x: Tensor, y: Tensor, target: float, every_n_steps: int = 0, initial: float = float("nan"), batch_size: int = 1024) -> None:
        self.x, self.y = x, y
        self.target = float(target)
        self.every_n_steps = int(every_n_steps)
        self.initial = float(initial)
        self.batch_size = batch_size
        self.history: list[tuple[int, float]] = []

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.history and self.history[-1][0] == trainer.global_step:
            return  # no optimiser step since the last measurement (e.g. a skipped non-finite step)
        if self.x.device != pl_module.device:  # one copy on the training device, not one per measurement
            self.x, self.y = self.x.to(pl_module.device), self.y.to(pl_module.device)
        acc = accuracy(pl_module.model, self.x, self.y, self.batch_size)
        self.history.append((trainer.global_step, acc))
        if acc >= self.target and not trainer.should_stop:
            log.info("accuracy on the adversarial set reached %.3f >= target %.3f at step %d: stopping", acc, self.target, trainer.global_step)
            trainer.should_stop = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0 and not trainer.should_stop:
            self._measure(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._measure(trainer, pl_module)
        pl_module.log("adv_set/acc", self.history[-1][1], on_step=False, on_epoch=True, prog_bar=True)
        pl_module.log("adv_set/initial_acc", self.initial, on_step=False, on_epoch=True)


class EvalView:
    """The model as an inner search (an attack inside a training step) sees it.

    ``with view(model, x) as target:`` yields the model in evaluation mode, so the search's
    forwards neither use nor update the batch-norm running statistics, with the weights'
    ``requires_grad`` off, so it leaves no parameter gradients behind (gradient accumulation stays
    correct), and with gradients on: the model's folded twin (``tensors.FoldedTwin``: the same
    function with batch norms folded, 1.6x faster per attack step on the digits CNN) where it
    has one, else the model itself, whose modes and flags are restored on the way out.
    """

    def __init__(self) -> None:
        self._twin: FoldedTwin | None = None

    @contextmanager
    def __call__(self, model: nn.Module, example: Tensor) -> Iterator[nn.Module]:
        if self._twin is None or self._twin.model is not model:
            self._twin = FoldedTwin(model)
        twin = self._twin(example)
        if twin is not None:
            with torch.enable_grad():
                yield twin
            return
        params = list(model.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            with eval_mode(model), torch.enable_grad():
                yield model
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)


def sign_ascent(objective: Callable[[Tensor], Tensor], x: Tensor, start: Tensor, eps: float, step_size: float, steps: int) -> Tensor:
    """Projected sign-gradient ascent of ``objective`` in the l-inf ball of radius ``eps`` around
    ``x``, intersected with the pixel box [0, 1]: PGD's iteration for an objective other than the
    cross-entropy (TRADES' KL divergence, LLR's local linearity).

    ``objective(x_adv)`` returns one value per example; each step ascends their sum, so an
    example's step depends on its own value alone when the objective treats examples
    independently. ``start`` is the first iterate as given (TRADES starts just off ``x``, and
    does not project its start). Returns the last iterate, detached.
    """
    x0 = x.detach()
    x_adv = start.detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(x_adv).sum(), x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x0 - eps), x0 + eps).clamp_(0.0, 1.0)
    return x_adv.detach()


@register("regularizer", "adversarial_finetune")
class AdversarialFinetune(Regularizer):
    """Fine-tune ``base`` on a fixed runner-up adversarial set mixed with clean images.

    per_class:         correctly classified training images attacked per class
    adv_fraction:      share of adversarial samples in the fine-tuning set; the clean part is a
                       fixed, seeded subset of the training set of the matching size
    target_accuracy:   stop once accuracy on the adversarial set reaches this (the report: 0.3)
    eval_every_n_steps: also measure that accuracy every n optimiser steps (0: after each epoch only)
    attack:            the attack config that builds the set (``runner_up`` in the report)
    attack_batch_size: images attacked at once

    The set's labels are the true labels of its source images. It is cached in the store under
    this variant, named by a hash of everything that determines it (attack, per_class, seed,
    dataset and the exact base weights), with that description beside it as JSON.
    """

    variant = "adversarial"
    init_from = "base"
    DEFAULT_ATTACK = {"name": "runner_up", "step_size": 0.02, "max_steps": 500, "norm": "l2"}

    def __init__(
        self,
        variant: str = "adversarial",
        init_from: str | None = "base",
        per_class: int = 50,
        adv_fraction: float = 0.5,
        target_accuracy: float = 0.3,
        attack: Mapping[str, Any] | None = None,
        attack_batch_size: int = 256,
        eval_every_n_steps: int = 0,
    ) -> None:
        self.variant = variant
        self.init_from = init_from
        if int(eval_every_n_steps) < 0:
            raise ConfigError(f"regularizer.eval_every_n_steps must be >= 0, got {eval_every_n_steps}", "0 measures after each epoch only")
        if int(per_class) < 1:
            raise ConfigError(f"regularizer.per_class must be >= 1, got {per_class}", "e.g. regularizer.per_class=50 (the report's value)")
        if int(attack_batch_size) < 1:
            raise ConfigError(f"regularizer.attack_batch_size must be >= 1, got {attack_batch_size}", "e.g. regularizer.attack_batch_size=256")
        self.per_class = int(per_class)
        self.adv_fraction = _check_fraction("adv_fraction", adv_fraction, "e.g. regularizer.adv_fraction=0.5 for half adversarial, half clean")
        self.target_accuracy = _check_fraction("target_accuracy", target_accuracy, "e.g. regularizer.target_accuracy=0.3 (the report's target)")
        self.attack_cfg = _attack_config(attack, self.DEFAULT_ATTACK)
        self.attack_batch_size = int(attack_batch_size)
        self.eval_every_n_steps = int(eval_every_n_steps)
        self.adv_x: Tensor | None = None
        self.adv_y: Tensor | None = None
        self.cache_name: str | None = None
        self.from_cache = False
        self.initial_accuracy = float("nan")
        self.attack_success = float("nan")
        self.seed = 0
        self.stopper: AdversarialSetStop | None = None

    # ---- building the set ------------------------------------------------------------
    def setup(self, ctx: TrainContext) -> None:
        self.seed = run_seed(ctx)
        dm = ctx.datamodule
        dm.setup("fit")
        ctx.model.to(ctx.device)  # the attack runs where training will (Lightning would move it there anyway)
        recipe = {
            "what": "runner-up adversarial set",
            "attack": self.attack_cfg,
            "per_class": self.per_class,
            "seed": self.seed,
            "dataset": dm.info.name,
            "train_fraction": getattr(dm, "train_fraction", 1.0),
            "source_weights": fingerprint.of_state(ctx.model),
        }
        self.cache_name = f"adv_set-{fingerprint.of_config(recipe)}"
        cached = ctx.store.load_tensors(ctx.cache_key or self.variant, self.cache_name)
        if cached is not None and {"x", "y", "success"} <= set(cached):
            self.from_cache = True
            tensors = cached
            log.info("reusing the cached adversarial set %s (%d images)", self.cache_name, len(tensors["y"]))
        else:
            self.from_cache = False
            tensors = self._build(ctx)
            ctx.store.save_tensors(ctx.cache_key or self.variant, self.cache_name, tensors)
            atomic_write_json(ctx.store.tensors_path(ctx.cache_key or self.variant, self.cache_name).with_suffix(".json"), recipe)
        self.adv_x, self.adv_y = tensors["x"].float(), tensors["y"].long()
        self.attack_success = float(tensors["success"].float().mean())
        self.initial_accuracy = accuracy(ctx.model, self.adv_x, self.adv_y)
        self.stopper = AdversarialSetStop(self.adv_x, self.adv_y, self.target_accuracy, self.eval_every_n_steps, self.initial_accuracy)
        log.info(
            "adversarial set: %d images, attack success %.3f, accuracy of the initial model %.3f (target %.3f)",
            len(self.adv_y), self.attack_success, self.initial_accuracy, self.target_accuracy,
        )

    def _select_sources(self, ctx: TrainContext) -> tuple[Tensor, Tensor, Tensor]:
        """Up to ``per_class`` training images per class that the model classifies correctly, in seeded random order."""
        dm = ctx.datamodule
        num_classes = dm.info.num_classes
        n = len(dm.train_set)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        counts = torch.zeros(num_classes, dtype=torch.long)
        picked_x, picked_y, picked_i = [], [], []
        device = model_device(ctx.model)
        for start in range(0, n, 1024):
            if bool((counts >= self.per_class).all()):
                break
            chunk = order[start : start + 1024]
            with without_augmentation(dm.train_set):
                x, y = dm.split_tensors("train", indices=chunk)
            with eval_mode(ctx.model):
                correct = predict(ctx.model, x.to(device)).cpu() == y
            index = torch.as_tensor(chunk)
            for cls in range(num_classes):
                room = self.per_class - int(counts[cls])
                if room <= 0:
                    continue
                take = (correct & (y == cls)).nonzero().flatten()[:room]
                if len(take):
                    picked_x.append(x[take])
                    picked_y.append(y[take])
                    picked_i.append(index[take])
                    counts[cls] += len(take)
        short = [c for c in range(num_classes) if counts[c] < self.per_class]
        if len(short) == num_classes and int(counts.sum()) == 0:
            raise TrainingError(
                "the initial model classifies no training image correctly, so there is nothing to attack",
                "train the base variant first (it must be accurate) or check that the right checkpoint is loaded",
            )
        if short:
            log.warning("only %s correctly classified images for classes %s (wanted %d each)", counts[short].tolist(), short, self.per_class)
        return torch.cat(picked_x), torch.cat(picked_y), torch.cat(picked_i)

    def _build(self, ctx: TrainContext) -> dict[str, Tensor]:
        x, y, source = self._select_sources(ctx)
        attack = build("attack", self.attack_cfg)
        device = model_device(ctx.model)
        xs, successes, norms = [], [], []
        for xb, yb in zip(x.split(self.attack_batch_size), y.split(self.attack_batch_size)):
            with eval_mode(ctx.model):
                result = attack(ctx.model, xb.to(device), yb.to(device))
            xs.append(result.x_adv.detach().cpu())
            successes.append(result.success.detach().cpu())
            norms.append(result.norm.detach().cpu())
        return {"x": torch.cat(xs), "y": y, "source_index": source, "success": torch.cat(successes), "norm": torch.cat(norms)}

    # ---- training --------------------------------------------------------------------
    def _require_setup(self) -> tuple[Tensor, Tensor]:
        if self.adv_x is None or self.adv_y is None:
            raise TrainingError("the adversarial set has not been built", "call setup(ctx) before training (the training stage does this)")
        return self.adv_x, self.adv_y

    def train_dataset(self, clean: Dataset) -> Dataset:
        x, y = self._require_setup()
        adversarial = TensorImageDataset(x, y)
        wanted = int(round(len(y) * (1.0 - self.adv_fraction) / self.adv_fraction))
        n_clean = min(wanted, len(clean))  # type: ignore[arg-type]
        if n_clean < wanted:
            log.warning("asked for %d clean images beside %d adversarial ones, the training set has %d: using all", wanted, len(y), n_clean)
        if n_clean == 0:
            return adversarial
        keep = torch.randperm(len(clean), generator=torch.Generator().manual_seed(self.seed + 1))[:n_clean]  # type: ignore[arg-type]
        return ConcatDataset([adversarial, Subset(clean, sorted(keep.tolist()))])

    def callbacks(self) -> list[pl.Callback]:
        self._require_setup()
        assert self.stopper is not None
        return [self.stopper]

    def describe(self) -> dict[str, Any]:
        history = self.stopper.history if self.stopper is not None else []
        return {
            **super().describe(),
            "per_class": self.per_class,
            "adv_fraction": self.adv_fraction,
            "target_accuracy": self.target_accuracy,
            "eval_every_n_steps": self.eval_every_n_steps,
            "attack": self.attack_cfg,
            "adv_set": self.cache_name,
            "adv_set_size": 0 if self.adv_y is None else len(self.adv_y),
            "adv_set_attack_success": self.attack_success,
            "adv_set_initial_acc": self.initial_accuracy,
            "adv_set_acc_history": [list(entry) for entry in history],
        }


@register("regularizer", "pgd")
class PGDTraining(Regularizer):
    """Online adversarial training (Madry et al.): each batch is attacked against the current weights.

    attack:       an eps-bounded attack config (``pgd_linf``, ``pgd_l2`` or ``fgsm``)
    adv_fraction: share of each batch replaced by its adversarial version (1.0: Madry's recipe);
                  the clean part comes first so its logits give the clean training accuracy

    The attack runs on :class:`EvalView`'s view of the model: evaluation mode, parameters frozen.
    """

    variant = "pgd"
    init_from = None
    DEFAULT_ATTACK = {"name": "pgd_linf", "eps": 8 / 255, "step_size": 2 / 255, "steps": 7, "random_start": True}

    def __init__(
        self,
        variant: str = "pgd",
        init_from: str | None = None,
        attack: Mapping[str, Any] | None = None,
        adv_fraction: float = 1.0,
    ) -> None:
        self.variant = variant
        self.init_from = init_from
        self.attack_cfg = _attack_config(attack, self.DEFAULT_ATTACK)
        self.adv_fraction = _check_fraction("adv_fraction", adv_fraction, "1.0 trains on adversarial examples only (Madry et al.), 0.5 on a half-half mix")
        self.attack = build("attack", self.attack_cfg)
        self._view = EvalView()

    def adversarial_batch(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, int]:
        """The training batch: the first ``n_clean`` images as they are, the rest attacked.

        Returns ``(x_mixed, n_clean)``; labels are unchanged.
        """
        n_clean = len(x) - int(round(self.adv_fraction * len(x)))
        if n_clean == len(x):
            return x, n_clean
        with self._view(model, x) as target:
            result = self.attack(target, x[n_clean:].detach(), y[n_clean:])
        return torch.cat([x[:n_clean], result.x_adv.detach()]), n_clean

    def training_loss(self, model: nn.Module, x: Tensor, y: Tensor, epoch: int) -> StepOutput:
        mixed, n_clean = self.adversarial_batch(model, x, y)
        logits = model(mixed)
        loss = F.cross_entropy(logits, y)
        adv_acc = (logits[n_clean:].argmax(1) == y[n_clean:]).float().mean().detach()
        logs: dict[str, Tensor | float] = {"ce": loss.detach(), "adv_acc": adv_acc}
        return StepOutput(loss=loss, logits=logits[:n_clean] if n_clean else None, logs=logs)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "attack": self.attack_cfg, "adv_fraction": self.adv_fraction}
