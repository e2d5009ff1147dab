"""What a training step costs under each regularizer, as a multiple of a plain step, measured side by side.

A plain step is the cross-entropy's forward and backward (``Regularizer()``, variant ``base``).
Each regularizer's step is its ``training_loss`` and the backward of that loss, on the same
model (a fresh copy of the architecture per regularizer, from one initialisation) and the same
batch. Steps are timed in interleaved rounds, each round one plain step and one step of every
regularizer in turn, so that a slow spell of a shared machine hits them alike; the ratio of a
round is the regularizer's time over that round's plain time. The cost is the median ratio over
the rounds, with a seeded percentile-bootstrap 95% interval over rounds (robustness/stats.py).

Time is the process's CPU time on one intra-op thread on a CPU (work, not the neighbours'
share of the cores), wall time after a synchronise on a GPU. One warm-up step of each comes
first. A one-off cost outside the steps (the adversarial fine-tuning's attacked set, built once
in ``setup``) is not a per-step cost and is not counted.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from robustness.errors import InputError
from robustness.stats import Interval, bootstrap_statistic
from robustness.training.regularizer import Regularizer


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _clock(device: torch.device) -> Callable[[], float]:
    if device.type == "cuda":
        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return now
    return time.process_time


def _step(regularizer: Regularizer, model: nn.Module, x: Tensor, y: Tensor) -> None:
    model.zero_grad(set_to_none=True)
    regularizer.training_loss(model, x, y, epoch=0).loss.backward()


def step_costs(
    regularizers: Mapping[str, Regularizer], model: nn.Module, x: Tensor, y: Tensor, *, rounds: int = 7, seed: int = 0
) -> dict[str, Interval]:
    """Each regularizer's step time over a plain step's: the median over ``rounds`` and its
    bootstrap interval (see the module docstring). ``model`` is copied, not trained."""
    if int(rounds) < 2:
        raise InputError(f"rounds must be at least 2 for an interval, got {rounds}", "e.g. rounds=7")
    if len(x) == 0 or len(x) != len(y):
        raise InputError(f"a step needs a non-empty batch with one label per image, got {len(x)} images and {len(y)} labels")
    device = x.device
    plain = Regularizer()
    copies = {name: copy.deepcopy(model).train() for name in ["plain", *regularizers]}
    runners = {"plain": plain, **regularizers}
    clock = _clock(device)
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    with _one_thread(device), torch.enable_grad():
        for name, regularizer in runners.items():
            _step(regularizer, copies[name], x, y)  # warm-up
        for _ in range(int(rounds)):
            for name, regularizer in runners.items():
                start = clock()
                _step(regularizer, copies[name], x, y)
                seconds[name].append(clock() - start)
    plain_times = np.asarray(seconds["plain"])
    return {name: bootstrap_statistic(np.asarray(seconds[name]) / plain_times, "median", seed=seed) for name in regularizers}
