"""report.md and report.html: what ran at the top, a table of contents, every section's evidence then its command."""

from __future__ import annotations

import re
from html import unescape
from pathlib import Path
from typing import Any

from robustness.reporting.document import ReportHeader, Section, duration_text, render_html, render_markdown, short_title

import synthetic


def test_the_header_says_what_ran_in_both_documents(synthetic_report: dict[str, Any]) -> None:
    md = synthetic_report["md"].read_text(encoding="utf-8")
    html = synthetic_report["html"].read_text(encoding="utf-8")
    header = synthetic.HEADER
    for label, text in header.lines():
        assert f"**{label}:**" in md and f"<dt>{label}</dt>" in html
    assert "cure (clean accuracy 0.9644)" in md and "tv (accuracy unknown)" in md
    assert f"`{header.command}`" in md and "8 min 07 s" in md and "torch 2.14.1" in md
    # The header comes before the first section.
    assert md.index("**Dataset:**") < md.index("## Scorecard") and html.index("<dt>Dataset</dt>") < html.index('<section id="scorecard">')


def test_duration_reads_in_the_largest_sensible_units() -> None:
    assert [duration_text(s) for s in (0.4, 45, 60, 487, 3600, 7512)] == ["0 s", "45 s", "1 min 00 s", "8 min 07 s", "1 h 00 min", "2 h 05 min"]


def test_contents_link_every_section_and_each_section_ends_with_its_command(synthetic_report: dict[str, Any]) -> None:
    html = synthetic_report["html"].read_text(encoding="utf-8")
    sections = synthetic_report["sections"]
    links = re.findall(r'<li><a href="#([^"]+)" title="([^"]*)">([^<]+)</a></li>', html)
    assert [unescape(title) for _, title, _ in links] == [s.title for s in sections]
    assert [short for _, _, short in links][:4] == ["Scorecard", "How far each variant moved from the model its training started from", "Figure 2", "Figure 3"]
    ids = [anchor for anchor, _, _ in links]
    assert len(set(ids)) == len(ids) and all(f'<section id="{anchor}">' in html for anchor in ids)
    assert '<a href="#methods">' in html and '<section id="methods"' in html
    md = synthetic_report["md"].read_text(encoding="utf-8")
    for section, following in zip(sections, [*sections[1:], None]):
        start = md.index(f"## {section.title}\n")
        end = md.index(f"## {following.title}\n") if following else md.index("## Appendix: methods")
        body = md[start:end].rstrip()
        assert body.endswith(f"Reproduce: `{section.command}`"), section.title


def test_documents_work_without_a_header_and_with_an_empty_section(tmp_path: Path) -> None:
    sections = [Section("Only - a section with nothing in it", "python -m robustness experiment=x")]
    md = render_markdown("Title", sections, tmp_path)
    html = render_html("Title", sections, tmp_path)
    assert md.startswith("# Title\n\n## Only - a section with nothing in it") and "Reproduce: `python -m robustness experiment=x`" in md
    assert "<dl" not in html and '<section id="only">' in html and short_title(sections[0].title) == "Only"


def test_figures_are_shown_at_one_scale(synthetic_report: dict[str, Any]) -> None:
    import struct

    html = synthetic_report["html"].read_text(encoding="utf-8")
    import base64

    for data, width in re.findall(r'src="data:image/png;base64,([^"]+)" width="(\d+)"', html):
        png_width = struct.unpack(">I", base64.b64decode(data[:40])[16:20])[0]
        # 150 dpi files at 110 CSS pixels per inch: the same text size in every figure.
        assert int(width) == round(png_width * 110 / 150)
    assert len(re.findall(r'<img [^>]*width="\d+"', html)) == html.count("<img ")


def test_header_lines_keep_the_models_order_and_unknown_accuracy() -> None:
    header = ReportHeader("cifar10", [("base", 0.91234), ("rb", None)], "python -m robustness", 75.0, {"torch": "2.14"})
    assert dict(header.lines())["Models"] == "base (clean accuracy 0.9123), rb (accuracy unknown)"
    assert dict(header.lines())["Time"] == "1 min 15 s" and dict(header.lines())["Versions"] == "torch 2.14"
