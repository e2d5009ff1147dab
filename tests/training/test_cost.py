"""Step costs (robustness/training/cost.py): a step that does k plain steps' work costs about k
plain steps, the plain step itself about 1, measured side by side in CPU time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustness.data.digits import DigitsDataModule
from robustness.errors import InputError
from robustness.models.smallcnn import smallcnn
from robustness.training.cost import step_costs
from robustness.training.regularizer import Regularizer, StepOutput


class _Repeated(Regularizer):
    """The cross-entropy of ``times`` forwards of the batch: ``times`` plain steps' work."""

    def __init__(self, times: int) -> None:
        self.times = times

    def training_loss(self, model: nn.Module, x: Tensor, y: Tensor, epoch: int) -> StepOutput:
        loss = sum(F.cross_entropy(model(x), y) for _ in range(self.times)) / self.times
        return StepOutput(loss=loss)


def test_a_step_of_k_plain_steps_costs_about_k_and_a_plain_one_about_1() -> None:
    torch.manual_seed(0)
    model = smallcnn(DigitsDataModule.info, width=16)
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    costs = step_costs({"plain again": Regularizer(), "four": _Repeated(4)}, model, x, y, rounds=5)
    # Loose bounds: a shared machine's noise moves single rounds, not a median of five ratios by 2x.
    assert 0.6 < costs["plain again"].estimate < 1.6
    assert 2.5 < costs["four"].estimate < 6.0
    assert costs["four"].low <= costs["four"].estimate <= costs["four"].high and costs["four"].n_a == 5
    assert all(p.grad is None for p in model.parameters())  # the model itself is copied, not touched


def test_bad_arguments_are_refused() -> None:
    model = smallcnn(DigitsDataModule.info, width=4)
    with pytest.raises(InputError, match="rounds"):
        step_costs({}, model, torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), rounds=1)
    with pytest.raises(InputError, match="batch"):
        step_costs({}, model, torch.rand(2, 1, 8, 8), torch.zeros(3, dtype=torch.long))
