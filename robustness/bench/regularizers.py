"""Cost of a training step of every regularizer, as multiples of a plain step, side by side.

Rows per model (random weights and images: the cost does not depend on training), each
regularizer built with its defaults (the papers' CIFAR-10 settings, l-inf eps 8/255):

- ``plain``: cross-entropy forward + backward, the unit of cost;
- ``pgd``: PGD training (7 steps); ``fast_adversarial``: one step from a random start;
  ``trades``: 10 steps of the KL search, then a clean and an adversarial training forward;
- ``grad_align``: FGSM, the training forward, and two input gradients, one differentiated again;
- ``llr``: 10 steps of the linearity search, then the clean gradient (differentiated again) and
  a forward at ``x + delta``;
- ``input_gradient_norm``, ``jacobian`` (one projection), ``cure``: one training forward whose
  input gradient (or logit Jacobian product) is differentiated again; CURE adds a second point.

How (as ``robustness.bench.cure``): on a GPU, wall time (median of interleaved repeats) and the
CUDA allocator's peak; on a CPU, one intra-op thread and the process's CPU time, peak memory
from the profiler's allocation events. smallcnn steps are timed over interleaved repeats; a CPU
resnet18 step takes seconds, so each is measured once, after a warm-up, in the same pass as its
memory. No targets: the table is the comparison issue 31 asks for.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from robustness.bench import BenchRows, single_thread
from robustness.bench.cure import CIFAR_LIKE, Step, measure_once, median_times, plain_step
from robustness.data.base import DatasetInfo
from robustness.data.digits import DigitsDataModule
from robustness.models.resnet import resnet18
from robustness.models.smallcnn import smallcnn
from robustness.registry import build

REGULARIZERS = ("pgd", "fast_adversarial", "trades", "grad_align", "llr", "input_gradient_norm", "jacobian", "cure")

LEGEND = {
    "row": "model, input size and batch, then the regularizer (its defaults)",
    "ms/step": "time of one step (CPU time on one thread, or GPU wall time), zero_grad included",
    "x plain": "ms/step over the plain step's",
    "peak MB": "the step's peak memory above what was allocated before it",
    "mem x plain": "peak MB over the plain step's",
}


def regularizer_step(name: str) -> Step:
    regularizer = build("regularizer", {"name": name})

    def step(model: nn.Module, x: Tensor, y: Tensor) -> None:
        model.zero_grad(set_to_none=True)
        regularizer.training_loss(model, x, y, epoch=0).loss.backward()

    return step


def _model_rows(name: str, model: nn.Module, x: Tensor, y: Tensor, repeat: int) -> list[dict[str, Any]]:
    model.train()
    steps: dict[str, Step] = {"plain": plain_step, **{regularizer: regularizer_step(regularizer) for regularizer in REGULARIZERS}}
    if repeat > 1:
        # The memory pass doubles as every step's warm-up; the times come from the repeats.
        peaks = {step_name: measure_once(step, model, x, y)[1] for step_name, step in steps.items()}
        seconds = median_times(steps, model, x, y, repeat)
    else:
        # Between them these two run every kernel shape the others use (forward, backward, double backward).
        steps["plain"](model, x, y)
        steps["llr"](model, x, y)
        measured = {step_name: measure_once(step, model, x, y) for step_name, step in steps.items()}
        seconds = {step_name: value[0] for step_name, value in measured.items()}
        peaks = {step_name: value[1] for step_name, value in measured.items()}
    return [
        {
            "row": f"{name} {step_name}",
            "ms/step": 1e3 * seconds[step_name],
            "x plain": seconds[step_name] / seconds["plain"],
            "peak MB": peaks[step_name] / 2**20,
            "mem x plain": peaks[step_name] / peaks["plain"],
        }
        for step_name in steps
    ]


def run(models: tuple[str, ...] = ("smallcnn", "resnet18")) -> BenchRows:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    generator = torch.Generator().manual_seed(0)
    builders: dict[str, tuple[str, Callable[[DatasetInfo], nn.Module], DatasetInfo]] = {
        "smallcnn": ("smallcnn 8x8 b64", smallcnn, DigitsDataModule.info),
        "resnet18": ("resnet18 32x32 b64", resnet18, CIFAR_LIKE),
    }
    with single_thread(enabled=not gpu):
        rows: list[dict[str, Any]] = []
        for key in models:
            label, builder, info = builders[key]
            torch.manual_seed(0)
            model = builder(info).to(device)
            x = torch.rand(64, *info.image_shape, generator=generator).to(device)
            y = torch.randint(0, info.num_classes, (64,), generator=generator).to(device)
            repeat = 20 if gpu else (9 if info.image_shape[-1] <= 8 else 1)
            rows.extend(_model_rows(label, model, x, y, repeat))
        return BenchRows(rows, LEGEND, [])
