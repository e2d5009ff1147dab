"""Benchmarks: each module here exposes ``run() -> list[dict]``; ``python -m robustness.bench`` prints them.

Performance targets live here, never in timed tests: every row compares two things measured
side by side in the same process, so the ratios hold on a shared, noisy machine.
"""

from contextlib import contextmanager
from typing import Iterator

import torch


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
