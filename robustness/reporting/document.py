"""The report's two documents: report.md and a self-contained report.html (figures inlined).

Both are rendered from the same sections with the same table renderer
(:func:`robustness.reporting.base.table_columns` decides the columns), the HTML one from a
Jinja2 template. A figure or table appears once, where its section puts it; method notes that
artefacts carry go to an appendix at the end instead of under every figure.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from robustness.reporting.base import Artefact, format_cell, markdown_table, table_columns


@dataclass
class Section:
    title: str
    command: str
    caption: str = ""
    artefacts: list[Artefact] = field(default_factory=list)


def _relative(path: Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def _file(artefact: Artefact, suffix: str) -> Path | None:
    return next((Path(p) for p in artefact.paths if str(p).endswith(suffix)), None)


def _methods(sections: list[Section]) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for section in sections:
        for artefact in section.artefacts:
            text = getattr(artefact, "methods", "") or ""
            if text and text not in seen.values():
                seen[artefact.name] = text
    return list(seen.items())


def render_markdown(title: str, sections: list[Section], base: Path) -> str:
    lines = [f"# {title}", ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        if section.caption:
            lines += [section.caption, ""]
        lines += [f"Reproduce: `{section.command}`", ""]
        for artefact in section.artefacts:
            if artefact.kind == "figure":
                png = _file(artefact, ".png")
                lines += [f"![{artefact.name}]({_relative(png, base) if png else ''})", ""]
                if artefact.caption:
                    lines += [f"*{artefact.caption}*", ""]
            else:
                csvs = [Path(p) for p in artefact.paths if str(p).endswith(".csv")]
                link = f" ({', '.join(f'[{p.name}]({_relative(p, base)})' for p in csvs)})" if csvs else ""
                lines += [f"**{artefact.caption or artefact.name}**{link}", "", markdown_table(artefact.rows), ""]
    methods = _methods(sections)
    if methods:
        lines += ["## Appendix: methods", ""]
        for name, text in methods:
            lines += [f"**{name}.** {text}", ""]
    return "\n".join(lines)


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("robustness.reporting", "templates"), autoescape=select_autoescape(["html", "j2"]))
    env.filters["cell"] = format_cell
    return env


def render_html(title: str, sections: list[Section], base: Path | None = None) -> str:
    """One self-contained HTML file: figures inlined as base64 PNGs, wide tables scroll."""
    rendered: list[dict[str, Any]] = []
    for section in sections:
        items = []
        for artefact in section.artefacts:
            if artefact.kind == "figure":
                png = _file(artefact, ".png")
                data = base64.b64encode(png.read_bytes()).decode() if png and png.is_file() else ""
                items.append({"kind": "figure", "name": artefact.name, "caption": artefact.caption, "png": data})
            else:
                items.append({"kind": "table", "name": artefact.name, "caption": artefact.caption or artefact.name,
                              "columns": table_columns(artefact.rows), "rows": artefact.rows,
                              "csvs": [_relative(Path(p), base) if base else Path(p).name for p in artefact.paths if str(p).endswith(".csv")]})
        rendered.append({"title": section.title, "caption": section.caption, "command": section.command, "items": items})
    return _environment().get_template("report.html.j2").render(title=title, sections=rendered, methods=_methods(sections))
