"""The input-gradient norm and the Jacobian penalty (robustness/training/gradient_penalties.py)
against their formulas: on a linear softmax model in float64 (grad l = W^T (p - e_y); the
Jacobian is W, so (1/2)||J||_F^2 = (1/2)||W||_F^2 with gradient W), and on a smooth network
against torch.autograd.functional.jacobian."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import closed_forms as cf
from closed_forms import FlatLinear, gradients_of, images, labels
from robustness.errors import ConfigError
from robustness.registry import build
from robustness.training.gradient_penalties import InputGradientNorm, JacobianPenalty, jacobian_penalty, random_projections

SHAPE, CLASSES = (1, 4, 4), 5


def test_input_gradient_norm_step_and_its_gradient_equal_the_formula() -> None:
    model = FlatLinear(SHAPE, CLASSES, scale=2.0)
    x, y = images(8, SHAPE), labels(8, CLASSES)
    out = InputGradientNorm(lam=3.5).training_loss(model, x, y, epoch=0)
    got_w, got_b = gradients_of(out.loss, model)

    w, b = cf.parameters(model)
    squared = cf.input_gradient(w, b, x, y).flatten(1).pow(2).sum(1)
    expected = cf.cross_entropy(w, b, x, y).mean() + 3.5 * squared.mean()
    grad_w, grad_b = torch.autograd.grad(expected, (w, b))
    assert math.isclose(float(out.logs["input_gradient_norm_penalty"]), float(squared.mean().detach()), rel_tol=1e-12)
    assert math.isclose(float(out.loss.detach()), float(expected.detach()), rel_tol=1e-12)
    assert torch.allclose(got_w, grad_w, rtol=1e-10, atol=1e-14)
    assert torch.allclose(got_b, grad_b, rtol=1e-10, atol=1e-14)


def test_the_exact_jacobian_penalty_of_a_linear_model_is_half_the_squared_weight_norm() -> None:
    model = FlatLinear(SHAPE, CLASSES, scale=2.0)
    x, y = images(6, SHAPE), labels(6, CLASSES)
    out = JacobianPenalty(lam=0.3, projections=-1).training_loss(model, x, y, epoch=0)
    got_w, got_b = gradients_of(out.loss, model)
    w, b = model.weight.detach(), model.bias.detach()
    assert math.isclose(float(out.logs["jacobian_penalty"]), 0.5 * float(w.pow(2).sum()), rel_tol=1e-12)
    # d/dW of CE + 0.3 * (1/2)||W||^2 = (p - e_y) x^T / N + 0.3 W; the bias has no Jacobian term.
    residual = cf.softmax(w, b, x) - torch.nn.functional.one_hot(y, CLASSES).double()
    assert torch.allclose(got_w, residual.T @ x.flatten(1) / len(x) + 0.3 * w, rtol=1e-10, atol=1e-14)
    assert torch.allclose(got_b, residual.mean(0), rtol=1e-10, atol=1e-14)


def test_random_projection_estimate_and_its_gradient_equal_the_public_codes_formula() -> None:
    model = FlatLinear(SHAPE, CLASSES, scale=2.0)
    x = images(7, SHAPE).requires_grad_(True)
    vectors = random_projections(3, 7, CLASSES, like=x)
    assert torch.allclose(vectors.norm(dim=2), torch.ones(3, 7, dtype=torch.float64))
    penalty = jacobian_penalty(model(x), x, vectors)
    got_w, got_b = gradients_of(penalty, model)
    # (1/2) C/(n N) sum_{k,i} ||W^T v_ki||^2, whose gradient in W is C/(n N) sum v v^T W.
    w = model.weight.detach()
    flat = vectors.reshape(-1, CLASSES)
    scale = CLASSES / (3 * 7)
    assert math.isclose(float(penalty.detach()), 0.5 * scale * float((flat @ w).pow(2).sum()), rel_tol=1e-12)
    assert torch.allclose(got_w, scale * flat.T @ flat @ w, rtol=1e-10, atol=1e-14)
    assert torch.equal(got_b, torch.zeros_like(got_b))


def test_the_estimate_is_unbiased_over_draws() -> None:
    # E[C v v^T] = I for v uniform on the sphere: 20000 draws of C v v^T average to I within
    # 0.04 per entry (the standard error of an entry is below 0.005).
    v = random_projections(1, 20000, CLASSES, like=torch.zeros((), dtype=torch.float64))[0]
    second_moment = CLASSES * v.T @ v / len(v)
    assert torch.allclose(second_moment, torch.eye(CLASSES, dtype=torch.float64), atol=0.04)


def test_the_exact_penalty_of_a_smooth_network_equals_torchs_jacobian() -> None:
    torch.manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 6), nn.Softplus(), nn.Linear(6, CLASSES)).double()
    x = images(4, SHAPE).requires_grad_(True)
    penalty = jacobian_penalty(net(x), x, random_projections(-1, 4, CLASSES, like=x))
    jacobians = [torch.autograd.functional.jacobian(lambda image: net(image[None])[0], image) for image in x.detach()]
    expected = 0.5 * sum(float(j.pow(2).sum()) for j in jacobians) / len(x)
    assert math.isclose(float(penalty.detach()), expected, rel_tol=1e-12)


def test_a_step_draws_the_public_codes_vectors() -> None:
    model = FlatLinear(SHAPE, CLASSES, scale=2.0)
    x, y = images(5, SHAPE), labels(5, CLASSES)
    torch.manual_seed(21)
    out = JacobianPenalty(lam=1.0, projections=2).training_loss(model, x, y, epoch=0)
    # facebookresearch/jacobian_regularizer: per projection v = randn(B, C) / its row norms.
    torch.manual_seed(21)
    w = model.weight.detach()
    total = 0.0
    for _ in range(2):
        v = torch.randn(5, CLASSES, dtype=torch.float64)
        v = v / v.norm(dim=1, keepdim=True)
        total += CLASSES * float((v @ w).pow(2).sum()) / (2 * 5)
    assert math.isclose(float(out.logs["jacobian_penalty"]), 0.5 * total, rel_tol=1e-12)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("input_gradient_norm", {"lam": -1.0}, "regularizer.lam"),
        ("input_gradient_norm", {"lam": float("inf")}, "regularizer.lam"),
        ("jacobian", {"lam": -1e-3}, "regularizer.lam"),
        ("jacobian", {"projections": 0}, "regularizer.projections"),
        ("jacobian", {"projections": -2}, "regularizer.projections"),
    ],
)
def test_bad_options_are_config_errors_before_any_work(name: str, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build("regularizer", {"name": name, **options})
