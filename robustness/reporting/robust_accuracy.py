"""Table and figure of the ``robust_accuracy`` probe: robust accuracy against eps per variant
and attack (the main attack solid, attacks reported beside it dashed).

The CSV keeps the probe's long list (one row per variant, attack and eps); a report shows it
pivoted, one row per variant (and attack) and one column per eps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from robustness.probes.base import ProbeResult
from robustness.reporting.base import MAX_SHOWN_COLUMNS, Artefact, format_number, save_figure, variant_colour, variant_title, write_table
from robustness.registry import register


def _attack_label(meta: dict) -> str:
    attack = meta.get("attack", {})
    label = f"{attack.get('name', '?')} ({meta.get('attack_kind', '')}, {meta.get('norm', '')})"
    extra = [name for name in meta.get("attacks", {}) if name != attack.get("name")]
    return label + (f" and {', '.join(extra)}" if extra else "")


def pivot(rows: list[dict[str, Any]], meta: dict[str, Any], several_attacks: bool) -> list[dict[str, Any]]:
    """One row per variant (and attack): clean accuracy, then robust accuracy at each eps.

    eps = 0 gets no column where it equals the clean accuracy; where more eps than fit
    :data:`MAX_SHOWN_COLUMNS` were measured, evenly spaced ones are shown, the first and last among them.
    """
    main = meta.get("attack", {}).get("name")
    eps_zero_is_clean = all(row["robust_acc"] == row["clean_acc"] for row in rows if row["eps"] == 0)
    measured = sorted({float(row["eps"]) for row in rows if row["eps"] != 0 or not eps_zero_is_clean})
    room = MAX_SHOWN_COLUMNS - 2
    shown_eps = set(measured) if len(measured) <= room else {measured[round(i * (len(measured) - 1) / (room - 1))] for i in range(room)}
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        attack = row.get("attack", main)
        title = variant_title(meta, row["variant"]) + (f" ({attack})" if several_attacks else "")
        shown = out.setdefault((row["variant"], attack), {"Model": title, "clean": row["clean_acc"]})
        if float(row["eps"]) in shown_eps:
            shown[f"ε = {format_number(float(row['eps']))}"] = row["robust_acc"]
    return list(out.values())


@register("reporter", "robust_accuracy")
def draw(result: ProbeResult, out_dir: Path) -> list[Artefact]:
    meta = result.meta
    rows = result.tables["robust_accuracy"]
    main = meta.get("attack", {}).get("name")
    curves = list(dict.fromkeys((row["variant"], row.get("attack", main)) for row in rows))
    several = len({attack for _, attack in curves}) > 1
    attack = _attack_label(meta)
    caption = (
        f"Clean and robust accuracy of each variant under {attack} on {meta.get('n_images')} "
        f"{meta.get('split', 'test')} images of {meta.get('dataset', '')}, one column per eps ({meta.get('norm', '')})."
    )
    table = write_table(rows, out_dir, "robust_accuracy", caption, shown=pivot(rows, meta, several))

    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for variant, name in curves:
        mine = [row for row in rows if row["variant"] == variant and row.get("attack", main) == name]
        title = variant_title(meta, variant)
        ax.plot(
            [row["eps"] for row in mine],
            [row["robust_acc"] for row in mine],
            marker="o",
            linestyle="-" if name == main else "--",
            color=variant_colour(meta, variant),
            label=f"{title} ({name})" if several else title,
        )
    ax.set_xlabel(f"eps ({meta.get('norm', '')})")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(attack, fontsize="small")
    figure = save_figure(fig, out_dir, "robust_accuracy_vs_eps", f"Robust accuracy against eps under {attack}")
    return [table, figure]
