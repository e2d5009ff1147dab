"""Open a page in headless Chromium and read back, from the page itself, what a reader would see.

:func:`inspect_page` copies the page, adds two scripts (one at the top of ``<head>`` that records
console errors, uncaught exceptions, failed loads and policy violations from the first moment;
one that measures the laid-out page after ``load``, with every ``<details>`` opened, and writes
its findings as JSON into the DOM), and runs Chromium's ``--dump-dom`` at a fixed window size.
No driver library: Chromium itself and the JSON it leaves in the DOM.

Debian's package is ``chromium``: ``apt-get install -y chromium``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

INSTALL = "install Chromium: apt-get update && apt-get install -y chromium (Debian's package), or set CHROMIUM=/path/to/chromium"
# CI sets this, so that a missing browser fails the run instead of skipping the test.
REQUIRE_ENV = "ROBUSTNESS_REQUIRE_BROWSER"

_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-extensions", "--mute-audio",
)

_RECORDER = """<script>
window.__reportErrors = [];
(function () {
  const record = (what) => window.__reportErrors.push(String(what).slice(0, 300));
  const original = console.error;
  console.error = function (...args) { record("console.error: " + args.map(String).join(" ")); return original.apply(console, args); };
  window.addEventListener("error", (event) => {
    const target = event.target && event.target !== window ? event.target : null;
    record(target ? "failed to load <" + target.tagName.toLowerCase() + "> " + String(target.src || target.href || "").slice(0, 80) : "uncaught: " + event.message);
  }, true);
  window.addEventListener("unhandledrejection", (event) => record("unhandled rejection: " + event.reason));
  document.addEventListener("securitypolicyviolation", (event) => record("policy violation: " + event.violatedDirective));
})();
</script>"""

_MEASURE = """<script>
window.addEventListener("load", () => {
  // Folded content counts too: a table that overflows once opened overflows.
  document.querySelectorAll("details").forEach((d) => { d.open = true; });
  const viewport = document.documentElement.clientWidth;
  const describe = (el) => el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") + (el.className && typeof el.className === "string" ? "." + el.className.trim().split(/\\s+/).join(".") : "");
  const overflowing = [];
  for (const el of document.body.querySelectorAll("*")) {
    if (el.tagName === "SCRIPT" || el.tagName === "STYLE") continue;
    const box = el.getBoundingClientRect();
    if (box.width === 0 && box.height === 0) continue;
    if (box.right > viewport + 0.5 || box.left < -0.5) overflowing.push(describe(el) + " spans " + Math.round(box.left) + ".." + Math.round(box.right) + " px");
    const style = getComputedStyle(el);
    if (["auto", "scroll", "hidden"].includes(style.overflowX) && el.scrollWidth > el.clientWidth + 1)
      overflowing.push(describe(el) + " hides " + (el.scrollWidth - el.clientWidth) + " px of its content");
  }
  const badges = [...document.querySelectorAll(".verdict")].map((el) => {
    const box = el.getBoundingClientRect(), style = getComputedStyle(el);
    return {text: el.textContent.trim(), left: box.left, right: box.right, width: box.width, height: box.height,
            visible: style.visibility === "visible" && style.display !== "none" && parseFloat(style.opacity) > 0};
  });
  const images = [...document.images].map((img) => ({alt: img.alt, complete: img.complete, naturalWidth: img.naturalWidth, shownWidth: img.getBoundingClientRect().width}));
  const out = document.createElement("script");
  out.type = "application/json";
  out.id = "__report_check";
  out.textContent = JSON.stringify({
    viewport: viewport, window: window.innerWidth, scrollWidth: document.documentElement.scrollWidth,
    overflowing: overflowing, badges: badges, images: images, errors: window.__reportErrors,
  });
  document.body.appendChild(out);
});
</script>"""

_RESULT = re.compile(r'<script type="application/json" id="__report_check">(.*?)</script>', re.S)


def find_chromium() -> str | None:
    """The Chromium binary: $CHROMIUM, else ``chromium`` (Debian) or ``chromium-browser`` on the PATH."""
    explicit = os.environ.get("CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(chromium: str, args: list[str], profile: Path, width: int, height: int, timeout: float) -> subprocess.CompletedProcess:
    command = [chromium, *_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def inspect_page(html: Path, width: int = 1280, height: int = 800, chromium: str | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """Lay ``html`` out at ``width`` x ``height`` and return what the page measured (see the module docstring).

    Keys: viewport (px), scrollWidth, overflowing (elements past the viewport or clipping their
    content), badges (each verdict badge's box and visibility), images (loaded or not),
    errors (console errors, uncaught exceptions, failed loads), stderr_console (Chromium's log of console messages).
    """
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError(INSTALL)
    with tempfile.TemporaryDirectory(prefix="report-browser-") as work:
        work_dir = Path(work)
        text = Path(html).read_text(encoding="utf-8")
        head = text.find("<head>")
        if head < 0 or "</body>" not in text:
            raise ValueError(f"{html} has no <head> or no </body>")
        head += len("<head>")
        instrumented = text[:head] + _RECORDER + text[head:]
        instrumented = instrumented.replace("</body>", _MEASURE + "</body>", 1)
        page = work_dir / Path(html).name
        page.write_text(instrumented, encoding="utf-8")
        # Links (CSV files) resolve beside the page, as they do beside the original.
        for sibling in Path(html).parent.iterdir():
            if sibling.name != page.name and not (work_dir / sibling.name).exists():
                (work_dir / sibling.name).symlink_to(sibling.resolve())
        done = _run(chromium, ["--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000", "--dump-dom", page.as_uri()],
                    work_dir / "profile", width, height, timeout)
    found = _RESULT.search(done.stdout)
    if found is None:
        raise RuntimeError(f"Chromium returned no measurement (exit {done.returncode}); its log ends:\n{done.stderr[-2000:]}")
    result = json.loads(found.group(1))
    result["stderr_console"] = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    # Uncaught exceptions reach Chromium's log as "Uncaught ..." even where no script hook saw them.
    result["errors"] += [line for line in result["stderr_console"] if '"Uncaught' in line and not any("uncaught" in e for e in result["errors"])]
    return result


def problems(found: dict[str, Any]) -> list[str]:
    """Everything a reader at this width would trip over: empty when the page is fine."""
    out: list[str] = []
    if found["scrollWidth"] > found["viewport"]:
        out.append(f"the page scrolls horizontally: {found['scrollWidth']} px wide in a {found['viewport']} px viewport")
    out += [f"overflow: {item}" for item in found["overflowing"]]
    for badge in found["badges"]:
        if not (badge["visible"] and badge["width"] > 0 and badge["height"] > 0 and badge["left"] >= 0 and badge["right"] <= found["viewport"]):
            out.append(f"verdict badge '{badge['text']}' is not visible within the viewport ({badge['left']:.0f}..{badge['right']:.0f} px)")
    out += [f"image '{image['alt']}' did not load" for image in found["images"] if not (image["complete"] and image["naturalWidth"] > 0)]
    out += [f"console: {error}" for error in found["errors"]]
    return out


# Headless Chromium paints a scrolled page blank in --screenshot, so "scrolled to #anchor" is shown
# by folding away everything above the anchor: the same layout, starting where the anchor starts.
_FROM_ANCHOR = """<script>
document.addEventListener("DOMContentLoaded", () => {
  const target = document.getElementById(%s);
  if (!target) return;
  let node = target;
  while (node && node !== document.body) {
    for (let sibling = node.previousElementSibling; sibling; sibling = sibling.previousElementSibling) sibling.style.display = "none";
    node = node.parentElement;
  }
});
</script>"""


def screenshot(html: Path, out_png: Path, anchor: str = "", width: int = 1280, height: int = 800, chromium: str | None = None, timeout: float = 120.0) -> Path:
    """A ``width`` x ``height`` screenshot of ``html``, from its top or from the element ``#anchor``."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise FileNotFoundError(INSTALL)
    with tempfile.TemporaryDirectory(prefix="report-shot-") as work:
        page = Path(work) / "page.html"
        text = Path(html).read_text(encoding="utf-8")
        page.write_text(text.replace("</head>", _FROM_ANCHOR % json.dumps(anchor) + "</head>", 1) if anchor else text, encoding="utf-8")
        done = _run(chromium, ["--virtual-time-budget=15000", f"--screenshot={Path(out_png).resolve()}", page.as_uri()], Path(work) / "profile", width, height, timeout)
    if not Path(out_png).is_file():
        raise RuntimeError(f"Chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}")
    return Path(out_png)
