"""Shared reporting helpers: every figure goes out as PNG + PDF, every table as CSV + Markdown."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

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
    caption: what it shows, and which report figure/table it reproduces
    rows:    for tables, the rows themselves (so W&B and report.md need not re-read the CSV)
    """

    kind: str
    name: str
    paths: list[Path]
    caption: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)


def save_figure(fig: Any, out_dir: str | Path, name: str, caption: str = "") -> Artefact:
    out_dir = Path(out_dir)
    paths = [atomic_savefig(fig, out_dir / f"{name}.{ext}", dpi=150, bbox_inches="tight") for ext in ("png", "pdf")]
    plt.close(fig)
    return Artefact("figure", name, paths, caption)


def format_cell(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e4:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def table_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The columns of a table: the union of its rows' keys, in first-seen order. Markdown, HTML,
    CSV and W&B tables all take their columns from here, so they always agree."""
    return list(dict.fromkeys(key for row in rows for key in row))


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)\n"
    columns = table_columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(format_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[dict[str, Any]], out_dir: str | Path, name: str, caption: str = "") -> Artefact:
    out_dir = Path(out_dir)
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=table_columns(rows))
        writer.writeheader()
        writer.writerows(rows)
    csv_path = atomic_write_text(out_dir / f"{name}.csv", buffer.getvalue())
    md_text = (f"{caption}\n\n" if caption else "") + markdown_table(rows)
    md_path = atomic_write_text(out_dir / f"{name}.md", md_text)
    return Artefact("table", name, [csv_path, md_path], caption, list(rows))
