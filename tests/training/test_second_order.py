"""The closed-form second-order backwards of batch norm and ReLU against torch's generic double
backward (``robustness/training/second_order.py``): the same gradients, layer by layer and over
whole CURE steps, and the layers' ``forward`` restored however a block is left."""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustness.data.digits import DigitsDataModule
from robustness.models.smallcnn import smallcnn
from robustness.registry import build
from robustness.training import second_order
from robustness.training.cure import CURE
from robustness.training.second_order import _BatchNormTrain, _ReLU

DIGITS = DigitsDataModule.info


def _digits_batch(n: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    torch.manual_seed(0)
    return torch.rand(n, 1, 8, 8, dtype=dtype), torch.randint(0, 10, (n,))


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    return {name: buffer.clone() for name, buffer in model.named_buffers()}


# ---------------------------------------------------------------------------------------------
# The closed forms against torch's generic double backward (float64): layer by layer, then a whole step


def _batch_norm_second_order(
    batch_norm: Callable[[Tensor, Tensor, Tensor], Tensor], used: tuple[str, ...], weight: Tensor
) -> tuple[Tensor | None, ...]:
    """Gradients w.r.t. (incoming gradient, input, weight) of <u, dx> + <u_w, dweight> + <u_b, dbias>
    (only the ``used`` terms), with dx, dweight, dbias batch-norm's backward taken with create_graph."""
    generator = torch.Generator().manual_seed(11)
    x = (2 * torch.randn(5, 3, 4, 4, generator=generator, dtype=torch.float64) + 0.5).requires_grad_(True)
    weight = weight.double().requires_grad_(True)
    bias = torch.randn(3, generator=generator, dtype=torch.float64).requires_grad_(True)
    grad_out = torch.randn(x.shape, generator=generator, dtype=torch.float64).requires_grad_(True)
    cotangents = {name: torch.randn(shape, generator=generator, dtype=torch.float64) for name, shape in (("dx", x.shape), ("dweight", (3,)), ("dbias", (3,)))}
    grads = dict(zip(("dx", "dweight", "dbias"), torch.autograd.grad(batch_norm(x, weight, bias), (x, weight, bias), grad_out, create_graph=True)))
    total = sum((grads[name] * cotangents[name]).sum() for name in used)
    return torch.autograd.grad(total, (grad_out, x, weight), allow_unused=True)


@pytest.mark.parametrize("keep_grad_out", [False, True])
@pytest.mark.parametrize("used", [("dx",), ("dweight",), ("dbias",), ("dx", "dweight", "dbias")])
def test_batch_norm_closed_form_matches_torchs_double_backward(keep_grad_out: bool, used: tuple[str, ...]) -> None:
    eps = 1e-3
    # Saving dx needs every weight away from zero; saving g works for any, a zero included.
    weight = torch.tensor([0.7, -1.3, 0.0 if keep_grad_out else 0.2])
    generic = _batch_norm_second_order(lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True, eps=eps), used, weight)
    ours = _batch_norm_second_order(lambda x, w, b: _BatchNormTrain.apply(x, w, b, None, None, 0.0, eps, keep_grad_out), used, weight)
    for name, expected, got in zip(("incoming gradient", "input", "weight"), generic, ours):
        expected = torch.zeros(()) if expected is None else expected
        got = torch.zeros(()) if got is None else got
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12), name


def test_batch_norm_backward_saves_its_output_not_its_incoming_gradient() -> None:
    # The memory saving: dx is what the layer before keeps anyway; g is kept only when a weight
    # is too close to zero for dx / gamma to give d back.
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(x.shape, dtype=torch.float64)
    for weight, keeps_grad_out in ((torch.tensor([1.0, -2.0, 0.5]), False), (torch.tensor([1.0, 0.0, 0.5]), True)):
        norm = nn.BatchNorm2d(3).double()
        with torch.no_grad():
            norm.weight.copy_(weight)
        with second_order.closed_form(norm):
            out = norm(x)
        (dx,) = torch.autograd.grad(out, x, grad_out, create_graph=True)
        saved = dx.grad_fn.saved_tensors[0]
        assert (saved.data_ptr() == grad_out.data_ptr()) is keeps_grad_out
        assert (saved.data_ptr() == dx.data_ptr()) is not keeps_grad_out


def test_relu_closed_form_matches_torchs_double_backward() -> None:
    generator = torch.Generator().manual_seed(12)
    x = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    g, u = (torch.randn(6, 5, generator=generator, dtype=torch.float64) for _ in range(2))
    results = []
    for relu in (torch.relu, _ReLU.apply):
        xs, gs = x.clone().requires_grad_(True), g.clone().requires_grad_(True)
        (dx,) = torch.autograd.grad(relu(xs), xs, gs, create_graph=True)
        results.append(torch.autograd.grad((dx * u).sum(), gs))
    assert torch.equal(results[0][0], results[1][0])


def _relu_batch_norm_cnn(zero_weight: bool) -> nn.Module:
    """smallcnn's layout (convolution, batch-norm, ReLU, max-pool) in float64, with random affine
    parameters; optionally one batch-norm weight entry at zero (the closed form's other path)."""
    torch.manual_seed(13)
    model = smallcnn(DIGITS, width=3, activation="relu", batch_norm=True).double().train()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5).mul_(torch.sign(torch.randn(module.weight.shape, dtype=torch.float64)))
                module.bias.uniform_(-0.3, 0.3)
        if zero_weight:
            next(module for module in model.modules() if isinstance(module, nn.BatchNorm2d)).weight[1] = 0.0
    return model


@pytest.mark.parametrize("bn_mode, fraction", [("batch", 1.0), ("batch", 0.5), ("running", 1.0)])
@pytest.mark.parametrize("zero_weight", [False, True])
def test_cure_step_gradients_equal_torchs_generic_double_backward(
    monkeypatch: pytest.MonkeyPatch, bn_mode: str, fraction: float, zero_weight: bool
) -> None:
    x, y = _digits_batch(8, torch.float64)
    cure = CURE(lam=0.7, h=0.4, bn_mode=bn_mode, fraction=fraction)
    results = []
    for closed_forms in (True, False):
        if not closed_forms:
            monkeypatch.setattr(second_order, "closed_form", second_order.generic)
        model = _relu_batch_norm_cnn(zero_weight)
        loss = cure.training_loss(model, x, y, epoch=0).loss
        loss.backward()
        results.append((float(loss.detach()), {name: p.grad for name, p in model.named_parameters()}, _buffers(model)))
    (loss_ours, grads_ours, buffers_ours), (loss_generic, grads_generic, buffers_generic) = results
    assert math.isclose(loss_ours, loss_generic, rel_tol=1e-12)
    for name, expected in grads_generic.items():
        assert torch.allclose(grads_ours[name], expected, rtol=1e-9, atol=1e-12), name
    for name, expected in buffers_generic.items():
        assert torch.equal(buffers_ours[name], expected), name


@pytest.mark.parametrize(
    "node",
    [
        {"name": "grad_align", "eps": 0.1, "lam": 0.9},
        {"name": "llr", "eps": 0.1, "steps": 3},
        {"name": "input_gradient_norm", "lam": 2.0},
        {"name": "jacobian", "lam": 0.5, "projections": 2},
    ],
    ids=lambda node: node["name"],
)
def test_every_double_backward_regularizer_gets_torchs_generic_gradients(monkeypatch: pytest.MonkeyPatch, node: dict) -> None:
    x, y = _digits_batch(8, torch.float64)
    results = []
    for closed_forms in (True, False):
        if not closed_forms:
            monkeypatch.setattr(second_order, "closed_form", second_order.generic)
        model = _relu_batch_norm_cnn(zero_weight=False)
        torch.manual_seed(5)  # the same random draws (noise, starts, projections) both times
        loss = build("regularizer", node).training_loss(model, x, y, epoch=0).loss
        loss.backward()
        results.append((float(loss.detach()), {name: p.grad for name, p in model.named_parameters()}, _buffers(model)))
    (loss_ours, grads_ours, buffers_ours), (loss_generic, grads_generic, buffers_generic) = results
    assert math.isclose(loss_ours, loss_generic, rel_tol=1e-12)
    for name, expected in grads_generic.items():
        assert torch.allclose(grads_ours[name], expected, rtol=1e-9, atol=1e-12), name
    for name, expected in buffers_generic.items():
        assert torch.equal(buffers_ours[name], expected), name


# ---------------------------------------------------------------------------------------------
# The patched forwards: restored on every way out, nested blocks included


def _patched(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if "forward" in vars(module)]


def test_forwards_are_restored_after_an_exception_inside_the_block() -> None:
    model = smallcnn(DIGITS, width=2).train()
    x, _ = _digits_batch(3)
    with pytest.raises(RuntimeError, match="inside"):
        with second_order.closed_form(model):
            assert len(_patched(model)) == 6  # three batch norms and three ReLUs
            model(x)
            raise RuntimeError("inside")
    assert _patched(model) == []
    # The model runs its own forward again: a batch norm's output is torch's, bit for bit.
    expected = nn.BatchNorm2d(2).train()(x.expand(3, 2, 8, 8))
    norm = nn.BatchNorm2d(2).train()
    with pytest.raises(ValueError):
        with second_order.closed_form(norm):
            raise ValueError
    assert torch.equal(norm(x.expand(3, 2, 8, 8)), expected)


def test_an_exception_while_patching_leaves_no_layer_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    model = smallcnn(DIGITS, width=2).train()
    calls = {"n": 0}
    real = second_order.partial

    def failing_on_the_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise MemoryError("while patching")
        return real(*args, **kwargs)

    monkeypatch.setattr(second_order, "partial", failing_on_the_fourth)
    with pytest.raises(MemoryError):
        with second_order.closed_form(model):
            pass
    assert _patched(model) == []


def test_nested_blocks_leave_the_outer_patch_in_place() -> None:
    model = smallcnn(DIGITS, width=2).train()
    with second_order.closed_form(model):
        outer = {name: vars(module)["forward"] for name, module in model.named_modules() if "forward" in vars(module)}
        with second_order.closed_form(model):
            pass
        assert {name: vars(module)["forward"] for name, module in model.named_modules() if "forward" in vars(module)} == outer
    assert _patched(model) == []


def test_a_users_own_forward_patch_is_left_alone() -> None:
    relu = nn.ReLU()
    own = lambda x: x * 0 + 7  # noqa: E731
    relu.forward = own
    with second_order.closed_form(relu):
        assert relu.forward is own
    assert relu.forward is own
