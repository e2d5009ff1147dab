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
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from robustness.errors import ConfigError
from robustness.probes.base import ProbeContext, ProbeOptions, ProbeResult
from robustness.registry import register
from robustness.tensors import accuracy


@dataclass(frozen=True)
class Options(ProbeOptions):
    """See conf/probe/training_shift.yaml for their meaning."""

    probe: ClassVar[str] = "training_shift"

    split: str = "test"
    n_images: int | None = None
    batch_size: int = 512

    def validate(self) -> None:
        if self.split not in ("train", "val", "test"):
            raise ConfigError(f"probe.split must be train, val or test, got '{self.split}'", "e.g. probe.split=test")
        if self.n_images is not None and int(self.n_images) <= 0:
            raise ConfigError(f"probe.n_images must be positive or null (the whole split), got {self.n_images}", "e.g. probe.n_images=null")
        if int(self.batch_size) <= 0:
            raise ConfigError(f"probe.batch_size must be positive, got {self.batch_size}", "e.g. probe.batch_size=512")


def _accuracy(model: nn.Module | None, x: Tensor | None, y: Tensor | None, batch_size: int) -> float:
    if model is None or x is None or y is None:
        return math.nan
    return accuracy(model, x, y, batch_size)


@register("probe", "training_shift")
def compute(ctx: ProbeContext) -> ProbeResult:
    options = Options.from_cfg(ctx.options)
    x, y = ctx.data.split_tensors(options.split, limit=options.n_images)
    records = {name: ctx.training(name) for name in ctx.models}
    owner = next((name for name, record in records.items() if record.adversarial_set is not None), None)
    adv_x = adv_y = None
    if owner is not None:
        tensors = records[owner].adversarial_set
        adv_x, adv_y = tensors["x"].float(), tensors["y"].long()
    rows = []
    for i, (name, model) in enumerate(ctx.models.items()):
        record = records[name]
        start = record.metrics.get("start") or {}
        rows.append({
            "variant": name,
            "starts_from": record.starts_from,
            "clean_acc_start": _accuracy(record.start_model, x, y, options.batch_size),
            "clean_acc": _accuracy(model, x, y, options.batch_size),
            "adv_set_acc_start": _accuracy(record.start_model, adv_x, adv_y, options.batch_size),
            "adv_set_acc": _accuracy(model, adv_x, adv_y, options.batch_size),
            "weight_change": float(start.get("weight_change", math.nan)),
            "epochs": int(record.metrics.get("epochs", -1)),
        })
        ctx.progress(i + 1, len(ctx.models), "variants compared with their starting models")
    meta = {
        "split": options.split,
        "images": int(len(y)),
        "whole_split": options.n_images is None or int(options.n_images) >= len(y),
        "adversarial_set_of": owner,
        "adversarial_set_size": 0 if adv_y is None else int(len(adv_y)),
        "variants": list(ctx.models),
    }
    return ProbeResult("training_shift", tables={"training_shift": rows}, meta=meta)
