"""The input-Hessian maths: HVPs, the ||H||_F^2 estimator and Lanczos, against exact Hessians."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import train_digits_smallcnn
from robustness.data.digits import DigitsDataModule
from robustness.errors import InputError
from robustness.geometry.hessian import InputHessian, frobenius_norm_sq, input_gradient, top_eigenvalues
from robustness.models.smallcnn import smallcnn

SHAPE = (3, 4, 4)  # 48 input dimensions: enough for a spread-out Hessian spectrum
CLASSES = 5


def tiny_net(activation: type[nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    d = math.prod(SHAPE)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 32), activation(), nn.Linear(32, 32), activation(), nn.Linear(32, CLASSES)).double().eval()


def batch(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, *SHAPE, generator=generator, dtype=torch.float64), torch.randint(0, CLASSES, (n,), generator=generator)


def exact_hessians(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, d, d) Hessians of each image's loss by torch.func.hessian: the reference."""
    def loss_of(i: int):
        return lambda flat: F.cross_entropy(model(flat.view(1, *x.shape[1:])), y[i : i + 1])

    return torch.stack([torch.func.hessian(loss_of(i))(x[i].flatten()) for i in range(len(x))]).detach()


@pytest.mark.parametrize("activation", [nn.Tanh, nn.Softplus])
def test_frobenius_estimate_matches_exact_hessian(activation):
    model = tiny_net(activation)
    x, y = batch(6)
    exact = exact_hessians(model, x, y).pow(2).sum((1, 2))
    estimate = frobenius_norm_sq(InputHessian(model, x, y), 256, seed=3)
    assert estimate.squares.shape == (256, 6)
    # The Table-1 number (mean over images) within 5%; every image within 4 of its standard errors.
    assert float(estimate.mean.mean() / exact.mean()) == pytest.approx(1.0, abs=0.05)
    z = (estimate.mean - exact).abs() / estimate.stderr
    assert float(z.max()) < 4.0


def test_frobenius_standard_error_is_calibrated_and_shrinks_as_one_over_sqrt_samples():
    model = tiny_net(nn.Tanh)
    x, y = batch(1)
    exact = float(exact_hessians(model, x, y).pow(2).sum())
    # 300 independent estimates of the same image: distinct image ids give distinct random streams.
    replicas = 300
    hessian = InputHessian(model, x.expand(replicas, *SHAPE).clone(), y.expand(replicas).clone())
    few = frobenius_norm_sq(hessian, 16, seed=0, image_ids=range(replicas))
    many = frobenius_norm_sq(hessian, 64, seed=0, image_ids=range(1000, 1000 + replicas))
    # The reported standard error predicts the actual spread of the estimates.
    assert float(few.mean.std()) == pytest.approx(float(few.stderr.mean()), rel=0.2)
    assert float(many.mean.std()) == pytest.approx(float(many.stderr.mean()), rel=0.2)
    # Four times the samples, half the error.
    assert float(few.stderr.mean() / many.stderr.mean()) == pytest.approx(2.0, rel=0.12)
    assert float(many.mean.mean()) == pytest.approx(exact, rel=0.02)


def test_exact_hvp_equals_hessian_times_vector_including_relu_and_batch_norm():
    for model, x, y in [
        (tiny_net(nn.Softplus), *batch(4)),
        (_digits_cnn("relu"), *_digits(4)),
    ]:
        v = torch.randn_like(x)
        hv = InputHessian(model, x, y)(v)
        reference = torch.einsum("nij,nj->ni", exact_hessians(model, x, y), v.flatten(1))
        torch.testing.assert_close(hv.flatten(1), reference, rtol=1e-9, atol=1e-12)


def test_products_of_a_piecewise_linear_network_come_from_its_jacobian_and_equal_the_double_backward():
    model = _digits_cnn("relu")  # ReLU, max-pool, batch norm (eval), average pool, linear
    x, y = _digits(4)
    factored, direct = InputHessian(model, x, y), InputHessian(model, x, y, factor=False)
    assert factored.factored and not direct.factored
    v = torch.randn_like(x)
    torch.testing.assert_close(factored(v), direct(v), rtol=1e-9, atol=1e-13)
    reference = torch.einsum("nij,nj->ni", exact_hessians(model, x, y), v.flatten(1))
    torch.testing.assert_close(factored(v).flatten(1), reference, rtol=1e-9, atol=1e-12)
    # Smooth activations give the logits curvature of their own: those keep the double backward.
    for activation in (nn.Softplus, nn.Tanh):
        assert not InputHessian(tiny_net(activation), *batch(3)).factored
    assert not InputHessian(_digits_cnn("softplus"), *_digits(2)).factored
    assert not InputHessian(model, x, y, "finite_difference", h=0.1).factored


def test_factored_float32_products_are_closer_to_float64_than_the_float32_double_backward():
    """A confidently classified image's Hessian is a near-cancellation of diag(p) and p p^T: the
    factored product takes that part in float64, the float32 double backward cannot."""
    model, splits = train_digits_smallcnn()  # about 98% test accuracy: many confident images
    x, y = splits["test"][0][:16], splits["test"][1][:16]
    reference = frobenius_norm_sq(InputHessian(copy.deepcopy(model).double(), x.double(), y, factor=False), 16, seed=1).mean
    errors = {}
    for factor in (True, False):
        estimate = frobenius_norm_sq(InputHessian(model, x, y, factor=factor), 16, seed=1).mean
        errors[factor] = float(((estimate - reference).abs() / reference).max())
    assert errors[True] < 1e-4  # measured 3e-6
    assert errors[True] < 0.1 * errors[False]  # the double backward: 6e-4


def test_relu_loss_hessian_is_the_gauss_newton_matrix():
    model = _digits_cnn("relu")
    x, y = _digits(2)
    hessians = exact_hessians(model, x, y)
    for i in range(len(x)):
        flat = x[i].flatten()
        jacobian = torch.func.jacrev(lambda f: model(f.view(1, *x.shape[1:]))[0])(flat)
        p = model(x[i : i + 1]).softmax(1)[0]
        gauss_newton = jacobian.T @ (torch.diag(p) - torch.outer(p, p)) @ jacobian
        torch.testing.assert_close(hessians[i], gauss_newton.detach(), rtol=1e-8, atol=1e-12)
        # Rank at most num_classes - 1: the logit Hessian contributes nothing.
        assert int(torch.linalg.matrix_rank(hessians[i], rtol=1e-8)) <= 9


def test_finite_difference_hvp_converges_to_exact_as_h_shrinks():
    model = tiny_net(nn.Tanh)
    x, y = batch(3)
    v = torch.randn_like(x)
    exact = InputHessian(model, x, y)(v)
    errors = []
    for h in (1e-1, 1e-2, 1e-3, 1e-4):
        approx = InputHessian(model, x, y, "finite_difference", h=h)(v)
        errors.append(float((approx - exact).norm() / exact.norm()))
    # A forward difference: the error falls in proportion to h.
    for coarse, fine in zip(errors, errors[1:]):
        assert fine < 0.2 * coarse
    assert errors[-1] < 1e-3
    # The step has length h whatever |v|, so the product is linear in v's scale.
    fd = InputHessian(model, x, y, "finite_difference", h=0.05)
    torch.testing.assert_close(fd(3.0 * v), 3.0 * fd(v), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("activation", [nn.Tanh, nn.Softplus])
def test_top_eigenvalues_match_eigvalsh(activation):
    model = tiny_net(activation)
    x, y = batch(4)
    reference = torch.linalg.eigvalsh(exact_hessians(model, x, y))
    top = reference.gather(1, reference.abs().argsort(1, descending=True)[:, :3])
    found = top_eigenvalues(InputHessian(model, x, y), k=3, num_iter=24, seed=0)
    assert found.shape == (4, 3)
    torch.testing.assert_close(found, top, rtol=1e-3, atol=0.0)


def test_lanczos_survives_the_low_rank_hessian_of_a_relu_network():
    model = _digits_cnn("relu")
    x, y = _digits(3)
    reference = torch.linalg.eigvalsh(exact_hessians(model, x, y)).flip(1)  # PSD: largest first
    found = top_eigenvalues(InputHessian(model, x, y), k=12, num_iter=30, seed=0)
    assert torch.isfinite(found).all()
    for i in range(len(x)):
        # The Gauss-Newton Hessian has rank at most num_classes - 1 = 9 (less when classes have p ~ 0).
        rank = int((reference[i] > 1e-9 * reference[i, 0]).sum())
        assert 3 <= rank <= 9
        torch.testing.assert_close(found[i, :rank], reference[i, :rank], rtol=1e-3, atol=0.0)
        # Past the rank Lanczos restarts in the null space and finds nothing there.
        assert float(found[i, rank:].abs().max()) < 1e-8 * float(reference[i, 0])


def test_results_do_not_depend_on_the_batch_an_image_is_in():
    model = tiny_net(nn.Softplus)
    x, y = batch(5)
    whole = frobenius_norm_sq(InputHessian(model, x, y), 8, seed=7)
    part = frobenius_norm_sq(InputHessian(model, x[2:4], y[2:4]), 8, seed=7, image_ids=[2, 3])
    torch.testing.assert_close(part.mean, whole.mean[2:4], rtol=1e-10, atol=0.0)
    eig_whole = top_eigenvalues(InputHessian(model, x, y), 2, num_iter=10, seed=7)
    eig_part = top_eigenvalues(InputHessian(model, x[3:], y[3:]), 2, num_iter=10, seed=7, image_ids=[3, 4])
    torch.testing.assert_close(eig_part, eig_whole[3:], rtol=1e-9, atol=0.0)


def test_input_gradient_is_per_image():
    model = tiny_net(nn.Tanh)
    x, y = batch(3)
    together = input_gradient(model, x, y)
    for i in range(3):
        alone = torch.func.grad(lambda xi: F.cross_entropy(model(xi[None]), y[i : i + 1]))(x[i])
        torch.testing.assert_close(together[i], alone, rtol=1e-10, atol=1e-14)


def test_bad_inputs_raise_clear_errors():
    model = tiny_net(nn.Tanh)
    x, y = batch(2)
    with pytest.raises(InputError, match="unknown Hessian estimator"):
        InputHessian(model, x, y, "newton")
    with pytest.raises(InputError, match="positive"):
        InputHessian(model, x, y, "finite_difference", h=0.0)
    with pytest.raises(InputError, match="pixels must lie in"):
        InputHessian(model, x + 2.0, y)
    hessian = InputHessian(model, x, y)
    with pytest.raises(InputError, match="shaped like the images"):
        hessian(torch.zeros(2, 48, dtype=torch.float64))
    with pytest.raises(InputError, match="at least 2"):
        frobenius_norm_sq(hessian, 1)
    with pytest.raises(InputError, match="image ids"):
        frobenius_norm_sq(hessian, 4, image_ids=[0])
    with pytest.raises(InputError, match="k <= num_iter"):
        top_eigenvalues(hessian, k=5, num_iter=3)
    with pytest.raises(InputError, match="input dimension"):
        top_eigenvalues(hessian, k=5, num_iter=49)
    with pytest.raises(InputError, match="inference mode"), torch.inference_mode():
        InputHessian(model, x, y)
    model.train()
    with pytest.raises(InputError, match="training mode"):
        InputHessian(model, x, y)


# -- helpers --------------------------------------------------------------------------------------


def _digits_cnn(activation: str) -> nn.Module:
    torch.manual_seed(0)
    model = smallcnn(DigitsDataModule.info, width=3, activation=activation, batch_norm=True).double()
    # Non-trivial batch-norm statistics, so that eval mode differs from the identity.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _digits(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    return torch.rand(n, 1, 8, 8, generator=generator, dtype=torch.float64), torch.randint(0, 10, (n,), generator=generator)
