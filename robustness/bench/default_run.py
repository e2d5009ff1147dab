"""The default run, timed as a new user meets it: ``python -m robustness`` from an empty store.

It runs in a fresh temporary folder (its own store, outputs and W&B offline files), as a
separate process, and reads where the seconds went from its log: each report section's share
(the sections' own ``[report i/n]`` lines) and each variant trained on the way.

Columns:

- ``row``: the whole run, one report section, or one training inside a section;
- ``seconds``: wall-clock seconds (a section's include the variants it trained first);
- ``share``: that part of the whole run.

Target (issue 17): the whole run within 180 s on 2 cores. Wall-clock on a shared machine is
noisy, so the row also gives the process's CPU seconds (both cores count).
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from robustness.bench import BenchRows, verdict

TARGET_SECONDS = 180.0
_STAMP = r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]"
_SECTION = re.compile(_STAMP + r".*\[report (\d+)/(\d+)\] (\S+) \(elapsed")
_TRAINED = re.compile(_STAMP + r".*trained '([^']+)': test accuracy")
_TRAINING = re.compile(_STAMP + r".*variant '([^']+)' is not in the store")


def _time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def profile(log: str, total: float) -> list[dict]:
    """Rows of seconds per top-level report section and per training, read off a default run's log."""
    rows = []
    sections: list[tuple[float, str]] = []
    started: dict[str, float] = {}
    end = None
    for line in log.splitlines():
        if m := _SECTION.search(line):
            if sections and m.group(3) != sections[0][1].split()[0].split("/")[1]:
                continue  # a nested report's own sections (fig4_cure's) are inside their parent's
            sections.append((_time(m.group(1)), f"{m.group(2)}/{m.group(3)} {m.group(4)}"))
        elif m := _TRAINING.search(line):
            started[m.group(2)] = _time(m.group(1))
        elif m := _TRAINED.search(line):
            name = m.group(2)
            if name in started:  # one row per training: a later echo of the same line has no start of its own
                rows.append({"row": f"  training '{name}'", "seconds": round(_time(m.group(1)) - started.pop(name), 1)})
        if m := re.match(_STAMP, line):
            end = _time(m.group(1))
    out = []
    for i, (when, name) in enumerate(sections):
        until = sections[i + 1][0] if i + 1 < len(sections) else (end or when)
        out.append({"row": f"section {name}", "seconds": round(until - when, 1)})
    for row in out + rows:
        row["share"] = f"{row['seconds'] / total:.0%}" if total > 0 else "n/a"
    return out + rows


def run() -> BenchRows:
    with tempfile.TemporaryDirectory(prefix="robustness-default-run-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "ROBUSTNESS_ARTIFACTS_DIR": str(work / "artifacts"), "ROBUSTNESS_OUTPUT_DIR": str(work / "outputs"),
               "WANDB_MODE": "offline", "WANDB_DIR": str(work)}
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        completed = subprocess.run([sys.executable, "-m", "robustness"], cwd=work, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        log = completed.stdout + completed.stderr
        if completed.returncode != 0:
            raise RuntimeError(f"the default run failed (exit {completed.returncode}):\n" + "\n".join(log.splitlines()[-20:]))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rows = [{"row": "python -m robustness, empty store", "seconds": round(seconds, 1), "share": "100%", "cpu seconds": round(cpu, 1)}]
    rows += profile(log, seconds)
    legend = {
        "row": "the whole run, one report section, or one training inside a section",
        "seconds": "wall-clock seconds (a section's include the variants it trained first)",
        "share": "that part of the whole run",
        "cpu seconds": "user + system CPU time of the run's process (both cores count)",
    }
    return BenchRows(rows, legend, [f"default run <= {TARGET_SECONDS:.0f} s: {verdict(seconds <= TARGET_SECONDS)} ({seconds:.0f} s)"])
