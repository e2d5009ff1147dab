"""Benchmarks: each module here exposes ``run() -> list[dict]``; ``python -m robustness.bench`` prints them.

Performance targets live here, never in timed tests: every row compares two things measured
side by side in the same process, so the ratios hold on a shared, noisy machine.
"""
