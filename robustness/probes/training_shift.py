"""Probe ``training_shift``: how far each variant moved from the model its training started from.

A fine-tuning recipe that stops early (the report's: until 30% accuracy on its adversarial set)
can leave a model all but unchanged, and every comparison with its starting model then compares
a model with itself. Per variant this probe gives:

- where its training started: a variant of the store (``init_from``), a random initialisation,
  or a published model;
- clean accuracy on the split, of the variant and of its starting model;
- accuracy on the adversarial set, of the variant and of its starting model: the first set among
  the variants' own (the report's recipe keeps the runner-up set it fine-tuned on), the same
  images for every row;
- the relative weight change ``||theta - theta_0|| / ||theta_0||`` that its training recorded.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from torch import Tensor, nn

from robustness.errors import ConfigError, InputError
from robustness.probes.base import (
    Progress,
    ProbeContext,
    ProbeOptions,
    ProbeResult,
    TrainingRecord,
    fitted,
    no_progress,
    per_item_bytes,
    prepare_inputs,
    probe_options,
)
from robustness.probes.memory import MemoryNeed, image_bytes, size_text
from robustness.probes.per_image import first
from robustness.registry import register
from robustness.tensors import accuracy


@probe_options("training_shift")
class TrainingShiftOptions(ProbeOptions):
    """See conf/probe/training_shift.yaml for their meaning."""

    split: str
    n_images: int | None
    batch_size: int

    def validate(self) -> None:
        if self.split not in ("train", "val", "test"):
            raise ConfigError(f"probe.split must be train, val or test, got '{self.split}'", "e.g. probe.split=test")
        if self.n_images is not None and int(self.n_images) <= 0:
            raise ConfigError(f"probe.n_images must be positive or null (the whole split), got {self.n_images}", "e.g. probe.n_images=null")
        if int(self.batch_size) <= 0:
            raise ConfigError(f"probe.batch_size must be positive, got {self.batch_size}", "e.g. probe.batch_size=512")

    def memory_need(self, image_shape: Sequence[int], num_classes: int, activation: int, num_images: int | None) -> MemoryNeed:
        held = (int(self.n_images) if self.n_images is not None else 0) if num_images is None else int(num_images)
        return MemoryNeed(
            fixed=held * image_bytes(image_shape),
            per_item=per_item_bytes(image_shape, activation, gradients=False),
            batch=int(self.batch_size),
            batch_key="batch_size",
            fixed_what=f"{held} images of shape {tuple(image_shape)}",
            fixed_fix=lambda usable: f"compare on fewer images (probe.n_images); {size_text(usable)} can hold about {usable // max(1, image_bytes(image_shape))}",
        )


class TrainingShiftResult(ProbeResult):
    """``rows``: per model where its training started, the clean accuracy of it and of its
    starting model, their accuracy on the adversarial set, the relative weight change, the epochs."""

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.tables["training_shift"]


def _accuracy(model: nn.Module | None, x: Tensor | None, y: Tensor | None, batch_size: int) -> float:
    if model is None or x is None or y is None:
        return math.nan
    return accuracy(model, x, y, batch_size)


def training_shift(models: Any, images: Tensor, labels: Tensor, *, records: Mapping[str, TrainingRecord] | None = None,
                   progress: Progress = no_progress, **options: Any) -> TrainingShiftResult:
    """How far each model moved from the model its training started from, on the first ``n_images`` images.

    records: per model name its :class:`TrainingRecord` (its starting model, the metrics its
             training recorded, its adversarial set); a model without one counts as published.
    options: those of ``conf/probe/training_shift.yaml`` (its values are the defaults).
    """
    settings = TrainingShiftOptions.from_cfg(options)
    named, x, y, classes = prepare_inputs(models, images, labels)
    x, y = first(x, y, settings.n_images)
    settings = fitted(settings, named, x, classes)
    records = dict(records or {})
    unknown = sorted(set(records) - set(named))
    if unknown:
        raise InputError(f"training records for models that are not probed: {', '.join(unknown)}", f"name records after the models: {', '.join(named)}")
    records = {name: records.get(name, TrainingRecord()) for name in named}
    owner = next((name for name, record in records.items() if record.adversarial_set is not None), None)
    adv_x = adv_y = None
    if owner is not None:
        tensors = records[owner].adversarial_set
        adv_x, adv_y = tensors["x"].float(), tensors["y"].long()
    rows = []
    for i, (name, model) in enumerate(named.items()):
        record = records[name]
        start = record.metrics.get("start") or {}
        rows.append({
            "variant": name,
            "starts_from": record.starts_from,
            "clean_acc_start": _accuracy(record.start_model, x, y, settings.batch_size),
            "clean_acc": _accuracy(model, x, y, settings.batch_size),
            "adv_set_acc_start": _accuracy(record.start_model, adv_x, adv_y, settings.batch_size),
            "adv_set_acc": _accuracy(model, adv_x, adv_y, settings.batch_size),
            "weight_change": float(start.get("weight_change", math.nan)),
            "epochs": int(record.metrics.get("epochs", -1)),
        })
        progress(i + 1, len(named), "variants compared with their starting models")
    meta = {
        "split": settings.split,
        "images": int(len(y)),
        "whole_split": settings.n_images is None or int(settings.n_images) >= len(y),
        "adversarial_set_of": owner,
        "adversarial_set_size": 0 if adv_y is None else int(len(adv_y)),
        "variants": list(named),
    }
    return TrainingShiftResult("training_shift", tables={"training_shift": rows}, meta=meta)


@register("probe", "training_shift", options=TrainingShiftOptions)
def compute(ctx: ProbeContext) -> ProbeResult:
    options = TrainingShiftOptions.from_cfg(ctx.options)
    x, y = ctx.data.split_tensors(options.split, limit=options.n_images)
    records = {name: ctx.training(name) for name in ctx.models}
    return training_shift(ctx.models, x.to(ctx.device), y.to(ctx.device), records=records, progress=ctx.progress, **ctx.options)
