"""Plane-grid benchmark: classifying a plane grid against plain batched inference.

Rows (one per model, both timings measured side by side in one run, same model, same number of
points, same batch size):
- ``grid_points_per_s``: :func:`classify_plane` on a ``side x side`` grid, which builds each
  batch of points ``x0 + a u + b v`` on the fly;
- ``plain_points_per_s``: :func:`predict` on the same number of images already in memory;
- ``grid_over_plain`` = grid / plain throughput, each the best of ``REPEATS`` interleaved runs.
  Target: >= 0.90 (building the points costs one small matrix product per batch);
- ``plain_spread``: slowest / fastest plain run; far above 1 means a busy machine, and then the
  ratio is noise-limited;
- ``copy_points_per_s``: the same grid on :func:`inference_copy`'s copy (what the probes
  classify: batch norm folded, channels-last, a frozen graph on CPU), ``copy_over_grid`` its
  throughput over the model's own grid, ``copy_label_mismatches`` the grid points whose label
  differs (round-off can flip a point that lies on a boundary).

Models: ``smallcnn`` on 8x8 digits and ``resnet18`` on 32x32 colour images, untrained (the cost
of a forward pass does not depend on the weights). Runs on CUDA when present, else the CPU,
in about a minute on two idle CPU cores.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import Tensor, nn

from robustness.bench import BenchRows, verdict
from robustness.data.base import DatasetInfo
from robustness.data.digits import DigitsDataModule
from robustness.geometry.planes import classify_plane, direction_pair
from robustness.models.resnet import resnet18
from robustness.models.smallcnn import smallcnn
from robustness.tensors import inference_copy, predict

COLOUR_32 = DatasetInfo(
    name="colour32", num_classes=10, image_shape=(3, 32, 32), class_names=tuple(str(i) for i in range(10)),
    mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
)
REPEATS = 5


def _timed(fn: Callable[[], Tensor], device: torch.device) -> tuple[Tensor, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def _row(name: str, model: nn.Module, info: DatasetInfo, side: int, batch_size: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = model.to(device).eval()
    x0 = torch.rand(info.image_shape, device=device)
    u, v = (d.to(device) for d in direction_pair(info.image_shape, seed=0))
    coords = torch.linspace(-2.0, 2.0, side, device=device)
    points = (x0 + coords.repeat_interleave(side)[:, None, None, None] * u + coords.repeat(side)[:, None, None, None] * v).contiguous()

    grid = lambda: classify_plane(model, x0, u, v, coords, coords, batch_size=batch_size)  # noqa: E731
    fast = inference_copy(model, x0.unsqueeze(0))
    copied = lambda: classify_plane(fast, x0, u, v, coords, coords, batch_size=batch_size)  # noqa: E731
    plain = lambda: predict(model, points, batch_size=batch_size)  # noqa: E731
    predict(model, points[:batch_size], batch_size=batch_size)  # warm-up (allocator, kernels)
    runs = {"grid": grid, "plain": plain, "copy": copied}
    times: dict[str, list[float]] = {what: [] for what in runs}
    outputs: dict[str, Tensor] = {}
    for repeat in range(REPEATS):
        # Interleaved, alternating which goes first, so that load changes hit both alike.
        order = ("plain", "grid", "copy") if repeat % 2 == 0 else ("copy", "grid", "plain")
        for what in order:
            outputs[what], seconds = _timed(runs[what], device)
            times[what].append(seconds)
    # Same labels both ways, so the two timings did the same work.
    assert torch.equal(outputs["grid"].flatten(), outputs["plain"]), "grid and plain inference disagree"
    copy_mismatch = int((outputs["copy"] != outputs["grid"]).sum())
    grid_times, plain_times = times["grid"], times["plain"]
    n = side * side
    grid_rate, plain_rate = n / min(grid_times), n / min(plain_times)
    return {
        "row": name,
        "device": device.type,
        "points": n,
        "batch_size": batch_size,
        "grid_points_per_s": round(grid_rate, 1),
        "plain_points_per_s": round(plain_rate, 1),
        "grid_over_plain": round(grid_rate / plain_rate, 3),
        # Slowest over fastest repeat of the plain pass: how noisy the machine was during the run.
        "plain_spread": round(max(plain_times) / min(plain_times), 2),
        "copy_points_per_s": round(n / min(times["copy"]), 1),
        "copy_over_grid": round(min(grid_times) / min(times["copy"]), 3),
        "copy_label_mismatches": copy_mismatch,
    }


LEGEND = {
    "row": "model and input size",
    "device": "where it ran",
    "points": "grid points classified per run",
    "batch_size": "points per forward",
    "grid_points_per_s": "classify_plane on the model: points built batch by batch as x0 + a u + b v",
    "plain_points_per_s": "predict on the same number of images already in memory",
    "grid_over_plain": "grid over plain throughput, each the best of the interleaved runs",
    "plain_spread": "slowest over fastest plain run: far above 1 means a busy machine (the ratio is then noise-limited)",
    "copy_points_per_s": "the same grid on inference_copy's copy, as the probes classify it",
    "copy_over_grid": "the copy's throughput over the model's own grid",
    "copy_label_mismatches": "grid points whose label differs between copy and model (round-off on a boundary)",
}
GRID_TARGET = 0.90


def run() -> BenchRows:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    big = device.type == "cuda"
    with torch.no_grad():
        rows = [
            _row("smallcnn digits 8x8", smallcnn(DigitsDataModule.info), DigitsDataModule.info, 201 if big else 101, 1024, device),
            _row("resnet18 32x32", resnet18(COLOUR_32), COLOUR_32, 201 if big else 15, 1024 if big else 128, device),
        ]
    targets = [f"{row['row']} grid_over_plain >= {GRID_TARGET:g}: {verdict(row['grid_over_plain'] >= GRID_TARGET)} ({row['grid_over_plain']:g})" for row in rows]
    return BenchRows(rows, LEGEND, targets)

