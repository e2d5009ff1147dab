"""The claim scorecard as a table (``scorecard.csv`` / ``scorecard.md``): one row per claim of the seed report."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from robustness.probes.base import ProbeResult
from robustness.reporting.base import Artefact, interval_text, write_table
from robustness.registry import register


def _side(value: str) -> str:
    # Path claims name "model:pair_type"; the table shows the pair type after the model.
    return value.replace(":", " ") if value else ""


def _effect(row: dict[str, Any], statistic: str) -> dict[str, Any]:
    if f"effect_{statistic}" not in row:
        return {f"{statistic} a": "", f"{statistic} b": "", f"Δ {statistic} (b - a)": "", f"{statistic} 95% CI": ""}
    low, high = row[f"low_{statistic}"], row[f"high_{statistic}"]
    interval = interval_text(low, high) if math.isfinite(low) and math.isfinite(high) else "none"
    return {
        f"{statistic} a": row[f"a_{statistic}"],
        f"{statistic} b": row[f"b_{statistic}"],
        f"Δ {statistic} (b - a)": row[f"effect_{statistic}"],
        f"{statistic} 95% CI": interval,
    }


def _display(row: dict[str, Any]) -> dict[str, Any]:
    items = f"{row['n_a']} {row['items']}" if row.get("n_a") and row.get("n_a") == row.get("n_b") else (f"{row['n_a']} / {row['n_b']} {row['items']}" if row.get("n_a") else "")
    ordering = row["claim"].startswith("ordering")
    return {
        "Source": row["source"],
        "Claim": row["claim"],
        "Measure": row["measure"],
        "a → b": f"{_side(row['a'])} → {_side(row['b'])}" if row["a"] else "",
        "Expected": row["expected"],
        "Items": items,
        **(
            {"mean a": "", "mean b": "", "Δ mean (b - a)": row.get("observed_mean", ""), "mean 95% CI": ""}
            if ordering else _effect(row, "mean")
        ),
        "Verdict (mean)": row["verdict_mean"],
        **(
            {"median a": "", "median b": "", "Δ median (b - a)": row.get("observed_median", ""), "median 95% CI": ""}
            if ordering else _effect(row, "median")
        ),
        "Verdict (median)": row["verdict_median"],
        "Seed report": row["seed_report"],
        "Note": row["note"],
    }


@register("reporter", "scorecard")
def draw(result: ProbeResult, out_dir: Path) -> list[Artefact]:
    rows = [_display(row) for row in result.tables["scorecard"]]
    caption = (
        "Scorecard: each claim of the seed report tested over many samples, the effect b - a under the mean and the median "
        "with a bootstrap 95% interval and its verdict (inconclusive when the interval contains 0). For Table 1's orderings the "
        "Δ columns show the observed order, smallest first."
    )
    return [write_table(rows, out_dir, "scorecard", caption, result.meta.get("methods", ""))]

