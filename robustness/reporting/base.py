"""Shared reporting helpers: every figure goes out as PNG + PDF, every table as CSV + Markdown.

Also what several reporters share, so a report looks like one document: one number format
(:func:`format_number`), one colour per class (:func:`class_colour`) and per model variant
(:func:`variant_colour`) in every figure, each variant's title, and the phrases captions use to
name the probed images. Captions are at most two sentences; longer method text goes into an
artefact's ``methods``.

A table keeps every column in its CSV; what a report shows on screen (``Artefact.shown``) is at
most :data:`MAX_SHOWN_COLUMNS` columns, or a pivot of a long list, chosen by its reporter.
"""

from __future__ import annotations

import colorsys
import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from torch import Tensor  # noqa: E402

from robustness import fingerprint  # noqa: E402
from robustness.io import atomic_savefig, atomic_write_text  # noqa: E402
from robustness.probes.base import ProbeResult  # noqa: E402


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
    # What a report shows of a table: fewer columns than ``rows``, or a pivot of them (None: ``rows``).
    shown: list[dict[str, Any]] | None = None
    # A line the report prints above the table (the scorecard's counts and its rule).
    summary: str = ""
    # Rows a report keeps folded under the table, opened on a click (the scorecard's medians and notes).
    details: list[dict[str, Any]] = field(default_factory=list)

    @property
    def display(self) -> list[dict[str, Any]]:
        """The rows a report shows on screen."""
        return self.rows if self.shown is None else self.shown

    @property
    def csvs(self) -> list[Path]:
        """The CSV files a report links: the table's own, then any it carries (per-pair, per-angle data)."""
        return [Path(p) for p in self.paths if str(p).endswith(".csv")]


# A person reads a table of about this many columns; wider ones stay whole in their CSV.
MAX_SHOWN_COLUMNS = 8


def save_figure(fig: Any, out_dir: str | Path, name: str, caption: str = "", methods: str = "") -> Artefact:
    out_dir = Path(out_dir)
    paths = [atomic_savefig(fig, out_dir / f"{name}.{ext}", dpi=FIGURE_DPI, bbox_inches="tight") for ext in ("png", "pdf")]
    plt.close(fig)
    return Artefact("figure", name, paths, caption, methods=methods)


FIGURE_DPI = 150


# ------------------------------------------------------------------ numbers and tables


SIGNIFICANT_DIGITS = 4


def format_number(value: float | int) -> str:
    """Every number the report prints: integers whole, other values to 4 significant digits
    (scientific notation below 0.001 and from 10 000 on), NaN as an en dash."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    value = float(value)
    if math.isnan(value):
        return "–"
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        text = f"{value:.{SIGNIFICANT_DIGITS}g}"
        # ".4g" drops to scientific for 4-digit integers' neighbours such as 9999.5 -> 1e+04; keep it plain.
        return f"{value:.0f}" if "e" in text else text
    return f"{value:.{SIGNIFICANT_DIGITS - 1}e}"


def format_cell(value: Any) -> str:
    """A table cell: numbers through :func:`format_number`, everything else as text."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, float, np.integer, np.floating)):
        return format_number(value)
    return str(value)


def percent(value: float) -> str:
    """A share as a percentage, with the precision of :func:`format_number` (0.9978 -> 99.78%)."""
    return "–" if math.isnan(value) else f"{format_number(100.0 * float(value))}%"


def table_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The columns of a table: the union of its rows' keys, in first-seen order. Markdown, HTML,
    CSV and W&B tables all take their columns from here, so they always agree."""
    return list(dict.fromkeys(key for row in rows for key in row))


# A cell that reads as a number: "0.998", "-1.2e-03", "12/30", "99.7%", "[0.1, 0.2]", "0.90 → 0.95", "1.2 ± 0.3", "–".
_NUMERIC_TEXT = re.compile(r"^[\[(]?[-+−]?(\d|\.\d|∞|–$|n/a$)")


def is_numeric(value: Any) -> bool:
    """Whether a cell holds a number (or a number written with its interval, ratio or change)."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, float, np.integer, np.floating)):
        return True
    return isinstance(value, str) and bool(_NUMERIC_TEXT.match(value.strip()))


def numeric_columns(rows: Sequence[dict[str, Any]]) -> set[str]:
    """Columns whose every non-empty cell is numeric: a report right-aligns these and left-aligns the rest."""
    columns = table_columns(rows)
    return {c for c in columns if all(is_numeric(row[c]) for row in rows if row.get(c, "") != "") and any(row.get(c, "") != "" for row in rows)}


def _markdown_cell(value: Any) -> str:
    # A bare "|" (as in |curvature| or ||H||_F^2) would end the cell; a line break would end the row.
    return format_cell(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table; numeric columns right-aligned (``---:``), text left-aligned (``:---``)."""
    if not rows:
        return "(no rows)\n"
    columns = table_columns(rows)
    numeric = numeric_columns(rows)
    lines = ["| " + " | ".join(_markdown_cell(c) for c in columns) + " |", "|" + "|".join("---:" if c in numeric else ":---" for c in columns) + "|"]
    lines += ["| " + " | ".join(_markdown_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def pick_columns(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """The rows with only ``columns``, in that order (what a report shows of a wide table)."""
    return [{c: row[c] for c in columns if c in row} for row in rows]


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=table_columns(rows))
        writer.writeheader()
        writer.writerows(rows)
    return atomic_write_text(path, buffer.getvalue())


def write_data(rows: Sequence[dict[str, Any]], out_dir: str | Path, name: str, caption: str = "") -> list[Path]:
    """A table a report links but does not print (per pair, per angle): ``name.csv`` and ``name.md``, every column."""
    out_dir = Path(out_dir)
    csv_path = write_csv(rows, out_dir / f"{name}.csv")
    md_path = atomic_write_text(out_dir / f"{name}.md", (f"{caption}\n\n" if caption else "") + markdown_table(rows))
    return [csv_path, md_path]


def write_table(
    rows: Sequence[dict[str, Any]],
    out_dir: str | Path,
    name: str,
    caption: str = "",
    methods: str = "",
    shown: Sequence[dict[str, Any]] | None = None,
) -> Artefact:
    """``rows`` to ``name.csv`` (every column) and ``name.md`` (what a report shows: ``shown``, else ``rows``).

    shown: the rows a report shows on screen, at most :data:`MAX_SHOWN_COLUMNS` columns (e.g.
    :func:`pick_columns` of ``rows``, or a pivot of them).
    """
    out_dir = Path(out_dir)
    display = list(rows) if shown is None else list(shown)
    csv_path = write_csv(rows, out_dir / f"{name}.csv")
    # The stand-alone Markdown file carries its methods text; a report puts it in an appendix.
    whole = f"\nEvery column: {name}.csv\n" if shown is not None else ""
    md_text = (f"{caption}\n\n" if caption else "") + markdown_table(display) + whole + (f"\nMethods: {methods}\n" if methods else "")
    md_path = atomic_write_text(out_dir / f"{name}.md", md_text)
    return Artefact("table", name, [csv_path, md_path], caption, list(rows), methods, shown=None if shown is None else display)


def ordered_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """Rows with ``columns`` first, in that order, then any other keys.

    A saved result comes back with its row keys sorted (the JSON store sorts keys), so a reporter
    that writes stored rows as they are names its column order here.
    """
    return [{**{c: row[c] for c in columns if c in row}, **{k: v for k, v in row.items() if k not in columns}} for row in rows]


def interval_text(low: float, high: float) -> str:
    """A 95% interval as a table cell: ``[low, high]`` (``–`` without one)."""
    if not (math.isfinite(float(low)) and math.isfinite(float(high))):
        return "–"
    return f"[{format_number(float(low))}, {format_number(float(high))}]"


# ------------------------------------------------------------------ colours


# A verdict's colour, the same in the scorecard's badges and its forest plot.
VERDICT_COLOURS = {"holds": "#1a7f37", "does not hold": "#cf222e", "inconclusive": "#9a6700", "not measured": "#6e7781"}


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


# Variants whose regularizer config names no colour (published models, say) take one of these,
# by a digest of their name, skipping those that styled variants use: the same colour in every figure.
_FALLBACK_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#1f77b4", "#d62728", "#ff7f0e", "#2ca02c")


def _styles(meta: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
    return meta.get("variant_styles") or {}


def variant_title(meta: Mapping[str, Any], variant: str) -> str:
    """A variant's title, as its regularizer's config names it (``meta["variant_styles"]``); else its name."""
    return str((_styles(meta).get(variant) or {}).get("title") or variant)


def variant_colour(meta: Mapping[str, Any], variant: str) -> str:
    """A variant's colour in every figure: its regularizer config's ``colour``, else a fixed one chosen by its name."""
    styles = _styles(meta)
    own = (styles.get(variant) or {}).get("colour")
    if own:
        return str(own)
    taken = {str(style.get("colour")).lower() for style in styles.values() if style and style.get("colour")}
    free = [c for c in _FALLBACK_COLOURS if c not in taken] or list(_FALLBACK_COLOURS)
    return free[int(fingerprint.of_bytes(variant.encode("utf-8"))[:8], 16) % len(free)]


# ------------------------------------------------------------------ names in captions and tables


def images_phrase(meta: Mapping[str, Any]) -> str:
    """How captions name a probe's images: ``the first N test images of <dataset>``."""
    dataset = f" of {meta['dataset']}" if meta.get("dataset") else ""
    return f"the first {meta['num_images']} {meta.get('split', 'test')} images{dataset}"


def class_name(class_names: Sequence[str], index: int) -> str:
    return str(class_names[index]) if 0 <= index < len(class_names) else str(index)


def sample_phrase(meta: Mapping[str, Any], class_names: Sequence[str]) -> str:
    """How captions name the one probed image: dataset, split, index and true class."""
    return f"{meta['dataset']} {meta['split']} image #{meta['sample_index']} (true class '{class_name(class_names, meta['true_label'])}')"


def per_image_figure(values: Mapping[str, Any], ylabel: str, title: str, meta: Mapping[str, Any], log: bool = True) -> Any:
    """One column of points per variant with its mean (bar) and median (diamond): how per-image values spread."""

    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(values), 3.6))
    rng = np.random.default_rng(0)  # horizontal jitter only, so points do not hide each other
    for position, (variant, tensor) in enumerate(values.items()):
        data = np.asarray(tensor, dtype=float)
        data = data[np.isfinite(data) & ((data > 0) if log else True)]
        if len(data) == 0:
            continue
        colour = variant_colour(meta, variant)
        ax.scatter(position + rng.uniform(-0.18, 0.18, len(data)), data, s=9, alpha=0.55, color=colour)
        ax.plot([position - 0.3, position + 0.3], [data.mean()] * 2, color="black", linewidth=2)
        ax.plot([position], [np.median(data)], marker="D", markersize=6, color="white", markeredgecolor="black")
    ax.set_xticks(range(len(values)), [variant_title(meta, v) for v in values], rotation=15)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


# ---- shared by the plane reporters (boundary_plane, random_plane) --------------------------

PANEL_INCHES = 3.6


def grid_colours(grids: Sequence[Tensor]) -> dict[int, RGBA]:
    """The fixed colour of every class present on any of the grids."""
    return class_colours(sorted({int(c) for grid in grids for c in np.unique(np.asarray(grid)).tolist()}))


def draw_regions(ax: Any, labels: Tensor, coords: Tensor, colours: dict[int, RGBA], v_coords: Tensor | None = None) -> None:
    """Paint a label grid (rows along the vertical ``coords``, columns along ``v_coords``) in class colours."""
    grid = np.asarray(labels)
    classes = sorted(colours)
    index = np.searchsorted(classes, grid)
    cmap = ListedColormap([colours[c] for c in classes])
    rows, cols = np.asarray(coords, dtype=float), np.asarray(coords if v_coords is None else v_coords, dtype=float)
    # Each pixel is centred on its grid point, hence the half-step padding of the extent.
    pad_r = (rows[-1] - rows[0]) / max(len(rows) - 1, 1) / 2
    pad_c = (cols[-1] - cols[0]) / max(len(cols) - 1, 1) / 2
    ax.imshow(
        index,
        origin="lower",
        extent=(cols[0] - pad_c, cols[-1] + pad_c, rows[0] - pad_r, rows[-1] + pad_r),
        cmap=cmap,
        vmin=-0.5,
        vmax=len(classes) - 0.5,
        interpolation="nearest",
        aspect="equal",
    )


def class_legend(fig: Any, colours: dict[int, RGBA], class_names: Sequence[str]) -> None:
    handles = [Patch(facecolor=colours[c], edgecolor="black", linewidth=0.5, label=class_name(class_names, c)) for c in sorted(colours)]
    fig.legend(handles=handles, title="class", loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize="small")


def per_image_artefact(result: ProbeResult, key: str, ylabel: str, log: bool, out_dir: Path, name: str, caption: str) -> Artefact | None:
    """The spread over images of one per-image value (absent in results saved before it existed)."""
    variants = result.meta["variants"]
    if f"{variants[0]}/per_image/{key}" not in result.arrays:
        return None
    values = {v: np.abs(result.arrays[f"{v}/per_image/{key}"].double().numpy()) if log else result.arrays[f"{v}/per_image/{key}"].double().numpy() for v in variants}
    fig = per_image_figure(values, ylabel, f"{result.meta['num_images']} {result.meta['split']} images, one plane each", result.meta, log=log)
    return save_figure(fig, out_dir, name, caption, result.meta.get("methods", ""))


# ---- shared by the Hessian reporters (hessian_norm, table1, curvature_profile) -------------

HESSIAN_MEANING = (
    "H is the Hessian of the cross-entropy loss (true label) with respect to the input pixels in [0, 1]. "
    "Exact products compute it at the point: for a ReLU network only its Gauss-Newton part J^T(diag p - pp^T)J "
    "is non-zero, the logit Hessian vanishing almost everywhere. Finite differences of gradients at step h "
    "(CURE's view) also count how the linear regions change within distance h."
)
