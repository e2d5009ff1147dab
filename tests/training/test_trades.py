"""TRADES (robustness/training/trades.py) against its formula on a linear softmax model, in float64:
the KL term and its parameter gradient in closed form, and a whole step against a literal
re-implementation of the public code's loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from closed_forms import FlatLinear, gradients_of, images, labels, softmax
from robustness.errors import ConfigError
from robustness.registry import build
from robustness.training.trades import TRADES, kl_ascent, kl_divergence

SHAPE, CLASSES = (1, 4, 4), 5


def _closed_form_kl_and_gradients(model: FlatLinear, x: torch.Tensor, x_adv: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """mean_i KL(p_i || q_i), p = softmax(W x + b), q = softmax(W x' + b), and its gradient:
    dKL/dz = p * (r - <p, r>) with r = log p - log q, dKL/da = q - p (z, a the two logits)."""
    w, b = model.weight.detach(), model.bias.detach()
    p, q = softmax(w, b, x), softmax(w, b, x_adv)
    r = p.log() - q.log()
    kl = (p * r).sum(1)
    grad_z = p * (r - (p * r).sum(1, keepdim=True))
    grad_a = q - p
    n = len(x)
    grad_w = (grad_z.T @ x.flatten(1) + grad_a.T @ x_adv.flatten(1)) / n
    grad_b = (grad_z + grad_a).sum(0) / n
    return float(kl.mean()), grad_w, grad_b


def test_kl_term_and_its_gradient_are_the_closed_form_with_the_clean_distribution_first() -> None:
    model = FlatLinear(SHAPE, CLASSES, scale=2.0)
    x = images(7, SHAPE)
    x_adv = (x + 0.05 * torch.randn(x.shape, dtype=torch.float64)).clamp(0, 1)
    kl = kl_divergence(model(x), model(x_adv)).mean()
    expected, grad_w, grad_b = _closed_form_kl_and_gradients(model, x, x_adv)
    assert math.isclose(float(kl.detach()), expected, rel_tol=1e-12)
    got_w, got_b = gradients_of(kl, model)
    assert torch.allclose(got_w, grad_w, rtol=1e-10, atol=1e-14)
    assert torch.allclose(got_b, grad_b, rtol=1e-10, atol=1e-14)
    # The other order is another number: the test tells them apart.
    assert not math.isclose(float(kl_divergence(model(x_adv), model(x)).mean().detach()), expected, rel_tol=1e-3)


def _public_loop(model: FlatLinear, x: torch.Tensor, eps: float, step: float, steps: int) -> torch.Tensor:
    """yaodongyu/TRADES trades.py's l-inf loop, written out: KLDivLoss(sum) of log_softmax(f(x'))
    against softmax(f(x)), sign step, clip to the ball, then to [0, 1]."""
    x_adv = x + 0.001 * torch.randn(x.shape, dtype=x.dtype)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1), reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step * grad.sign()
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    return x_adv.detach()


def test_a_step_is_cross_entropy_plus_beta_kl_at_the_public_codes_adversarial_batch() -> None:
    model = FlatLinear(SHAPE, CLASSES, scale=2.0)
    x, y = images(9, SHAPE), labels(9, CLASSES)
    trades = TRADES(beta=6.0, eps=0.1, steps=5, relative_step=0.3)
    torch.manual_seed(123)
    out = trades.training_loss(model, x, y, epoch=0)
    got = gradients_of(out.loss, model)

    torch.manual_seed(123)
    x_adv = _public_loop(model, x, 0.1, 0.03, 5)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-12 and x_adv.min() >= 0 and x_adv.max() <= 1
    w, b = model.weight.detach(), model.bias.detach()
    ce = F.cross_entropy(x.flatten(1) @ w.T + b, y)
    kl, grad_w, grad_b = _closed_form_kl_and_gradients(model, x, x_adv)
    assert math.isclose(float(out.loss.detach()), float(ce) + 6.0 * kl, rel_tol=1e-12)
    assert math.isclose(float(out.logs["trades_kl"]), kl, rel_tol=1e-12)
    # The cross-entropy's gradient, (p - e_y) x^T / N, plus beta times the KL term's.
    residual = softmax(w, b, x) - F.one_hot(y, CLASSES).double()
    assert torch.allclose(got[0], residual.T @ x.flatten(1) / len(x) + 6.0 * grad_w, rtol=1e-9, atol=1e-13)
    assert torch.allclose(got[1], residual.mean(0) + 6.0 * grad_b, rtol=1e-9, atol=1e-13)


def test_the_inner_search_stays_in_the_ball_and_the_box_and_raises_the_kl_divergence() -> None:
    model = FlatLinear(SHAPE, CLASSES, scale=3.0)
    x = images(16, SHAPE)
    x[0] = 0.01  # pixels near the box's edge: the box clip binds
    clean = model(x).detach()
    start = x + 0.001 * torch.randn(x.shape, dtype=torch.float64)
    x_adv = kl_ascent(model, x, clean, eps=0.08, step_size=0.02, steps=8, start=start)
    assert (x_adv - x).abs().max() <= 0.08 + 1e-12
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    before = kl_divergence(clean, model(start.clamp(0, 1)))
    after = kl_divergence(clean, model(x_adv)).detach()
    assert bool((after > before).all()) and float(after.mean().detach()) > 100 * float(before.mean().detach())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"beta": -1.0}, "regularizer.beta"),
        ({"eps": -0.1}, "regularizer.eps"),
        ({"steps": 0}, "regularizer.steps"),
        ({"relative_step": 0.0}, "regularizer.relative_step"),
        ({"beta": float("nan")}, "regularizer.beta"),
        ({"unknown": 1}, "unknown option"),
    ],
)
def test_bad_options_are_config_errors_before_any_work(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build("regularizer", {"name": "trades", **options})
