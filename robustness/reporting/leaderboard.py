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
    """Curvature against robust accuracy, one panel per statistic of ||H||_F^2 over images that the
    claim is tested with (mean, whose verdict the scorecard states, then median), each titled with
    its rank correlation: the figure shows what the verdict rests on."""
    robust_key, attack = _robust_key(result)
    rows = result.tables["leaderboard"]
    variants = [row["variant"] for row in rows]
    claim = (result.tables.get("claims") or [{}])[0]
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.9), sharey=True)
    for ax, statistic in zip(axes, ("mean", "median")):
        key = f"fro2_{statistic}"
        drawn = 0
        for row in rows:
            x, y = row[key], row[robust_key]
            if not (math.isfinite(x) and math.isfinite(y)):
                continue
            xerr = [[max(x - row[f"{key}_low"], 0.0)], [max(row[f"{key}_high"] - x, 0.0)]] if math.isfinite(row[f"{key}_low"]) else None
            yerr = [[max(y - row[f"{robust_key}_low"], 0.0)], [max(row[f"{robust_key}_high"] - y, 0.0)]] if math.isfinite(row[f"{robust_key}_low"]) else None
            colour = _colour(result, row["variant"], variants)
            ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", color=colour, ecolor=colour, capsize=3, label=_title(result, row["variant"]))
            drawn += 1
        if drawn and all(row[key] > 0 for row in rows if math.isfinite(row[key])):
            ax.set_xscale("log")
        ax.set_xlabel(f"{statistic} ||H||_F^2 over images")
        ax.grid(alpha=0.3)
        rho = claim.get(f"effect_{statistic}")
        verdict = claim.get(f"verdict_{statistic}", "")
        if isinstance(rho, (int, float)) and math.isfinite(rho):
            interval = interval_text(claim.get(f"low_{statistic}", math.nan), claim.get(f"high_{statistic}", math.nan))
            ax.set_title(f"Spearman rho {format_cell(float(rho))} {interval}: {verdict}", fontsize="small")
    axes[0].set_ylabel(f"{attack} robust accuracy")
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, frameon=False, fontsize="x-small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    eps = result.meta.get("eps")
    fig.suptitle(f"curvature against robustness{'' if eps is None else f' at eps {eps:g}'}", fontsize="small")
    fig.tight_layout()
    caption = (
        f"Curvature (||H||_F^2 of the input Hessian of the loss, its mean over images on the left and its median on the right) against "
        f"{attack} robust accuracy, one point per variant, each at its own clean accuracy; bars are 95% bootstrap intervals over images. "
        "Each panel's title is the rank correlation across variants with its interval; the scorecard states the verdict of the mean."
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
