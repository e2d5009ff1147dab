"""The per-process side of the CURE DDP test (test_cure.py).

Kept apart from the test module so that each spawned process imports torch and the CURE
regularizer only, not Lightning.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import torch
from torch import Tensor, nn

from robustness.training.cure import CURE
from robustness.training.regularizer import Regularizer

DDP_STEPS = 3
BAD_STEP = 1  # rank 1 gets a NaN pixel on this step: both ranks must skip it


class LossOfStep(nn.Module):
    """What Lightning's DDP wrapper does: the regularizer runs inside the wrapped forward."""

    def __init__(self, model: nn.Module, regularizer: Regularizer) -> None:
        super().__init__()
        self.model = model
        self.regularizer = regularizer

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return self.regularizer.training_loss(self.model, x, y, epoch=0).loss


def ddp_models() -> dict[str, tuple[nn.Module, CURE]]:
    torch.manual_seed(10)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))
    cnn = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )
    return {
        "mlp_running": (mlp, CURE(lam=0.5, h=0.5, bn_mode="running")),
        "cnn_batch": (cnn, CURE(lam=0.5, h=0.5, bn_mode="batch")),
    }


def ddp_batches() -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(11)
    return [(torch.rand(16, 1, 8, 8, generator=generator), torch.randint(0, 10, (16,), generator=generator)) for _ in range(DDP_STEPS)]


def train_on_rank(rank: int, world_size: int, rendezvous: str, out_dir: str) -> None:
    """A few CURE steps on this rank's half of each batch; saves the parameters it ends with."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    # A rank that skips a collective the other runs would hang the test: fail it within a minute.
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    try:
        results: dict[str, object] = {}
        for name, (model, cure) in ddp_models().items():
            model.train()
            step = DistributedDataParallel(LossOfStep(model, cure))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            finite = []
            for index, (x, y) in enumerate(ddp_batches()):
                x, y = x.chunk(world_size)[rank].clone(), y.chunk(world_size)[rank]
                if index == BAD_STEP and rank == 1:
                    x[0, 0, 0, 0] = float("nan")
                optimizer.zero_grad()
                loss = step(x, y)
                finite.append(bool(torch.isfinite(loss)))
                if finite[-1]:  # as ClassifierModule does: a bad step gets no backward, no update
                    loss.backward()
                    optimizer.step()
            results[name] = {"params": {k: v.detach().clone() for k, v in model.named_parameters()}, "finite": finite}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
