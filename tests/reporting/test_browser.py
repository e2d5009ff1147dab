"""The reduced report's report.html in headless Chromium at 1280 x 800: read back from the page itself.

Needs Debian's ``chromium``. Without it the test is skipped with the command that installs it,
unless ROBUSTNESS_REQUIRE_BROWSER=1 (CI sets it in .ci/run), where a missing browser fails.
The second test shows the checks are not empty: each fault planted in a copy of the page is found.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import browser


# Session-scoped and named first, so that a missing browser skips before the report is drawn.
@pytest.fixture(scope="session")
def chromium() -> str:
    found = browser.find_chromium()
    if found is None:
        if os.environ.get(browser.REQUIRE_ENV) == "1":
            pytest.fail(f"no Chromium, and {browser.REQUIRE_ENV}=1 requires it: {browser.INSTALL}")
        pytest.skip(f"no Chromium for the browser test: {browser.INSTALL}")
    return found


def test_the_report_reads_at_1280_pixels(chromium: str, synthetic_report: dict[str, Any]) -> None:
    found = browser.inspect_page(synthetic_report["html"], 1280, 800, chromium)
    print(f"viewport {found['viewport']} px (window 1280 px), page {found['scrollWidth']} px wide; "
          f"{len(found['badges'])} verdict badges, {len(found['images'])} images; {len(found['errors'])} console errors")
    assert browser.problems(found) == []
    scorecard = synthetic_report["sections"][0].artefacts[0]
    assert [b["text"] for b in found["badges"]] == [row["Verdict"] for row in scorecard.display] + [row["Verdict (median)"] for row in scorecard.details]
    figures = sum(a.kind == "figure" for s in synthetic_report["sections"] for a in s.artefacts)
    assert len(found["images"]) == figures and all(image["shownWidth"] > 100 for image in found["images"])


def _planted(html: Path, tmp_path: Path, name: str, old: str, new: str) -> Path:
    text = html.read_text(encoding="utf-8")
    assert old in text, f"cannot plant {name}"
    out = tmp_path / f"{name}.html"
    out.write_text(text.replace(old, new, 1), encoding="utf-8")
    return out


def test_each_planted_fault_is_found(chromium: str, synthetic_report: dict[str, Any], tmp_path: Path) -> None:
    html = synthetic_report["html"]
    faults = {
        # A table that no longer wraps its text: the page scrolls sideways.
        "overflow": ("th, td {", "th, td { white-space: nowrap !important; min-width: 15rem; ", "the page scrolls horizontally"),
        # A wide table scrolling inside its own box still hides columns from the reader.
        "clipped": (".table { max-width: 100%; }", ".table { max-width: 100%; overflow-x: auto; } table { min-width: 1500px; }", "hides"),
        "badge": (".verdict {", ".verdict { position: relative; left: 1400px; ", "verdict badge"),
        "image": ("src=\"data:image/png;base64,", "src=\"data:image/png;base64,AAAA", "did not load"),
        "console": ("</body>", "<script>console.error('planted');</script></body>", "console.error: planted"),
        "exception": ("</body>", "<script>undefinedFunction();</script></body>", "uncaught"),
    }
    for name, (old, new, expected) in faults.items():
        found = browser.problems(browser.inspect_page(_planted(html, tmp_path, name, old, new), 1280, 800, chromium))
        assert any(expected in problem for problem in found), f"{name}: {found[:5]}"
