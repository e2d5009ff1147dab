"""Table and figure of the ``robust_accuracy`` probe: robust accuracy against eps per variant
and attack (the main attack solid, attacks reported beside it dashed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from robustness.probes.base import ProbeResult
from robustness.reporting.base import Artefact, save_figure, write_table
from robustness.registry import register


def _attack_label(meta: dict) -> str:
    attack = meta.get("attack", {})
    label = f"{attack.get('name', '?')} ({meta.get('attack_kind', '')}, {meta.get('norm', '')})"
    extra = [name for name in meta.get("attacks", {}) if name != attack.get("name")]
    return label + (f" and {', '.join(extra)}" if extra else "")


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
        f"{meta.get('split', 'test')} images of {meta.get('dataset', '')}"
    )
    table = write_table(rows, out_dir, "robust_accuracy", caption)

    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    colours = {}
    for variant, name in curves:
        mine = [row for row in rows if row["variant"] == variant and row.get("attack", main) == name]
        line = ax.plot(
            [row["eps"] for row in mine],
            [row["robust_acc"] for row in mine],
            marker="o",
            linestyle="-" if name == main else "--",
            color=colours.get(variant),
            label=f"{variant} ({name})" if several else variant,
        )[0]
        colours.setdefault(variant, line.get_color())
    ax.set_xlabel(f"eps ({meta.get('norm', '')})")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize="small")
    ax.set_title(attack, fontsize="small")
    figure = save_figure(fig, out_dir, "robust_accuracy_vs_eps", f"Robust accuracy against eps under {attack}")
    return [table, figure]
