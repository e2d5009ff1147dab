"""The report's two documents: report.md and a self-contained report.html (figures inlined).

Both are rendered from the same sections with the same table renderer
(:func:`robustness.reporting.base.table_columns` decides the columns, :func:`format_cell` every
number, :func:`numeric_columns` the alignment), the HTML one from a Jinja2 template. A figure or
table appears once, where its section puts it; a table shows what its reporter chose for the
screen (``Artefact.display``) and links its CSV for the rest; method notes that artefacts carry
go to an appendix at the end instead of under every figure.

What ran (dataset, models, command, time, versions) comes in a :class:`ReportHeader` from the
report stage; without one the documents start with their sections.
"""

from __future__ import annotations

import base64
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup, escape

from robustness.reporting.base import FIGURE_DPI, VERDICT_COLOURS, Artefact, format_cell, format_number, markdown_table, numeric_columns, table_columns


@dataclass
class Section:
    title: str
    command: str
    caption: str = ""
    artefacts: list[Artefact] = field(default_factory=list)


@dataclass
class ReportHeader:
    """What a report ran, for the top of both documents.

    dataset:  the dataset's name
    models:   (variant, clean test accuracy or None where unknown), in the report's order
    command:  the command line that produced the report
    seconds:  how long the report took, end to end
    versions: package -> version (robustness, torch, ...)
    """

    dataset: str
    models: Sequence[tuple[str, float | None]]
    command: str
    seconds: float
    versions: dict[str, str] = field(default_factory=dict)

    def lines(self) -> list[tuple[str, str]]:
        """(label, text) pairs; the command stays raw (each document marks it as code)."""
        models = ", ".join(f"{name} ({'clean accuracy ' + format_number(accuracy) if accuracy is not None else 'accuracy unknown'})" for name, accuracy in self.models)
        return [
            ("Dataset", self.dataset),
            ("Models", models or "none"),
            ("Command", self.command),
            ("Time", duration_text(self.seconds)),
            ("Versions", ", ".join(f"{name} {version}" for name, version in self.versions.items()) or "unknown"),
        ]


def duration_text(seconds: float) -> str:
    """``45 s``, ``7 min 12 s``, ``2 h 05 min``."""
    seconds = max(0, round(float(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _relative(path: Path, base: Path | None) -> str:
    if base is None:
        return Path(path).name
    try:
        return str(Path(path).resolve().relative_to(Path(base).resolve()))
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


def short_title(title: str) -> str:
    """A section's name in the table of contents: its title up to " - " (``Figure 2``), else the whole title."""
    return title.split(" - ", 1)[0].strip()


def _section_ids(sections: list[Section]) -> list[str]:
    ids: list[str] = []
    for section in sections:
        slug = re.sub(r"[^a-z0-9]+", "-", short_title(section.title).lower()).strip("-") or "section"
        unique, n = slug, 2
        while unique in ids or unique == "methods":
            unique, n = f"{slug}-{n}", n + 1
        ids.append(unique)
    return ids


def _links_markdown(paths: list[Path], base: Path) -> str:
    return ", ".join(f"[{p.name}]({_relative(p, base)})" for p in paths)


def render_markdown(title: str, sections: list[Section], base: Path, header: ReportHeader | None = None) -> str:
    lines = [f"# {title}", ""]
    if header is not None:
        lines += [f"- **{label}:** " + (f"`{text}`" if label == "Command" else text) for label, text in header.lines()] + [""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        if section.caption:
            lines += [section.caption, ""]
        for artefact in section.artefacts:
            if artefact.kind == "figure":
                png = _file(artefact, ".png")
                data = f" Data: {_links_markdown(artefact.csvs, base)}." if artefact.csvs else ""
                lines += [f"![{artefact.name}]({_relative(png, base) if png else ''})", ""]
                if artefact.caption or data:
                    lines += [f"*{artefact.caption}*{data}", ""]
            else:
                link = f" ({_links_markdown(artefact.csvs, base)})" if artefact.csvs else ""
                lines += [f"{artefact.caption or artefact.name}{link}", ""]
                if artefact.summary:
                    lines += [f"**{artefact.summary}**", ""]
                lines += [markdown_table(artefact.display), ""]
                if artefact.details:
                    lines += ["<details><summary>Details</summary>", "", markdown_table(artefact.details), "</details>", ""]
        # After the evidence: a reader looks first, then reruns.
        lines += [f"Reproduce: `{section.command}`", ""]
    methods = _methods(sections)
    if methods:
        lines += ["## Appendix: methods", ""]
        for name, text in methods:
            lines += [f"**{name}.** {text}", ""]
    return "\n".join(lines)


def _png_width(data: bytes) -> int | None:
    """A PNG's width in pixels, from its IHDR chunk (None if the bytes are not a PNG)."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return int(struct.unpack(">I", data[16:20])[0])


# Figures are shown at 110 CSS pixels per figure inch, so text is one size in every figure (10 pt is about 15 px).
CSS_PIXELS_PER_INCH = 110


def _table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    columns = table_columns(rows)
    numeric = numeric_columns(rows)
    verdicts = {c for c in columns if c.lower().startswith("verdict")}
    return {"columns": [{"name": c, "numeric": c in numeric, "verdict": c in verdicts} for c in columns], "rows": rows}


def _number_html(value: Any) -> Markup:
    """A numeric cell for HTML: an interval ``[a, b]`` never breaks inside, so a cell wraps only between a value and its interval."""
    text = re.sub(r"\[([^\]]*), ([^\]]*)\]", "[\\1,&nbsp;\\2]", str(escape(format_cell(value))))
    # A value with its interval: the interval on a line of its own, in every such cell alike.
    return Markup(re.sub(r"^(\S+) (\[.*\])$", "\\1<br>\\2", text))


def _heading_html(name: str) -> Markup:
    """A column heading for HTML: "95% CI" stays on one line."""
    return Markup(str(escape(name)).replace("95% CI", "95%&nbsp;CI"))


def _verdict_class(value: Any) -> str:
    return "v-" + re.sub(r"[^a-z]+", "-", str(value).lower()).strip("-")


def _environment() -> Environment:
    env = Environment(loader=PackageLoader("robustness.reporting", "templates"), autoescape=select_autoescape(["html", "j2"]))
    env.filters["cell"] = format_cell
    env.filters["number"] = _number_html
    env.filters["heading"] = _heading_html
    env.filters["verdict_class"] = _verdict_class
    return env


def render_html(title: str, sections: list[Section], base: Path | None = None, header: ReportHeader | None = None) -> str:
    """One self-contained HTML file: figures inlined as base64 PNGs, a header, a table of contents."""
    rendered: list[dict[str, Any]] = []
    for section, anchor in zip(sections, _section_ids(sections)):
        items = []
        for artefact in section.artefacts:
            csvs = [{"href": _relative(p, base), "name": p.name} for p in artefact.csvs]
            if artefact.kind == "figure":
                png = _file(artefact, ".png")
                raw = png.read_bytes() if png and png.is_file() else b""
                width = _png_width(raw)
                items.append({"kind": "figure", "name": artefact.name, "caption": artefact.caption, "png": base64.b64encode(raw).decode(),
                              "width": round(width * CSS_PIXELS_PER_INCH / FIGURE_DPI) if width else None, "csvs": csvs})
            else:
                items.append({"kind": "table", "name": artefact.name, "caption": artefact.caption or artefact.name, "csvs": csvs,
                              "summary": artefact.summary, "table": _table(artefact.display),
                              "details": _table(artefact.details) if artefact.details else None})
        rendered.append({"id": anchor, "title": section.title, "short": short_title(section.title), "caption": section.caption,
                         "command": section.command, "items": items})
    return _environment().get_template("report.html.j2").render(
        title=title, sections=rendered, methods=_methods(sections), header=header.lines() if header else None,
        verdict_colours={_verdict_class(v): c for v, c in VERDICT_COLOURS.items()},
    )
