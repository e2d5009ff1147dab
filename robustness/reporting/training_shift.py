"""Table of the ``training_shift`` probe: how far each variant moved from its starting model."""

from __future__ import annotations

import math
from pathlib import Path

from robustness.probes.base import ProbeResult
from robustness.registry import register
from robustness.reporting.base import Artefact, format_number, variant_title, write_table


def _before_after(start: float, now: float) -> str:
    if math.isnan(now):
        return "n/a"
    return format_number(now) if math.isnan(start) else f"{format_number(start)} → {format_number(now)}"


@register("reporter", "training_shift")
def draw(result: ProbeResult, out_dir: Path) -> list[Artefact]:
    meta = result.meta
    owner = meta.get("adversarial_set_of")
    rows = [
        {
            "Model": variant_title(meta, row["variant"]),
            "starts from": variant_title(meta, row["starts_from"]) if row["starts_from"] not in ("random init", "published") else row["starts_from"],
            "clean accuracy (start → model)": _before_after(row["clean_acc_start"], row["clean_acc"]),
            "adversarial-set accuracy (start → model)": _before_after(row["adv_set_acc_start"], row["adv_set_acc"]),
            "relative weight change": "n/a" if math.isnan(row["weight_change"]) else row["weight_change"],
            "epochs": row["epochs"] if row["epochs"] >= 0 else "n/a",
        }
        for row in result.tables["training_shift"]
    ]
    subset = f"the whole {meta['split']} split ({meta['images']} images)" if meta.get("whole_split") else f"the first {meta['images']} {meta['split']} images"
    where = (f"the {meta['adversarial_set_size']} images of the adversarial set the '{owner}' recipe trained on"
             if owner else "no adversarial set (no variant here was trained on one)")
    caption = (
        f"How far each variant moved from the model its training started from: accuracy on {subset} "
        f"and on {where}, before → after, and ‖θ − θ₀‖ / ‖θ₀‖ over its parameters."
    )
    methods = (
        "A variant fine-tuned from another (init_from) starts from that variant's stored weights; one trained from scratch "
        "starts from its seeded random initialisation, whose accuracies are not shown. The weight change is recorded by the "
        "training run, over every parameter (not batch-norm statistics)."
    )
    return [write_table(rows, out_dir, "training_shift", caption, methods)]
