"""Vector-Jacobian products of many cotangents in one sweep (geometry/jacobian.py): the same
products as autograd's, exactly where the maths says they are, and autograd where a graph has an
operation without a rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from robustness.attacks import deepfool
from helpers import correctly_classified, digits_resnet18, train_digits_smallcnn
from robustness.geometry.jacobian import linearize
from robustness.tensors import inference_copy


def _autograd_products(model: nn.Module, x: torch.Tensor, cotangents: torch.Tensor) -> torch.Tensor:
    """Row [j, i]: the input gradient of <cotangents[j, i], model(x)[i]>, one backward call per j."""
    xa = x.detach().clone().requires_grad_(True)
    logits = model(xa)
    return torch.stack([torch.autograd.grad(logits, xa, c, retain_graph=True)[0] for c in cotangents])


class _Residual(nn.Module):
    """Conv -> eval batch norm -> relu twice, a skip sum whose gradient feeds two branches, then
    relu: a rule that overwrote the shared gradient in place would corrupt the other branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=2, dilation=2)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)  # overlapping windows
        self.fc = nn.Linear(4 * 2 * 2, 5)
        self.drop = nn.Dropout(0.5)
        self.tiles = nn.MaxPool2d(2)  # windows that tile the input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv1((x - 0.5) / 0.25)))
        skip = h
        h = torch.relu(self.conv2(h)) + skip
        h = self.pool(h).relu()
        h = self.tiles(h)
        return self.fc(self.drop(torch.flatten(h, 1)))


def _residual_graph(dtype: torch.dtype = torch.float64) -> tuple[fx.GraphModule, nn.Module]:
    torch.manual_seed(0)
    net = _Residual().to(dtype)
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.weight.uniform_(0.5, 1.5)
    net.eval()
    return fx.symbolic_trace(net), net


def test_sweep_equals_autograd_exactly_in_float64_on_a_residual_network() -> None:
    graph, net = _residual_graph()
    x = torch.rand(6, 2, 8, 8, dtype=torch.float64)
    at = linearize(graph, x)
    cotangents = torch.randn(7, 6, 5, dtype=torch.float64)
    kept = cotangents.clone()
    products = at.vjp(cotangents)
    assert at.swept
    torch.testing.assert_close(at.logits, net(x), rtol=0, atol=0)
    torch.testing.assert_close(products, _autograd_products(net, x, cotangents), rtol=1e-12, atol=1e-12)
    assert torch.equal(cotangents, kept)  # the caller's cotangents are not overwritten
    # the same sweep again (masks are kept, nothing was consumed)
    torch.testing.assert_close(at.vjp(cotangents), products, rtol=0, atol=0)


def test_sweep_of_a_linear_model_is_the_weight_matrix() -> None:
    """Closed form: for logits W x + b the product of cotangent c is W^T c, for every image."""
    layer = nn.Linear(12, 4).double().eval()
    graph = fx.symbolic_trace(nn.Sequential(nn.Flatten(), layer))
    x = torch.rand(3, 1, 3, 4, dtype=torch.float64)
    cotangents = torch.randn(2, 3, 4, dtype=torch.float64)
    expected = (cotangents @ layer.weight).view(2, 3, 1, 3, 4)
    torch.testing.assert_close(linearize(graph, x).vjp(cotangents), expected, rtol=1e-14, atol=1e-14)


def test_restricted_rows_give_those_rows_products_without_another_forward() -> None:
    graph, net = _residual_graph()
    x = torch.rand(8, 2, 8, 8, dtype=torch.float64)
    at = linearize(graph, x)
    keep = torch.tensor([True, False, True, True, False, True, False, True])
    inner = at.restricted(keep)
    innermost = inner.restricted(torch.tensor([0, 3, 4]))  # rows 0, 5, 7 of the batch
    cotangents = torch.randn(3, 3, 5, dtype=torch.float64)
    rows = torch.tensor([0, 5, 7])
    torch.testing.assert_close(innermost.logits, at.logits[rows], rtol=0, atol=0)
    torch.testing.assert_close(innermost.vjp(cotangents), _autograd_products(net, x[rows], cotangents), rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def digits_copy():
    model, splits = train_digits_smallcnn(width=16, epochs=3)
    x, y = correctly_classified(model, *splits["test"], limit=48)
    return model, inference_copy(model, x[:1], for_gradients=True), x, y


def test_sweep_of_the_folded_digits_copy_equals_autograd(digits_copy) -> None:
    model, copy, x, _ = digits_copy
    at = linearize(copy, x)
    assert at.swept
    cotangents = torch.randn(9, len(x), 10)
    expected = _autograd_products(model, x, cotangents)  # the model itself, batch norm unfolded
    torch.testing.assert_close(at.vjp(cotangents), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_sweep_of_the_folded_resnet18_equals_autograd() -> None:
    model, x, _ = digits_resnet18(limit=2)
    copy = inference_copy(model, x[:1], for_gradients=True)
    at = linearize(copy, x)
    assert at.swept
    cotangents = torch.randn(3, 2, 10)
    expected = _autograd_products(model, x, cotangents)
    torch.testing.assert_close(at.vjp(cotangents), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_models_that_are_not_graphs_or_hold_other_operations_get_autograd() -> None:
    class Counted(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            return self.inner(x)

    torch.manual_seed(1)
    smooth = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Softplus(), nn.Linear(8, 3)).double().eval()
    counted = Counted(smooth)
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    cotangents = torch.randn(2, 4, 3, dtype=torch.float64)
    for model in (counted, fx.symbolic_trace(smooth)):
        at = linearize(model, x)
        assert not at.swept
        torch.testing.assert_close(at.vjp(cotangents), _autograd_products(smooth, x, cotangents), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(at.restricted(torch.tensor([1, 3])).vjp(cotangents[:, [1, 3]]), _autograd_products(smooth, x[[1, 3]], cotangents[:, [1, 3]]), rtol=1e-12, atol=1e-12)
    assert counted.calls == 2  # the wrapper's own forward ran: it was not traced


def test_deepfool_on_the_copy_matches_deepfool_with_autograd_products(digits_copy) -> None:
    """The attack on the swept copy and on the model (autograd's products) lands on the same
    images: same iterations, perturbations equal to float round-off."""
    model, copy, x, y = digits_copy
    swept = deepfool(copy, x, y)
    plain = deepfool(model, x, y)
    assert swept.success.all() and plain.success.all()
    assert torch.equal(swept.steps, plain.steps)
    torch.testing.assert_close(swept.x_adv, plain.x_adv, rtol=0, atol=1e-4)


def test_a_gradient_shared_by_two_branches_is_not_overwritten_through_a_view() -> None:
    """The sum hands one gradient to both branches; the flatten branch passes a view of it to a
    ReLU that runs before the other branch: overwriting the view would corrupt the other's."""

    class TwoBranches(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second, self.head = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = torch.flatten(x, 1)
            other = torch.relu(self.second(flat))
            return self.head(torch.flatten(torch.relu(self.first(flat)), 1) + other)

    torch.manual_seed(2)
    net = TwoBranches().double().eval()
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    cotangents = torch.randn(4, 5, 3, dtype=torch.float64)
    at = linearize(fx.symbolic_trace(net), x)
    assert at.swept
    torch.testing.assert_close(at.vjp(cotangents), _autograd_products(net, x, cotangents), rtol=1e-12, atol=1e-12)
