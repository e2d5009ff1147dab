"""Cost of a CURE training step, measured side by side with a plain step and a reference step.

Rows per model (random weights and images: the cost does not depend on training):

- ``plain``: cross-entropy forward + backward, the unit of cost;
- ``cure batch`` / ``cure running``: this framework's step (``CURE.training_loss`` + backward)
  with each ``bn_mode``; ``cure batch f=0.25`` computes the penalty on a quarter of the batch
  (smallcnn, and every model on a GPU);
- ``reference``: the same penalty computed the way the public CURE code structures it: a
  separate forward/backward for ``z`` (its parameter gradients thrown away), two more forwards
  (at ``x + h z`` and at ``x``, evaluation mode), the gradient of their loss difference with
  ``create_graph``, then the usual cross-entropy forward and one backward of the total.

The floor (see ``robustness.training.cure``): per convolution or linear layer an exact step
takes 6 matrix products per evaluation point (forward, input gradient, two in the second-order
backward, two in the forward graph's backward), a plain step 3. So ``cure batch`` (2 points, the
training forward shared) is at least 12/3 = 4x plain; ``cure running`` with batch-norm adds a
separate training forward and its backward (15/3 = 5x); the reference takes 18/3 = 6x; with the
penalty on a quarter of the batch, 3 + 12/4 = 6 products: 2x. The ``floor`` column gives these
counts; the part columns give the measured time of each part of the CURE steps, so that the
gap between ``x plain`` and ``floor`` can be traced to a part. Memory has a count but no floor:
``cure batch`` keeps 3 activation-sized tensors per convolution/batch-norm/ReLU layer and point
for its backward, a plain step 2 per layer (3x), while the peaks also hold gradients and the
backward's buffers. The legend and the targets are printed under the table.

How: on a GPU, wall time (median of interleaved repeats) and the CUDA allocator's peak. On a
CPU, one intra-op thread and the process's CPU time, so that the numbers measure work, not the
neighbours sharing the cores or idle threads spinning; peak memory replays the profiler's
allocation events in time order. smallcnn steps are timed over interleaved repeats; a CPU
resnet18 step takes seconds, so each is measured once, after a warm-up, in the same pass as its
memory (parts included, so they carry the profiler's overhead there).

Targets (issue 17.2), for ``cure batch`` at fraction 1 on both models: at most 0.7x the
reference, at most 4x plain, peak memory at most 3.5x plain. On a GPU the rows also cover
resnet18 at 64x64, batch 128, with training throughput (images/s, optimiser step included).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustness.bench import BenchRows, single_thread, verdict
from robustness.data.base import DatasetInfo
from robustness.data.digits import DigitsDataModule
from robustness.models.resnet import resnet18
from robustness.models.smallcnn import smallcnn
from robustness.training.cure import CURE, sign_direction

LAM, H = 1.0, 0.5
CIFAR_LIKE = DatasetInfo("random32", 10, (3, 32, 32), tuple(str(i) for i in range(10)), (0.5,) * 3, (0.25,) * 3)
TINY_LIKE = DatasetInfo("random64", 200, (3, 64, 64), tuple(str(i) for i in range(200)), (0.5,) * 3, (0.25,) * 3)

Step = Callable[[nn.Module, Tensor, Tensor], None]


def plain_step(model: nn.Module, x: Tensor, y: Tensor) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


class PartClock:
    """Times the parts of the CURE steps it is attached to: ``seconds[part]`` holds one entry
    per step (a part that runs twice in a step, such as the backward, adds up)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.clock = _clock(device)
        self.seconds: dict[str, list[float]] = {}
        self._current: dict[str, float] = {}

    @contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        _sync(self.device)
        start = self.clock()
        try:
            yield
        finally:
            _sync(self.device)
            self._current[part] = self._current.get(part, 0.0) + self.clock() - start

    def end_step(self) -> None:
        for part, seconds in self._current.items():
            self.seconds.setdefault(part, []).append(seconds)
        self._current = {}

    def reset(self) -> None:
        self.seconds, self._current = {}, {}

    def medians(self) -> dict[str, float]:
        return {part: statistics.median(values) for part, values in self.seconds.items()}


def cure_step(cure: CURE, parts: PartClock | None = None) -> Step:
    if parts is not None:
        cure.phase_timer = parts

    def step(model: nn.Module, x: Tensor, y: Tensor) -> None:
        model.zero_grad(set_to_none=True)
        loss = cure.training_loss(model, x, y, epoch=0).loss
        with parts("backward of the total") if parts is not None else nullcontext():
            loss.backward()
        if parts is not None:
            parts.end_step()

    return step


def reference_step(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """The public CURE code's structure, with this framework's per-example squared penalty."""
    model.zero_grad(set_to_none=True)
    model.eval()
    x_z = x.detach().clone().requires_grad_(True)
    F.cross_entropy(model(x_z), y, reduction="sum").backward()  # fills parameter gradients too
    z = sign_direction(x_z.grad)
    model.zero_grad(set_to_none=True)
    x_req = x.detach().clone().requires_grad_(True)
    loss_shifted = F.cross_entropy(model(x_req + H * z), y, reduction="sum")
    loss_clean = F.cross_entropy(model(x_req), y, reduction="sum")
    (difference,) = torch.autograd.grad(loss_shifted - loss_clean, x_req, create_graph=True)
    penalty = difference.flatten(1).pow(2).sum(dim=1).mean()
    model.train()
    loss = F.cross_entropy(model(x), y) + LAM * penalty
    loss.backward()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _clock(device: torch.device) -> Callable[[], float]:
    return time.perf_counter if device.type == "cuda" else time.process_time


@contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """The profiler's C++ side logs its start and stop to file descriptor 2; keep the table clean."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def measure_once(step: Step, model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(seconds, peak bytes above the memory allocated before the step) of one step."""
    model.zero_grad(set_to_none=True)
    clock = _clock(x.device)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = clock()
        step(model, x, y)
        torch.cuda.synchronize()
        return clock() - start, float(torch.cuda.max_memory_allocated() - before)
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        start = clock()
        step(model, x, y)
        seconds = clock() - start
    # Each event's own (self) allocations minus frees, replayed in time order.
    current = peak = 0
    for event in sorted(prof.events(), key=lambda event: event.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return seconds, float(peak)


def median_times(steps: dict[str, Step], model: nn.Module, x: Tensor, y: Tensor, repeat: int) -> dict[str, float]:
    """Median seconds per step; repeats interleave the steps so that drift hits them alike."""
    clock = _clock(x.device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeat):
        for name, step in steps.items():
            _sync(x.device)
            start = clock()
            step(model, x, y)
            _sync(x.device)
            times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _throughput(step: Step, model: nn.Module, x: Tensor, y: Tensor, steps: int) -> float:
    """Training images per second (wall time), optimiser step included."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    step(model, x, y)
    optimizer.step()
    _sync(x.device)
    start = time.perf_counter()
    for _ in range(steps):
        step(model, x, y)
        optimizer.step()
    _sync(x.device)
    return steps * len(x) / (time.perf_counter() - start)


# Matrix products per layer of a step over a plain step's (see the module docstring).
FLOOR = {"plain": 1.0, "cure batch": 4.0, "cure running": 5.0, "reference": 6.0, "cure batch f=0.25": 2.0}
# Short column names for the parts the CURE step times.
PART_COLUMNS = {
    "training forward and input gradient at x": "fwd+grad x",
    "forward and input gradient at x": "pen fwd+grad x",
    "direction z": "z",
    "forward and input gradient at x + h z": "fwd+grad x+hz",
    "penalty from the gradients": "penalty",
    "training forward": "train fwd",
    "backward of the total": "backward",
}
LEGEND = {
    "row": "model, input size and batch, then the step",
    "ms/step": "time of one step (CPU time on one thread, or GPU wall time), zero_grad included",
    "x plain": "ms/step over the plain step's",
    "floor": "the least x plain an exact step can take, counted in matrix products per layer",
    "x reference": "ms/step over the public code's structure's",
    "peak MB": "the step's peak memory above what was allocated before it",
    "mem x plain": "peak MB over the plain step's",
    **{f"{column} ms": f"part of the CURE step: {part}" for part, column in PART_COLUMNS.items()},
    "train images/s": "training throughput with an SGD step (GPU only)",
}
TARGETS = (("x reference", 0.7), ("x plain", 4.0), ("mem x plain", 3.5))
# The least ``cure batch`` can reach in the targets' columns, in matrix products (memory: see the docstring).
TARGET_FLOORS = {"x plain": FLOOR["cure batch"], "x reference": FLOOR["cure batch"] / FLOOR["reference"]}


def _model_rows(name: str, model: nn.Module, x: Tensor, y: Tensor, repeat: int, with_fraction: bool, throughput_steps: int) -> list[dict[str, Any]]:
    model.train()
    parts = {mode: PartClock(x.device) for mode in ("cure batch", "cure running", "cure batch f=0.25")}
    steps: dict[str, Step] = {
        "plain": plain_step,
        "cure batch": cure_step(CURE(lam=LAM, h=H, bn_mode="batch"), parts["cure batch"]),
        "cure running": cure_step(CURE(lam=LAM, h=H, bn_mode="running"), parts["cure running"]),
        "reference": reference_step,
    }
    if with_fraction:
        steps["cure batch f=0.25"] = cure_step(CURE(lam=LAM, h=H, bn_mode="batch", fraction=0.25), parts["cure batch f=0.25"])
    if repeat > 1:
        # The memory pass doubles as every step's warm-up; the times come from the repeats.
        peaks = {step_name: measure_once(step, model, x, y)[1] for step_name, step in steps.items()}
        for clock in parts.values():
            clock.reset()
        seconds = median_times(steps, model, x, y, repeat)
    else:
        # The plain and CURE steps between them use every kernel shape the others use.
        steps["plain"](model, x, y)
        steps["cure batch"](model, x, y)
        for clock in parts.values():
            clock.reset()
        measured = {step_name: measure_once(step, model, x, y) for step_name, step in steps.items()}
        seconds = {step_name: value[0] for step_name, value in measured.items()}
        peaks = {step_name: value[1] for step_name, value in measured.items()}
    rows = []
    for step_name in steps:
        row: dict[str, Any] = {
            "row": f"{name} {step_name}",
            "ms/step": 1e3 * seconds[step_name],
            "x plain": seconds[step_name] / seconds["plain"],
            "floor": FLOOR[step_name],
            "x reference": seconds[step_name] / seconds["reference"],
            "peak MB": peaks[step_name] / 2**20,
            "mem x plain": peaks[step_name] / peaks["plain"],
        }
        if step_name in parts:
            medians = parts[step_name].medians()
            row.update({f"{column} ms": 1e3 * medians[part] for part, column in PART_COLUMNS.items() if part in medians})
        if throughput_steps and step_name in ("plain", "cure batch", "cure running"):
            row["train images/s"] = _throughput(steps[step_name], model, x, y, throughput_steps)
        rows.append(row)
    return rows


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """Each target of the ``cure batch`` rows (fraction 1), met or missed."""
    lines = []
    for row in rows:
        if not row["row"].endswith(" cure batch"):
            continue
        model = row["row"][: -len(" cure batch")]
        for column, limit in TARGETS:
            met = row[column] <= limit
            floor = "" if met or column not in TARGET_FLOORS else f" (floor {TARGET_FLOORS[column]:.2f})"
            lines.append(f"{model} {column} {row[column]:.2f} <= {limit}: {verdict(met)}{floor}")
    return lines


def run() -> BenchRows:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    generator = torch.Generator().manual_seed(0)
    cases: list[tuple[str, nn.Module, DatasetInfo, int]] = [
        ("smallcnn 8x8 b64", smallcnn(DigitsDataModule.info), DigitsDataModule.info, 64),
        ("resnet18 32x32 b64", resnet18(CIFAR_LIKE), CIFAR_LIKE, 64),
    ]
    if gpu:
        cases.append(("resnet18 64x64 b128", resnet18(TINY_LIKE), TINY_LIKE, 128))
    with single_thread(enabled=not gpu):
        rows: list[dict[str, Any]] = []
        for name, model, info, batch in cases:
            x = torch.rand(batch, *info.image_shape, generator=generator).to(device)
            y = torch.randint(0, info.num_classes, (batch,), generator=generator).to(device)
            small = info.image_shape[-1] <= 8
            repeat = 20 if gpu else (15 if small else 1)
            throughput_steps = 20 if gpu and not small else 0
            rows.extend(_model_rows(name, model.to(device), x, y, repeat, small or gpu, throughput_steps))
        return BenchRows(rows, LEGEND, targets(rows))
