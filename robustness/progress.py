"""The one way progress reaches the user: log records of the ``robustness`` logger.

Hydra sends them to the console and to the run's log file, so what a user watched scroll by is
also what the log keeps. A reporter speaks at most every ``every_s`` seconds, and always on
completion, so a long loop writes a handful of lines rather than one per item.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

log = logging.getLogger("robustness")

Progress = Callable[[int, int, str], None]


def progress_reporter(name: str, every_s: float = 5.0) -> Progress:
    """``report(done, total, what)`` for one probe or stage."""
    state = {"last": 0.0}

    def report(done: int, total: int, what: str = "") -> None:
        now = time.monotonic()
        if done >= total or now - state["last"] >= every_s:
            state["last"] = now
            log.info("[%s] %s %d/%d", name, what, done, total)

    return report


def stage_message(text: str, *args: object) -> None:
    """A line for the start or end of a stage."""
    log.info(text, *args)
