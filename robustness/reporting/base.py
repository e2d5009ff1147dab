"""Shared reporting helpers: every figure goes out as PNG + PDF, every table as CSV + Markdown.

Also what several reporters share, so a report looks like one document: one colour per class
(:func:`class_colour`) and per model variant (:func:`variant_colour`) in every figure, the
report's names for its models, and the phrases captions use to name the probed images.
Captions are at most two sentences; longer method text goes into an artefact's ``methods``.
"""

from __future__ import annotations

import colorsys
import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from robustness.io import atomic_savefig, atomic_write_text  # noqa: E402


@dataclass
class Artefact:
    """One figure or table written by a reporter.

    kind:    "figure" or "table"
    name:    a stable identifier, e.g. "fig2_boundary" (also the W&B key)
    paths:   files written (PNG + PDF, or CSV + Markdown)
    caption: what it shows, and which report figure/table it reproduces (at most two sentences)
    rows:    for tables, the rows themselves (so W&B and report.md need not re-read the CSV)
    methods: how it was measured, in full, for the report's appendix ("" if the caption says it all)
    """

    kind: str
    name: str
    paths: list[Path]
    caption: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    methods: str = ""


def save_figure(fig: Any, out_dir: str | Path, name: str, caption: str = "", methods: str = "") -> Artefact:
    out_dir = Path(out_dir)
    paths = [atomic_savefig(fig, out_dir / f"{name}.{ext}", dpi=150, bbox_inches="tight") for ext in ("png", "pdf")]
    plt.close(fig)
    return Artefact("figure", name, paths, caption, methods=methods)


def format_cell(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e4:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def _markdown_cell(value: Any) -> str:
    # A bare "|" (as in |curvature| or ||H||_F^2) would end the cell.
    return format_cell(value).replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(dict.fromkeys(key for row in rows for key in row))  # union, in first-seen order
    lines = ["| " + " | ".join(_markdown_cell(c) for c in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_markdown_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[dict[str, Any]], out_dir: str | Path, name: str, caption: str = "", methods: str = "") -> Artefact:
    out_dir = Path(out_dir)
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)
    csv_path = atomic_write_text(out_dir / f"{name}.csv", buffer.getvalue())
    # The stand-alone Markdown file carries its methods text; a report puts it in an appendix.
    md_text = (f"{caption}\n\n" if caption else "") + markdown_table(rows) + (f"\nMethods: {methods}\n" if methods else "")
    md_path = atomic_write_text(out_dir / f"{name}.md", md_text)
    return Artefact("table", name, [csv_path, md_path], caption, list(rows), methods)


def ordered_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """Rows with ``columns`` first, in that order, then any other keys.

    A saved result comes back with its row keys sorted (the JSON store sorts keys), so a reporter
    that writes stored rows as they are names its column order here.
    """
    return [{**{c: row[c] for c in columns if c in row}, **{k: v for k, v in row.items() if k not in columns}} for row in rows]


def interval_text(low: float, high: float) -> str:
    """A 95% interval as a table cell: ``[low, high]``."""
    return f"[{format_cell(float(low))}, {format_cell(float(high))}]"


# ------------------------------------------------------------------ colours


# Ten-class datasets (digits, CIFAR-10, SVHN) get tab10, in class order; beyond ten classes
# hues follow the golden ratio, so any class index has its own colour without a lookup table.
_TAB10 = tuple(matplotlib.colormaps["tab10"](i) for i in range(10))
_GOLDEN = 0.6180339887498949

RGBA = tuple[float, float, float, float]


def class_colour(index: int) -> RGBA:
    """The colour of class ``index`` in every figure: a function of the index alone."""
    index = int(index)
    if 0 <= index < len(_TAB10):
        return tuple(float(c) for c in _TAB10[index])  # type: ignore[return-value]
    hue = (abs(index) * _GOLDEN) % 1.0
    value = 0.95 if index % 2 else 0.7  # alternate brightness so neighbouring hues stay apart
    r, g, b = colorsys.hsv_to_rgb(hue, 0.75, value)
    return (r, g, b, 1.0)


def class_colours(classes: Sequence[int]) -> dict[int, RGBA]:
    """``{class: colour}`` for the classes a figure shows, each with its fixed :func:`class_colour`."""
    return {int(c): class_colour(int(c)) for c in sorted(set(int(c) for c in classes))}


# The report's three models keep one colour in every figure; other variants take the next free one.
_VARIANT_COLOURS = {"base": "#1f77b4", "adversarial": "#d62728", "cure": "#2ca02c"}
_OTHER_VARIANT_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#ff7f0e")


def variant_colour(variant: str, variants: Sequence[str] = ()) -> str:
    """The colour of a model variant: fixed for base/adversarial/cure, else by its place among ``variants``."""
    if variant in _VARIANT_COLOURS:
        return _VARIANT_COLOURS[variant]
    others = [v for v in variants if v not in _VARIANT_COLOURS]
    position = others.index(variant) if variant in others else sum(map(ord, variant))
    return _OTHER_VARIANT_COLOURS[position % len(_OTHER_VARIANT_COLOURS)]


# ------------------------------------------------------------------ names in captions and tables


# The report's names for its three models (Table 1's rows); other variants keep their own name.
VARIANT_TITLES = {"base": "Base model", "adversarial": "Adversarial training", "cure": "CURE training"}


def variant_title(variant: str) -> str:
    return VARIANT_TITLES.get(variant, variant)


def images_phrase(meta: Mapping[str, Any]) -> str:
    """How captions name a probe's images: ``the first N test images of <dataset>``."""
    dataset = f" of {meta['dataset']}" if meta.get("dataset") else ""
    return f"the first {meta['num_images']} {meta.get('split', 'test')} images{dataset}"


def class_name(class_names: Sequence[str], index: int) -> str:
    return str(class_names[index]) if 0 <= index < len(class_names) else str(index)


def sample_phrase(meta: Mapping[str, Any], class_names: Sequence[str]) -> str:
    """How captions name the one probed image: dataset, split, index and true class."""
    return f"{meta['dataset']} {meta['split']} image #{meta['sample_index']} (true class '{class_name(class_names, meta['true_label'])}')"


def per_image_figure(values: Mapping[str, Any], ylabel: str, title: str, log: bool = True) -> Any:
    """One column of points per variant with its mean (bar) and median (diamond): how per-image values spread."""
    import numpy as np

    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(values), 3.6))
    rng = np.random.default_rng(0)  # horizontal jitter only, so points do not hide each other
    for position, (variant, tensor) in enumerate(values.items()):
        data = np.asarray(tensor, dtype=float)
        data = data[np.isfinite(data) & ((data > 0) if log else True)]
        if len(data) == 0:
            continue
        colour = variant_colour(variant, list(values))
        ax.scatter(position + rng.uniform(-0.18, 0.18, len(data)), data, s=9, alpha=0.55, color=colour)
        ax.plot([position - 0.3, position + 0.3], [data.mean()] * 2, color="black", linewidth=2)
        ax.plot([position], [np.median(data)], marker="D", markersize=6, color="white", markeredgecolor="black")
    ax.set_xticks(range(len(values)), [variant_title(v) for v in values], rotation=15)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig
