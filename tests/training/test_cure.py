"""CURE: the penalty against closed forms and finite differences, the step's structure, safety, DDP."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from robustness.data.digits import DigitsDataModule
from robustness.errors import ConfigError, InputError, TrainingError
from robustness.registry import build
from robustness.models.smallcnn import smallcnn
from robustness.store import ModelStore
import robustness.training.cure as cure_module
from robustness.training.cure import (
    CURE,
    _BatchNormTrain,
    _ReLU,
    _closed_form_second_order,
    curvature_penalty,
    mean_curvature_penalty,
    penalty_forward,
    sign_direction,
)
from robustness.training.module import ClassifierModule

from helpers import compose, run_outcome
from cure_ddp_worker import BAD_STEP, DDP_STEPS, ddp_batches, ddp_models, train_on_rank

DIGITS = DigitsDataModule.info


def _half_squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    return 0.5 * (outputs - targets).pow(2).sum(dim=1)


class _FlatLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))


def _smooth_mlp(hidden: int = 6) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Softplus(), nn.Linear(hidden, 10))


def _smooth_bn_cnn(width: int = 3) -> nn.Module:
    """Smooth in pixels and weights (no max-pool, whose switching argmax makes input gradients jump)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.Softplus(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.Tanh(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10),
    )


def _digits_batch(n: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    torch.manual_seed(0)
    x = torch.rand(n, 1, 8, 8, dtype=dtype)
    y = torch.randint(0, 10, (n,))
    return x, y


# ---------------------------------------------------------------------------------------------
# The penalty's value


@pytest.mark.parametrize("squared", [True, False])
def test_penalty_equals_exact_hessian_term_on_quadratic_loss(squared: bool) -> None:
    # l(x) = 1/2 ||A x + b - t||^2 is exactly quadratic, so grad l(x + hz) - grad l(x) = H (h z)
    # with H = A^T A, for any h.
    torch.manual_seed(0)
    model = _FlatLinear(12, 5).double()
    x = torch.rand(4, 2, 2, 3, dtype=torch.float64)
    targets = torch.randn(4, 5, dtype=torch.float64)
    h = 0.7
    terms = curvature_penalty(model, x, targets, h, squared=squared, loss_fn=_half_squared_error)

    A, b = model.linear.weight.detach(), model.linear.bias.detach()
    for i in range(len(x)):
        loss_i = lambda flat: 0.5 * (A @ flat + b - targets[i]).pow(2).sum()  # noqa: E731
        hessian = torch.func.hessian(loss_i)(x[i].flatten())
        gradient = torch.func.grad(loss_i)(x[i].flatten())
        z = torch.sign(gradient) / torch.sign(gradient).norm()
        expected = (hessian @ (h * z)).pow(2).sum()
        expected = expected if squared else expected.sqrt()
        assert torch.allclose(terms.direction[i].flatten(), z, atol=1e-12)
        assert abs(float(terms.penalty[i]) - float(expected)) <= 1e-5 * max(1.0, float(expected))


def test_penalty_matches_per_example_gradients_of_a_smooth_network() -> None:
    torch.manual_seed(1)
    model = _smooth_mlp().double()
    x, y = _digits_batch(5, torch.float64)
    h = 0.5
    terms = curvature_penalty(model, x, y, h)

    for i in range(len(x)):
        loss_i = lambda image: F.cross_entropy(model(image[None]), y[i : i + 1])  # noqa: E731
        clean = torch.func.grad(loss_i)(x[i])
        z = torch.sign(clean) / torch.sign(clean).flatten().norm()
        shifted = torch.func.grad(loss_i)(x[i] + h * z)
        expected = (shifted - clean).pow(2).sum().detach()
        assert torch.allclose(terms.clean_grad[i], clean, atol=1e-12)
        assert math.isclose(float(terms.penalty[i]), float(expected), rel_tol=1e-10)


def test_sign_direction_is_unit_norm_and_zero_for_a_zero_gradient() -> None:
    grad = torch.tensor([[[3.0, -0.5, 0.0, 2.0]], [[0.0, 0.0, 0.0, 0.0]]])
    z = sign_direction(grad)
    assert torch.allclose(z[0], torch.tensor([[1.0, -1.0, 0.0, 1.0]]) / math.sqrt(3))
    assert torch.equal(z[1], torch.zeros(1, 4))


def test_bad_inputs_raise_clear_errors() -> None:
    model = _smooth_mlp()
    x, y = _digits_batch(3)
    with pytest.raises(InputError, match="labels"):
        curvature_penalty(model, x, y[:2], 1.0)
    with pytest.raises(InputError, match="positive"):
        curvature_penalty(model, x, y, -1.0)
    with pytest.raises(InputError, match="one loss per example"):
        curvature_penalty(model, x, y, 1.0, loss_fn=lambda logits, labels: F.cross_entropy(logits, labels))


# ---------------------------------------------------------------------------------------------
# The penalty's gradient w.r.t. the parameters, against central finite differences


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    return {name: buffer.clone() for name, buffer in model.named_buffers()}


def _directional_check(model: nn.Module, cure: CURE, x: Tensor, y: Tensor, seed: int) -> None:
    """<grad of the CURE loss, v> against (L(theta + eps v) - L(theta - eps v)) / 2 eps."""
    model.train()
    start_buffers = _buffers(model)
    params = [p for p in model.parameters()]

    def loss_now() -> Tensor:
        # Every step updates batch-norm running statistics; start each evaluation from the same ones.
        for name, buffer in model.named_buffers():
            buffer.copy_(start_buffers[name])
        return cure.training_loss(model, x, y, epoch=0).loss

    loss = loss_now()
    grads = torch.autograd.grad(loss, params)
    generator = torch.Generator().manual_seed(seed)
    eps = 1e-5
    for _ in range(2):
        direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
        analytic = sum(float((g * v).sum()) for g, v in zip(grads, direction))
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.add_(eps * v)
        plus = float(loss_now().detach())
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.sub_(2 * eps * v)
        minus = float(loss_now().detach())
        with torch.no_grad():
            for p, v in zip(params, direction):
                p.add_(eps * v)
        numeric = (plus - minus) / (2 * eps)
        assert math.isclose(analytic, numeric, rel_tol=1e-6, abs_tol=1e-8), (analytic, numeric)


@pytest.mark.parametrize(
    "bn_mode, fraction, squared",
    [("batch", 1.0, True), ("running", 1.0, False), ("batch", 0.5, True), ("running", 0.5, True)],
)
def test_penalty_parameter_gradient_matches_central_differences_with_batch_norm(bn_mode: str, fraction: float, squared: bool) -> None:
    torch.manual_seed(2)
    model = _smooth_bn_cnn().double()
    # Give the running statistics values a fresh model would not have, so 'running' differs from 'batch'.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    x, y = _digits_batch(6, torch.float64)
    cure = CURE(lam=0.3, h=0.4, squared=squared, bn_mode=bn_mode, fraction=fraction)
    _directional_check(model, cure, x, y, seed=3)


def test_penalty_parameter_gradient_matches_central_differences_without_batch_norm() -> None:
    torch.manual_seed(4)
    model = _smooth_mlp().double()
    x, y = _digits_batch(5, torch.float64)
    _directional_check(model, CURE(lam=2.0, h=0.3, bn_mode="running"), x, y, seed=5)


# ---------------------------------------------------------------------------------------------
# The step's structure: shared forwards, batch-norm statistics, logs


def _count_forwards(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize(
    "batch_norm, bn_mode, fraction, forwards",
    [
        (True, "batch", 1.0, 2),  # the training forward gives grad l(x)
        (False, "running", 1.0, 2),  # same function in both modes: shared too
        (True, "running", 1.0, 3),  # running statistics differ from the training forward's
        (True, "batch", 0.5, 3),  # a sub-batch has its own batch statistics
    ],
)
def test_clean_forward_is_reused_where_the_maths_allows(batch_norm: bool, bn_mode: str, fraction: float, forwards: int) -> None:
    torch.manual_seed(6)
    model = smallcnn(DIGITS, width=4, activation="softplus", batch_norm=batch_norm).double().train()
    x, y = _digits_batch(8, torch.float64)
    cure = CURE(lam=1.0, h=0.5, bn_mode=bn_mode, fraction=fraction)
    start_buffers = _buffers(model)
    calls = _count_forwards(model)
    out = cure.training_loss(model, x, y, epoch=0)
    assert calls[0] == forwards

    # The logged penalty is the penalty of the chosen forward, computed from scratch.
    for name, buffer in model.named_buffers():
        buffer.copy_(start_buffers[name])
    n = cure.penalty_size(len(x))
    reference = curvature_penalty(penalty_forward(model, bn_mode), x[:n], y[:n], 0.5)
    assert math.isclose(float(out.logs["cure_penalty"]), float(reference.penalty.mean()), rel_tol=1e-10)
    assert math.isclose(float(out.logs["grad_norm"]), float(reference.clean_grad.flatten(1).norm(dim=1).mean()), rel_tol=1e-10)
    assert math.isclose(float(out.logs["ce"]), float(F.cross_entropy(model(x), y).detach()), rel_tol=1e-10)
    assert math.isclose(float(out.loss.detach()), float(out.logs["ce"]) + float(reference.penalty.mean()), rel_tol=1e-10)
    assert set(out.logs) == {"ce", "cure_penalty", "grad_norm", "cure_h"}


@pytest.mark.parametrize("bn_mode", ["batch", "running"])
def test_running_statistics_move_once_per_step_from_the_clean_batch(bn_mode: str) -> None:
    torch.manual_seed(7)
    model = smallcnn(DIGITS, width=4, activation="relu", batch_norm=True).train()
    twin = smallcnn(DIGITS, width=4, activation="relu", batch_norm=True).train()
    twin.load_state_dict(model.state_dict())
    x, y = _digits_batch(16)
    CURE(lam=1.0, h=0.5, bn_mode=bn_mode).training_loss(model, x, y, epoch=0)
    twin(x)
    for (name, buffer), (_, expected) in zip(model.named_buffers(), twin.named_buffers()):
        assert torch.equal(buffer, expected), name
    assert model.training and all(module.training for module in model.modules())


def test_h_schedule_ramps_then_repeats_its_last_value() -> None:
    cure = CURE(h=[0.1, 0.4, 0.8, 1.8, 3])
    assert [cure.h_at(epoch) for epoch in range(7)] == [0.1, 0.4, 0.8, 1.8, 3.0, 3.0, 3.0]
    assert CURE(h=2).h_at(9) == 2.0
    torch.manual_seed(8)
    x, y = _digits_batch(4)
    assert cure.training_loss(_smooth_mlp(), x, y, epoch=1).logs["cure_h"] == 0.4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lam": -1.0}, "lam"),
        ({"h": []}, "h"),
        ({"h": [0.1, -2]}, "h"),
        ({"h": "big"}, "h"),
        ({"squared": "no"}, "squared"),
        ({"bn_mode": "frozen"}, "bn_mode"),
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
    ],
)
def test_bad_configuration_is_a_config_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        CURE(**kwargs)
    assert info.value.hint


def test_compiled_models_are_refused() -> None:
    compiled = torch.compile(_smooth_mlp())
    x, y = _digits_batch(2)
    with pytest.raises(ConfigError, match="double backward"):
        CURE().training_loss(compiled, x, y, epoch=0)


# ---------------------------------------------------------------------------------------------
# The closed-form second-order backwards against torch's generic double backward (float64)


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
        with _closed_form_second_order(norm):
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
            monkeypatch.setattr(cure_module, "_closed_form_second_order", lambda model: nullcontext())
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


# ---------------------------------------------------------------------------------------------
# Numerical safety


class _NaNOutsideUnitBox(nn.Module):
    """A classifier whose output is NaN once any pixel leaves [0, 1]: the shifted forward's is."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _smooth_mlp()

    def forward(self, x: Tensor) -> Tensor:
        logits = self.net(x)
        return logits * float("nan") if bool((x > 1).any()) else logits


@pytest.mark.filterwarnings("ignore:`training_step` returned `None`")
def test_non_finite_penalty_never_updates_weights_and_stops_the_run() -> None:
    torch.manual_seed(9)
    model = _NaNOutsideUnitBox()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x, y = _digits_batch(32)
    out = CURE(lam=1.0, h=5.0).training_loss(model, x, y, epoch=0)
    assert math.isfinite(float(out.logs["ce"])) and not math.isfinite(float(out.loss.detach()))
    # lam = 0 logs the penalty only, but a non-finite one still marks the step as bad.
    assert not math.isfinite(float(CURE(lam=0.0, h=5.0).training_loss(model, x, y, epoch=0).loss.detach()))

    module = ClassifierModule(model, num_classes=10, regularizer=CURE(lam=1.0, h=5.0), max_bad_steps=3)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(TrainingError, match="3 consecutive"):
        trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    assert module.skipped_steps == 3
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


# ---------------------------------------------------------------------------------------------
# DDP: two CPU processes (gloo)

def test_ddp_ranks_keep_identical_parameters_and_skip_bad_steps_together(tmp_path: Path) -> None:
    mp.spawn(train_on_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    expected_finite = [index != BAD_STEP for index in range(DDP_STEPS)]
    initial = {name: {k: v.detach().clone() for k, v in model.named_parameters()} for name, (model, _) in ddp_models().items()}
    for name in initial:
        assert ranks[0][name]["finite"] == expected_finite and ranks[1][name]["finite"] == expected_finite
        # Parameters only: DDP hands rank 0's buffers to every rank at the start of each forward,
        # after which each rank's batch-norm statistics move with its own batch.
        for key, value in ranks[0][name]["params"].items():
            assert torch.equal(value, ranks[1][name]["params"][key]), (name, key)
            if key.endswith("weight"):  # (a bias right before batch-norm has no gradient)
                assert not torch.equal(value, initial[name][key]), (name, key)

    # Without batch statistics the loss is a mean over examples, so DDP's averaged gradient of
    # two half-batches is the full batch's: one process on whole batches lands on the same weights.
    model, cure = ddp_models()["mlp_running"]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for index, (x, y) in enumerate(ddp_batches()):
        if index == BAD_STEP:
            continue
        optimizer.zero_grad()
        cure.training_loss(model, x, y, epoch=0).loss.backward()
        optimizer.step()
    for key, value in model.named_parameters():
        assert torch.allclose(value, ranks[0]["mlp_running"]["params"][key], atol=1e-6), key


# ---------------------------------------------------------------------------------------------
# Training on digits


def test_cure_on_the_digits_recipe_lowers_held_out_curvature_below_base(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    small = ["model.width=8", "trainer.max_epochs=3"]
    run_outcome("train", small, tmp_path, artifacts_dir=store_dir)
    outcome = run_outcome("train", ["regularizer=cure", *small], tmp_path, artifacts_dir=store_dir)
    assert outcome.metrics["skipped_steps"] == 0
    assert {"train/ce_epoch", "train/cure_penalty_epoch", "train/grad_norm_epoch"} <= set(outcome.metrics)

    cfg = compose("train", ["regularizer=cure", *small])
    h = build("regularizer", cfg.regularizer).h_at(cfg.trainer.max_epochs - 1)  # the step it trained with last
    store = ModelStore(store_dir, "digits", "smallcnn")
    x, y = DigitsDataModule(seed=0).split_tensors("test")
    penalty, accuracy = {}, {}
    for variant in ("base", "cure"):
        model = store.load_into(store.aliases()[variant], build("model", cfg.model, info=DIGITS), DIGITS, OmegaConf.to_container(cfg.model)).eval()
        penalty[variant] = mean_curvature_penalty(model, x, y, h)
        with torch.no_grad():
            accuracy[variant] = float((model(x).argmax(1) == y).float().mean())
    assert penalty["cure"] < 0.2 * penalty["base"], penalty
    assert accuracy["cure"] > 0.6, accuracy  # flatter without giving up on the classes
