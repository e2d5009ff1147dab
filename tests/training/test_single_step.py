"""Fast adversarial training and GradAlign (robustness/training/single_step.py) against their
formulas on a linear softmax model in float64: the public codes' iterates written out, the
gradients in closed form (grad_x l = W^T (p - e_y)), the parameter gradients of a literal
re-implementation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import closed_forms as cf
from closed_forms import FlatLinear, gradients_of, images, labels
from robustness.errors import ConfigError
from robustness.registry import build
from robustness.training.single_step import FastAdversarialTraining, GradAlign, gradient_alignment_penalty, paper_lambda

SHAPE, CLASSES = (1, 4, 4), 5


def test_fast_adversarial_step_is_the_cross_entropy_at_wong_et_als_iterate() -> None:
    model = FlatLinear(SHAPE, CLASSES, scale=2.0)
    x, y = images(12, SHAPE), labels(12, CLASSES)
    x[:3] = 0.02  # near the box's edge: the start's clip binds
    eps, alpha = 0.1, 0.125
    torch.manual_seed(7)
    out = FastAdversarialTraining(eps=eps, relative_step=1.25).training_loss(model, x, y, epoch=0)
    got_w, got_b = gradients_of(out.loss, model)

    # locuslab/fast_adversarial CIFAR10/train_fgsm.py, written out: delta ~ U(-eps, eps), clipped
    # so that x + delta is an image; one signed step of alpha; clip to the ball, then the box.
    torch.manual_seed(7)
    delta = torch.empty_like(x).uniform_(-eps, eps)
    delta = torch.max(torch.min(delta, 1 - x), -x)
    w, b = model.weight.detach(), model.bias.detach()
    grad = cf.input_gradient(w, b, x + delta, y)
    delta = (delta + alpha * grad.sign()).clamp(-eps, eps)
    delta = torch.max(torch.min(delta, 1 - x), -x)
    x_adv = x + delta
    assert math.isclose(float(out.loss.detach()), float(cf.cross_entropy(w, b, x_adv, y).mean()), rel_tol=1e-12)
    residual = cf.softmax(w, b, x_adv) - F.one_hot(y, CLASSES).double()
    assert torch.allclose(got_w, residual.T @ x_adv.flatten(1) / len(x), rtol=1e-10, atol=1e-14)
    assert torch.allclose(got_b, residual.mean(0), rtol=1e-10, atol=1e-14)


def test_gradient_alignment_penalty_is_one_minus_the_mean_cosine_of_the_nonzero_pairs() -> None:
    g1 = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.0], [2.0, 2.0]], dtype=torch.float64)
    g2 = torch.tensor([[4.0, 3.0], [-1.0, 0.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    penalty, cos = gradient_alignment_penalty(g1, g2)
    # Pairs 2 and 3 have a zero gradient and are left out: cos = (24/25, -1).
    assert torch.allclose(cos, torch.tensor([24 / 25, -1.0], dtype=torch.float64))
    assert math.isclose(float(penalty), 1 - (24 / 25 - 1) / 2, rel_tol=1e-15)
    zero_penalty, none = gradient_alignment_penalty(torch.zeros(2, 3), torch.ones(2, 3))
    assert float(zero_penalty) == 0.0 and len(none) == 0


def test_paper_lambda_follows_the_public_scripts_log_linear_rule() -> None:
    # sh/exps_diff_eps_cifar10.sh: 0.027 at 1/255, 0.2 at 8/255, 2.0 at 16/255 (three decimals).
    for e, expected in ((1, 0.027), (4, 0.063), (8, 0.200), (12, 0.632), (16, 2.000)):
        assert round(paper_lambda(e / 255), 3) == expected
    assert GradAlign(eps=8 / 255).lam == pytest.approx(0.2, rel=1e-12)
    assert GradAlign(eps=8 / 255, lam=0.5).lam == 0.5
    assert GradAlign(eps=16 / 255).lam == pytest.approx(2.0, rel=1e-12) and GradAlign(eps=0.1, lam=1.0).lam == 1.0


def _literal_grad_align(model: FlatLinear, x: torch.Tensor, y: torch.Tensor, eps: float, lam: float, eta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of a GradAlign step from the formulas (FGSM at x, clipped; W^T (p - e_y) at x,
    held constant, and at x + eta, differentiated), as a function of fresh parameter leaves."""
    w, b = cf.parameters(model)
    x_adv = (x + eps * cf.input_gradient(w.detach(), b.detach(), x, y).sign()).clamp(0, 1)
    ce = cf.cross_entropy(w, b, x_adv, y).mean()
    g1 = cf.input_gradient(w.detach(), b.detach(), x, y).flatten(1)
    g2 = cf.input_gradient(w, b, x + eta, y).flatten(1)
    cos = (g1 * g2).sum(1) / (g1.norm(dim=1) * g2.norm(dim=1))
    loss = ce + lam * (1 - cos.mean())
    grad_w, grad_b = torch.autograd.grad(loss, (w, b))
    return loss.detach(), grad_w, grad_b


def test_a_grad_align_step_and_its_gradient_equal_the_formula() -> None:
    model = FlatLinear(SHAPE, CLASSES, scale=2.0)
    x, y = images(10, SHAPE), labels(10, CLASSES)
    x[:3] = 0.02  # near the box's edge: FGSM's clip binds, and x + eta leaves the box (not clipped)
    eps, lam = 0.05, 0.7
    torch.manual_seed(5)
    out = GradAlign(eps=eps, lam=lam).training_loss(model, x, y, epoch=0)
    got_w, got_b = gradients_of(out.loss, model)
    torch.manual_seed(5)
    eta = torch.empty_like(x).uniform_(-eps, eps)
    loss, grad_w, grad_b = _literal_grad_align(model, x, y, eps, lam, eta)
    assert math.isclose(float(out.loss.detach()), float(loss), rel_tol=1e-12)
    assert torch.allclose(got_w, grad_w, rtol=1e-9, atol=1e-13)
    assert torch.allclose(got_b, grad_b, rtol=1e-9, atol=1e-13)
    assert 0 < float(out.logs["grad_align_penalty"]) < 1


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("grad_align", {"lam": -0.2}, "regularizer.lam"),
        ("grad_align", {"eps": -1e-3}, "regularizer.eps"),
        ("grad_align", {"eps": 0.1}, "set regularizer.lam"),  # the weight rule's fit ends at 16/255
        ("fast_adversarial", {"eps": -1e-3}, "regularizer.eps"),
        ("fast_adversarial", {"relative_step": 0}, "regularizer.relative_step"),
        ("fast_adversarial", {"steps": 3}, "unknown option"),
    ],
)
def test_bad_options_are_config_errors_before_any_work(name: str, options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build("regularizer", {"name": name, **options})
