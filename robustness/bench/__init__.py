"""Benchmarks: each module here exposes ``run() -> BenchRows``; ``python -m robustness.bench`` prints them.

Performance targets live here, never in timed tests: every row compares two things measured
side by side in the same process, so the ratios hold on a shared, noisy machine.
"""

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch


class BenchRows(list):
    """A benchmark's rows plus the lines printed under its table: one legend line per column
    (what the column holds), then one line listing each target as met or missed."""

    def __init__(self, rows: Sequence[dict[str, Any]], legend: Mapping[str, str], targets: Sequence[str]) -> None:
        super().__init__(rows)
        columns = list(dict.fromkeys(key for row in rows for key in row))
        unexplained = [column for column in columns if column not in legend]
        if unexplained:
            raise KeyError(f"benchmark columns without a legend line: {', '.join(unexplained)}")
        self.notes = [f"- {column}: {legend[column]}" for column in columns]
        self.notes.append("targets: " + ("; ".join(targets) if targets else "none set for this table"))


def verdict(met: bool) -> str:
    """How a target line reads: 'met' or 'missed'."""
    return "met" if met else "missed"


@contextmanager
def single_thread(enabled: bool = True) -> Iterator[None]:
    """Run CPU benchmarks on one thread: on a shared 2-core machine a second thread per process
    mostly measures contention, and one thread makes side-by-side ratios repeatable."""
    threads = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
