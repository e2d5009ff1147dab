"""What every penalty regularizer owes the training loop, checked on each of them with a batch-norm
CNN: the running statistics move once a step, from the batch the step trains on; the inner
search leaves no parameter gradient and no mode change behind; a double backward refuses the
precisions it has not been checked under; a step trains (the loss falls) on the digits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustness.data.digits import DigitsDataModule
from robustness.errors import ConfigError
from robustness.models.smallcnn import smallcnn
from robustness.registry import build

DIGITS = DigitsDataModule.info
# The six regularizers of issue 31, at small radii for the digits' pixels.
NODES = {
    "trades": {"name": "trades", "eps": 0.1, "steps": 3},
    "fast_adversarial": {"name": "fast_adversarial", "eps": 0.1},
    "grad_align": {"name": "grad_align", "eps": 0.1, "lam": 1.0},
    "llr": {"name": "llr", "eps": 0.1, "steps": 3},
    "input_gradient_norm": {"name": "input_gradient_norm", "lam": 1.0},
    "jacobian": {"name": "jacobian", "lam": 0.01},
}
DOUBLE_BACKWARD = ("grad_align", "llr", "input_gradient_norm", "jacobian")
# Those whose training forward is the clean batch (the others train on their adversarial batch).
CLEAN_TRAINING_FORWARD = ("trades", "llr", "input_gradient_norm", "jacobian")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return smallcnn(DIGITS, width=4).train()


def _batch(n: int = 16) -> tuple[Tensor, Tensor]:
    x, y = DigitsDataModule(seed=0).split_tensors("train")
    return x[:n], y[:n]


def _statistics(model: nn.Module) -> dict[str, Tensor]:
    return {name: value.clone() for name, value in model.named_buffers()}


@pytest.mark.parametrize("name", list(NODES))
def test_the_running_statistics_move_once_a_step(name: str) -> None:
    x, y = _batch()
    model = _model()
    build("regularizer", NODES[name]).training_loss(model, x, y, epoch=0)
    counts = [int(m.num_batches_tracked) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert counts == [1, 1, 1]
    if name in CLEAN_TRAINING_FORWARD:
        reference = _model()
        with torch.no_grad():
            reference(x)
        for key, value in _statistics(reference).items():
            assert torch.allclose(_statistics(model)[key], value, rtol=1e-6, atol=1e-7), key


@pytest.mark.parametrize("name", list(NODES))
def test_the_step_leaves_no_parameter_gradient_and_no_mode_change(name: str) -> None:
    x, y = _batch()
    model = _model()
    next(m for m in model.modules() if isinstance(m, nn.ReLU)).eval()  # a module in its own mode: the step must keep it so
    modes = {n: m.training for n, m in model.named_modules()}
    out = build("regularizer", NODES[name]).training_loss(model, x, y, epoch=0)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert math.isfinite(float(out.loss.detach())) and out.loss.requires_grad
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("name", DOUBLE_BACKWARD)
def test_a_double_backward_refuses_unchecked_precisions(name: str) -> None:
    regularizer = build("regularizer", NODES[name])
    regularizer.check_precision("32-true")
    with pytest.raises(ConfigError, match="precision=16-mixed"):
        regularizer.check_precision("16-mixed")


@pytest.mark.parametrize("name", list(NODES))
def test_steps_lower_the_clean_loss_on_the_digits(name: str) -> None:
    x, y = _batch(64)
    model = _model()
    regularizer = build("regularizer", NODES[name])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def clean_loss() -> float:
        with torch.no_grad():
            model.eval()
            value = float(F.cross_entropy(model(x), y))
            model.train()
        return value

    before = clean_loss()
    for _ in range(25):
        optimizer.zero_grad()
        regularizer.training_loss(model, x, y, epoch=0).loss.backward()
        optimizer.step()
    assert clean_loss() < 0.85 * before, (clean_loss(), before)
