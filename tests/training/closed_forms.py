"""A float64 linear softmax classifier and the closed forms the regularizer tests check against.

For logits ``z = W x + b`` (x flattened) and the cross-entropy ``l = -log softmax(z)_y``:
``grad_x l = W^T (p - e_y)`` with ``p = softmax(z)``. The tests write their re-implementations
with these formulas, never with the code under test.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FlatLinear(nn.Module):
    """``W x + b`` on flattened images; float64, with no layer that differs between modes."""

    def __init__(self, image_shape: tuple[int, ...], classes: int, seed: int = 0, scale: float = 1.0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        d = int(torch.tensor(image_shape).prod())
        self.linear = nn.Linear(d, classes).double()
        with torch.no_grad():
            self.linear.weight.copy_(scale * torch.randn(classes, d, generator=generator, dtype=torch.float64))
            self.linear.bias.copy_(0.3 * torch.randn(classes, generator=generator, dtype=torch.float64))

    @property
    def weight(self) -> Tensor:
        return self.linear.weight

    @property
    def bias(self) -> Tensor:
        return self.linear.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))


def images(n: int, shape: tuple[int, ...] = (1, 4, 4), seed: int = 1) -> Tensor:
    """``n`` float64 images in [0.1, 0.9], so that small perturbations stay inside [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    return 0.1 + 0.8 * torch.rand(n, *shape, generator=generator, dtype=torch.float64)


def labels(n: int, classes: int, seed: int = 2) -> Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


def softmax(weight: Tensor, bias: Tensor, x: Tensor) -> Tensor:
    return torch.softmax(x.flatten(1) @ weight.T + bias, dim=1)


def cross_entropy(weight: Tensor, bias: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Per example, shape (N,)."""
    z = x.flatten(1) @ weight.T + bias
    return torch.logsumexp(z, dim=1) - z.gather(1, y[:, None]).squeeze(1)


def input_gradient(weight: Tensor, bias: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """``W^T (p - e_y)`` per example, shaped like ``x``."""
    p = softmax(weight, bias, x)
    p = p - torch.nn.functional.one_hot(y, p.shape[1]).to(p.dtype)
    return (p @ weight).view_as(x)


def parameters(model: FlatLinear) -> tuple[Tensor, Tensor]:
    """Fresh float64 leaves holding the model's weight and bias, for a re-implementation to differentiate."""
    return model.weight.detach().clone().requires_grad_(True), model.bias.detach().clone().requires_grad_(True)


def gradients_of(loss: Tensor, model: nn.Module) -> list[Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
