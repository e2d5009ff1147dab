"""The geometry leaderboard (``robustness/leaderboard.py`` computes it): one table, one row per
variant with every statistic and its 95% interval, and one figure, curvature against robust
accuracy with interval bars, one point per variant. The claim across defences is the scorecard's."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from robustness.probes.base import ProbeResult
from robustness.registry import register
from robustness.reporting.base import Artefact, format_cell, interval_text, pick_columns, save_figure, variant_colour, variant_title, write_table


def _cell(row: dict[str, Any], key: str) -> str:
    value, low, high = row.get(key, math.nan), row.get(f"{key}_low", math.nan), row.get(f"{key}_high", math.nan)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{format_cell(float(value))} {interval_text(low, high)}" if math.isfinite(low) and math.isfinite(high) else format_cell(float(value))


def _title(result: ProbeResult, variant: str) -> str:
    return variant_title(result.meta, variant)


def _colour(result: ProbeResult, variant: str, variants: list[str]) -> str:
    return variant_colour(result.meta, variant)


def table_rows(result: ProbeResult) -> list[dict[str, Any]]:
    """The rows as the report shows them: each statistic with its interval in one cell."""
    columns = result.meta["columns"]
    out = []
    for row in result.tables["leaderboard"]:
        shown: dict[str, Any] = {"variant": _title(result, row["variant"])}
        shown.update({columns[key]["title"]: _cell(row, key) for key in columns})
        shown["notes"] = row.get("notes", "")
        out.append(shown)
    return out


def _robust_key(result: ProbeResult) -> tuple[str, str]:
    claims = result.tables.get("claims") or [{}]
    return ("autoattack_acc", "AutoAttack") if str(claims[0].get("b", "")).startswith("AutoAttack") else ("pgd_acc", "PGD")


def _figure(result: ProbeResult, out_dir: Path) -> Artefact:
    robust_key, attack = _robust_key(result)
    rows = result.tables["leaderboard"]
    variants = [row["variant"] for row in rows]
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    drawn = 0
    for row in rows:
        x, y = row["fro2_median"], row[robust_key]
        if not (math.isfinite(x) and math.isfinite(y)):
            continue
        xerr = [[max(x - row["fro2_median_low"], 0.0)], [max(row["fro2_median_high"] - x, 0.0)]] if math.isfinite(row["fro2_median_low"]) else None
        yerr = [[max(y - row[f"{robust_key}_low"], 0.0)], [max(row[f"{robust_key}_high"] - y, 0.0)]] if math.isfinite(row[f"{robust_key}_low"]) else None
        colour = _colour(result, row["variant"], variants)
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", color=colour, ecolor=colour, capsize=3, label=_title(result, row["variant"]))
        drawn += 1
    if drawn and all(row["fro2_median"] > 0 for row in rows if math.isfinite(row["fro2_median"])):
        ax.set_xscale("log")
    ax.set_xlabel("median ||H||_F^2 over images (input Hessian of the loss)")
    ax.set_ylabel(f"{attack} robust accuracy")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize="x-small", loc="best")
    eps = result.meta.get("eps")
    ax.set_title(f"curvature against robustness{'' if eps is None else f' at eps {eps:g}'}", fontsize="small")
    caption = (
        f"Curvature (median ||H||_F^2) against {attack} robust accuracy, one point per variant, each at its own clean accuracy; "
        "bars are 95% bootstrap intervals over images."
    )
    return save_figure(fig, out_dir, "leaderboard_curvature_vs_robustness", caption)


@register("reporter", "leaderboard")
def draw(result: ProbeResult, out_dir: Path) -> list[Artefact]:
    meta = result.meta
    caption = (
        f"Geometry leaderboard: every variant's statistics with 95% bootstrap intervals (robust accuracy at eps {meta.get('eps')}); "
        "each variant at its own clean accuracy, the hue flip rate on the colour version of the data."
    )
    rows = table_rows(result)
    # Twelve statistics do not fit one screen: robustness and cost in one table, geometry in the
    # other, each at most eight columns (leaderboard.csv keeps every column).
    titles = result.meta["columns"]
    first = ["variant", *(titles[k]["title"] for k in ("clean_acc", "pgd_acc", "autoattack_acc", "deepfool_median", "cost") if k in titles)]
    second = ["variant", *(titles[k]["title"] for k in ("fro2_mean", "fro2_median", "curvature", "area_fraction", "path_points", "hue_flip_rate") if k in titles)]
    table = write_table(rows, out_dir, "leaderboard", caption, meta.get("methods", ""), shown=pick_columns(rows, first))
    geometry = write_table(pick_columns(rows, [*second, "notes"]), out_dir, "leaderboard_geometry",
                           "The same variants' geometry: curvature of the loss and of the boundary, regions, paths and hue flips, with 95% intervals.",
                           shown=pick_columns(rows, second))
    return [table, geometry, _figure(result, out_dir)]
