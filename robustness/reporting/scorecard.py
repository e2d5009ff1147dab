"""The claim scorecard: a forest plot of every claim's effect, and a table of verdicts.

The table a report shows has one row per claim (claim, models, effect of the headline statistic
with its 95% interval, verdict), a line of counts above it, and the median, the seed report's
numbers and the notes folded under it. ``scorecard.csv`` keeps every column. Every number here
comes from :func:`robustness.scorecard.compute_scorecard`; this module only lays them out.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from robustness.probes.base import ProbeResult
from robustness.registry import register
from robustness.reporting.base import VERDICT_COLOURS, Artefact, format_number, interval_text, save_figure, write_table

NOT_MEASURED = "not measured"


def _side(value: str) -> str:
    # Path claims name "model:pair_type"; the table shows the pair type after the model.
    return value.replace(":", " ") if value else ""


def _models(row: dict[str, Any]) -> str:
    """``base → adversarial``; path claims compare two pair types of one model: ``cure: natural → adversarial pairs``."""
    if not row["a"]:
        return "base, adversarial, cure"
    (model_a, _, type_a), (model_b, _, type_b) = row["a"].partition(":"), row["b"].partition(":")
    if type_a and type_b and model_a == model_b:
        return f"{model_a}: {type_a} → {type_b} pairs"
    return f"{_side(row['a'])} → {_side(row['b'])}"


def _is_ordering(row: dict[str, Any]) -> bool:
    return row["claim"].startswith("ordering")


def _items(row: dict[str, Any]) -> str:
    if not row.get("n_a"):
        return ""
    counts = f"{row['n_a']}" if row.get("n_a") == row.get("n_b") else f"{row['n_a']} / {row['n_b']}"
    return f"{counts} {row['items']}"


def _interval(row: dict[str, Any], statistic: str) -> str:
    return interval_text(row[f"low_{statistic}"], row[f"high_{statistic}"]) if f"low_{statistic}" in row else ""


def _full(row: dict[str, Any]) -> dict[str, Any]:
    """Every column, for scorecard.csv."""
    out: dict[str, Any] = {
        "Source": row["source"],
        "Claim": row["claim"],
        "Measure": row["measure"],
        "a → b": f"{_side(row['a'])} → {_side(row['b'])}" if row["a"] else "",
        "Expected": row["expected"],
        "Items": _items(row),
    }
    for statistic in ("mean", "median"):
        ordering = _is_ordering(row)
        out |= {
            f"{statistic} a": "" if ordering else row.get(f"a_{statistic}", ""),
            f"{statistic} b": "" if ordering else row.get(f"b_{statistic}", ""),
            f"Δ {statistic} (b - a)": row.get(f"observed_{statistic}", "") if ordering else row.get(f"effect_{statistic}", ""),
            f"{statistic} 95% CI": "" if ordering else _interval(row, statistic) or "none",
            f"Verdict ({statistic})": row[f"verdict_{statistic}"],
        }
    out |= {
        "d (standardised)": row.get("d", ""),
        "d 95% CI": interval_text(row["d_low"], row["d_high"]) if "d_low" in row else "",
        "Seed report": row["seed_report"],
        "Note": row["note"],
    }
    return out


def _claim(row: dict[str, Any], statistic: str) -> str:
    text = f"{row['source']}: {row['claim']}"
    if _is_ordering(row) and row.get(f"observed_{statistic}"):
        text += f" (observed: {row[f'observed_{statistic}']})"
    return text


def _shown(row: dict[str, Any], statistic: str) -> dict[str, Any]:
    """On screen: the claim, its models, the effect and interval of the headline statistic, the verdict."""
    return {
        "Claim": _claim(row, statistic),
        "Measure": row["measure"],
        "Models": _models(row),
        f"b − a ({statistic})": row.get(f"effect_{statistic}", math.nan) if not _is_ordering(row) else "",
        "95% CI": _interval(row, statistic) if not _is_ordering(row) else "",
        "Verdict": row["verdict"],
    }


def _detail(row: dict[str, Any], other: str) -> dict[str, Any]:
    """Folded under the table: the sample sizes, the other statistic, the seed report's numbers, the notes."""
    return {
        "Claim": _claim(row, other),
        "Items": _items(row),
        f"b − a ({other})": row.get(f"effect_{other}", math.nan) if not _is_ordering(row) else "",
        f"{other} 95% CI": _interval(row, other) if not _is_ordering(row) else "",
        f"Verdict ({other})": row[f"verdict_{other}"],
        "Seed report": row["seed_report"],
        "Note": row["note"],
    }


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def summary_line(rows: list[dict[str, Any]], statistic: str, other: str) -> str:
    """The line above the table: how many claims hold, do not, are inconclusive (by ``statistic``), and how many the other statistic reads differently."""
    counts = {verdict: sum(row["verdict"] == verdict for row in rows) for verdict in VERDICT_COLOURS}
    parts = [f"{counts['holds']} of {len(rows)} claims {'holds' if counts['holds'] == 1 else 'hold'}",
             f"{counts['does not hold']} {'does' if counts['does not hold'] == 1 else 'do'} not",
             f"{counts['inconclusive']} {'is' if counts['inconclusive'] == 1 else 'are'} inconclusive"]
    if counts[NOT_MEASURED]:
        parts.append(f"{counts[NOT_MEASURED]} {'was' if counts[NOT_MEASURED] == 1 else 'were'} not measured")
    line = ", ".join(parts[:-1]) + " and " + parts[-1] + f" (by the {statistic})"
    differ = sum(row["verdict"] != row[f"verdict_{other}"] for row in rows)
    return line + (f"; by the {other}, {_count(differ, 'verdict differs', 'verdicts differ')} (details below)." if differ else f"; the {other} gives the same verdicts.")


@register("reporter", "scorecard")
def draw(result: ProbeResult, out_dir: Path) -> list[Artefact]:
    rows = result.tables["scorecard"]
    headline = result.meta.get("headline", {"statistic": "mean", "rule": ""})
    statistic = headline["statistic"]
    other = "median" if statistic == "mean" else "mean"
    # Saved before the headline existed: the headline statistic's verdict.
    rows = [row if "verdict" in row else {**row, "verdict": row[f"verdict_{statistic}"]} for row in rows]
    caption = (
        f"Each claim of the seed report tested over many samples: the effect b − a of the {statistic} with a bootstrap 95% "
        f"interval, and its verdict (inconclusive when the interval contains 0). {headline['rule']}"
    )
    table = write_table([_full(row) for row in rows], out_dir, "scorecard", caption, result.meta.get("methods", ""),
                        shown=[_shown(row, statistic) for row in rows])
    table.summary = summary_line(rows, statistic, other)
    table.details = [_detail(row, other) for row in rows]
    return [table, forest_plot(rows, result.meta, out_dir)]


# ------------------------------------------------------------------ the forest plot


def _label(row: dict[str, Any]) -> str:
    return textwrap.fill(f"{row['source']}: {row['claim']}", 46) + f"\n{_models(row)}"


def forest_plot(rows: list[dict[str, Any]], meta: dict[str, Any], out_dir: Path) -> Artefact:
    """Every claim's standardised effect with its interval, the side the claim predicts shaded."""
    claims = [row for row in rows if not _is_ordering(row)]
    finite = [v for row in claims for v in (row.get("d"), row.get("d_low"), row.get("d_high"), row.get("d_margin")) if v is not None and math.isfinite(v)]
    reach = max([1.0, *(abs(v) for v in finite)]) * 1.15
    # Standardised effects of heavy-tailed measures span decades: past 10 the axis turns logarithmic beyond +-1.
    symlog = reach > 10
    fig, ax = plt.subplots(figsize=(9.0, 0.62 * len(claims) + 1.3))
    predicted = "#d8f0dc"
    for y, row in enumerate(claims):
        band = (y - 0.42, y + 0.42)
        sign = row.get("expected_sign", 0)
        margin = row.get("d_margin", math.nan)
        if sign > 0:
            ax.fill_betweenx(band, 0, reach, color=predicted, linewidth=0)
        elif sign < 0:
            ax.fill_betweenx(band, -reach, 0, color=predicted, linewidth=0)
        elif margin is not None and math.isfinite(margin):
            ax.fill_betweenx(band, -margin, margin, color=predicted, linewidth=0)
        colour = VERDICT_COLOURS.get(row["verdict"], VERDICT_COLOURS[NOT_MEASURED])
        d, low, high = (row.get(k, math.nan) for k in ("d", "d_low", "d_high"))
        if d is None or not math.isfinite(d):
            ax.text(0, y, f"  {row['verdict'] if row['verdict'] == NOT_MEASURED else 'no spread to scale by'}", va="center", ha="left", fontsize=8, color=colour)
            continue
        if math.isfinite(low) and math.isfinite(high):
            ax.plot([low, high], [y, y], color=colour, linewidth=2.4, solid_capstyle="butt")
            ax.plot([low, high], [y, y], color=colour, linestyle="none", marker="|", markersize=9)
            ax.plot([d], [y], marker="o", markersize=6, color=colour)
        else:
            ax.plot([d], [y], marker="o", markersize=6, markerfacecolor="white", markeredgecolor=colour)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_xlim(-reach, reach)
    if symlog:
        ax.set_xscale("symlog", linthresh=1.0)
    ax.set_ylim(len(claims) - 0.5, -0.5)
    ax.set_yticks(range(len(claims)), [_label(row) for row in claims], fontsize=7.5)
    ax.set_xlabel("effect of the mean over the pooled standard deviation, (b − a) / s")
    ax.grid(alpha=0.3, axis="x")
    handles = [Patch(facecolor=predicted, label="what the claim predicts")]
    handles += [Line2D([], [], color=c, marker="o", linewidth=2.4, label=v) for v, c in VERDICT_COLOURS.items() if any(r["verdict"] == v for r in claims)]
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(handles), frameon=False, fontsize=8)
    fig.tight_layout()
    equivalence = f", or its band of ±{format_number(meta['flip_rate_margin'])} for the claims of equal flip rates" if "flip_rate_margin" in meta else ""
    caption = (
        "Every claim's effect on one scale: the difference of the means over the pooled standard deviation of the two groups, "
        f"with its 95% interval, coloured by verdict; the shaded side is the one the claim predicts{equivalence}."
    )
    return save_figure(fig, out_dir, "scorecard_forest", caption, meta.get("standardised", ""))

