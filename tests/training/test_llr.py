"""LLR (robustness/training/llr.py) against its formula on a linear softmax model in float64:
g(delta; x) = |l(x + delta) - l(x) - delta^T grad l(x)| and |delta^T grad l(x)| with
grad l = W^T (p - e_y), their parameter gradients through a literal re-implementation, and a
whole step against the search written out."""

from __future__ import annotations

import math

import pytest
import torch

import closed_forms as cf
from closed_forms import FlatLinear, gradients_of, images, labels
from robustness.errors import ConfigError
from robustness.registry import build
from robustness.training.llr import LLR, linearity_search

SHAPE, CLASSES = (1, 4, 4), 5


def _literal_terms(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(clean losses, g, delta^T grad l(x)) per example from the closed forms."""
    clean = cf.cross_entropy(w, b, x, y)
    linear = (delta * cf.input_gradient(w, b, x, y)).flatten(1).sum(1)
    return clean, (cf.cross_entropy(w, b, x + delta, y) - clean - linear).abs(), linear


def test_penalty_and_its_gradient_at_a_given_delta_equal_the_formula() -> None:
    model = FlatLinear(SHAPE, CLASSES, scale=2.0)
    x, y = images(8, SHAPE), labels(8, CLASSES)
    delta = 0.08 * torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    llr = LLR(lam=4.0, mu=3.0, eps=0.1)
    _, losses, penalty, nonlinearity, linear = llr.penalty_at(model, x, y, x + delta)
    loss = losses.mean() + penalty.mean()
    got_w, got_b = gradients_of(loss, model)

    w, b = cf.parameters(model)
    clean, g, lin = _literal_terms(w, b, x, y, delta)
    expected = clean.mean() + (4.0 * g + 3.0 * lin.abs()).mean()
    grad_w, grad_b = torch.autograd.grad(expected, (w, b))
    assert torch.allclose(nonlinearity.detach(), g.detach(), rtol=1e-10, atol=1e-15)
    assert torch.allclose(linear.detach(), lin.detach(), rtol=1e-12, atol=1e-15)
    assert float(g.detach().min()) > 1e-4  # a curved loss: the first term is not vacuous
    assert math.isclose(float(loss.detach()), float(expected.detach()), rel_tol=1e-12)
    assert torch.allclose(got_w, grad_w, rtol=1e-9, atol=1e-13)
    assert torch.allclose(got_b, grad_b, rtol=1e-9, atol=1e-13)


def test_the_search_stays_in_the_ball_and_the_box_and_raises_g() -> None:
    model = FlatLinear(SHAPE, CLASSES, scale=3.0)
    x, y = images(12, SHAPE), labels(12, CLASSES)
    x[:2] = 0.01
    eps = 0.1
    start = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    found = linearity_search(model, x, y, eps, 0.025, 10, start=start)
    assert (found - x).abs().max() <= eps + 1e-12 and found.min() >= 0 and found.max() <= 1
    w, b = model.weight.detach(), model.bias.detach()
    g_start = _literal_terms(w, b, x, y, start - x)[1]
    g_found = _literal_terms(w, b, x, y, found - x)[1]
    assert bool((g_found >= g_start).all()) and float(g_found.mean()) > 2 * float(g_start.mean())


def test_a_step_is_the_cross_entropy_plus_the_penalty_at_the_searchs_point() -> None:
    model = FlatLinear(SHAPE, CLASSES, scale=2.0)
    x, y = images(9, SHAPE), labels(9, CLASSES)
    x[:2] = 0.03  # near the box's edge: the start's clip binds
    eps, steps, step = 0.1, 4, 0.025
    torch.manual_seed(11)
    out = LLR(lam=4.0, mu=3.0, eps=eps, steps=steps, relative_step=0.25).training_loss(model, x, y, epoch=0)
    got_w, _ = gradients_of(out.loss, model)

    # The search written out: uniform start clipped to the box, sign steps on g, ball then box.
    w0, b0 = model.weight.detach(), model.bias.detach()
    torch.manual_seed(11)
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        g = _literal_terms(w0, b0, x, y, x_adv - x)[1]
        (grad,) = torch.autograd.grad(g.sum(), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step * grad.sign(), x - eps), x + eps).clamp(0, 1)
    w, b = cf.parameters(model)
    clean, g, lin = _literal_terms(w, b, x, y, x_adv - x)
    expected = clean.mean() + (4.0 * g + 3.0 * lin.abs()).mean()
    (grad_w,) = torch.autograd.grad(expected, (w,))
    assert math.isclose(float(out.loss.detach()), float(expected.detach()), rel_tol=1e-12)
    assert torch.allclose(got_w, grad_w, rtol=1e-9, atol=1e-13)
    assert math.isclose(float(out.logs["llr_gamma"]), float(g.mean()), rel_tol=1e-10)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"lam": -4.0}, "regularizer.lam"),
        ({"mu": -3.0}, "regularizer.mu"),
        ({"eps": -0.03}, "regularizer.eps"),
        ({"steps": 0}, "regularizer.steps"),
        ({"steps": 2.5}, "regularizer.steps"),
        ({"relative_step": -0.25}, "regularizer.relative_step"),
    ],
)
def test_bad_options_are_config_errors_before_any_work(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build("regularizer", {"name": "llr", **options})
