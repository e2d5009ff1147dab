"""Attacks: closed forms on linear classifiers, agreement with foolbox, constraints, bad input."""

from __future__ import annotations

import math

import foolbox
import pytest
import torch
from torch import nn

from robustness.attacks import FGSM, PGDL2, AttackResult, DeepFool, FixedEpsilonAttack, MinimisationAttack, PGDLinf, RunnerUp, deepfool
from robustness.attacks.deepfool import _NUDGE
from helpers import correctly_classified, rho, train_digits_smallcnn
from robustness.errors import InputError
from robustness.registry import build

OVERSHOOT = 0.02


# ---------------------------------------------------------------- fixtures


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return nn.Sequential(nn.Flatten(), layer).eval()


@pytest.fixture(scope="module")
def linear_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 5-class linear model on 1x4x5 images whose boundaries all lie well inside the pixel box."""
    g = torch.Generator().manual_seed(3)
    d, c = 20, 5
    weight = torch.randn(c, d, generator=g) * 4.0
    # biases that put the boundaries near the centre of the box, so no step needs clipping
    bias = -0.5 * weight.sum(1) + 0.5 * torch.randn(c, generator=g)
    x = 0.35 + 0.3 * torch.rand(64, 1, 4, 5, generator=g)
    return _linear(weight, bias), x, weight, bias


@pytest.fixture(scope="module")
def digits_model():
    """A smallcnn trained on the digits in a few seconds, and 64 test images it classifies correctly."""
    model, splits = train_digits_smallcnn(width=16, epochs=6)
    x, y = correctly_classified(model, *splits["test"], limit=64)
    return model, x, y


def _boundary(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, source: torch.Tensor, other: torch.Tensor):
    """Distance from x to the hyperplane z_other = z_source, and that hyperplane's unit normal towards `other`."""
    xf = x.flatten(1)
    normal = weight[other] - weight[source]
    gap = ((xf @ weight.T + bias).gather(1, source[:, None]) - (xf @ weight.T + bias).gather(1, other[:, None])).squeeze(1)
    return gap / normal.norm(dim=1), normal / normal.norm(dim=1, keepdim=True)


# ---------------------------------------------------------------- DeepFool on linear classifiers


@pytest.mark.parametrize("num_candidates", [5, 2])
def test_deepfool_linear_equals_closed_form(linear_problem, num_candidates):
    model, x, weight, bias = linear_problem
    logits = model(x).detach()
    source = logits.argmax(1)
    if num_candidates == 5:
        # every other class is a candidate: the nearest boundary over all of them
        gaps = torch.stack([_boundary(weight, bias, x, source, torch.full_like(source, k))[0] for k in range(5)], 1)
        gaps[torch.arange(len(x)), source] = math.inf
        nearest = gaps.argmin(1)
    else:
        # only the runner-up logit is a candidate, even where another boundary is nearer
        nearest = logits.scatter(1, source[:, None], -math.inf).argmax(1)
    dist, normal = _boundary(weight, bias, x, source, nearest)

    result = deepfool(model, x, overshoot=OVERSHOOT, num_candidates=num_candidates)
    r = (result.x_adv - x).flatten(1)

    assert result.success.all() and (result.steps == 1).all()
    assert torch.allclose(result.norm / (1 + OVERSHOOT), dist, atol=1e-4)
    assert torch.allclose(r, (1 + OVERSHOOT) * (dist + _NUDGE)[:, None] * normal, atol=1e-5)
    assert ((r * normal).sum(1) / r.norm(dim=1)).min() > 1 - 1e-6
    if num_candidates == 2:
        gaps_all = torch.stack([_boundary(weight, bias, x, source, torch.full_like(source, k))[0] for k in range(5)], 1)
        gaps_all[torch.arange(len(x)), source] = math.inf
        assert (gaps_all.min(1).values < dist - 1e-3).any(), "the runner-up restriction must matter for some image"


def test_deepfool_linear_without_overshoot_still_crosses(linear_problem):
    model, x, weight, bias = linear_problem
    result = deepfool(model, x, overshoot=0.0)
    assert result.success.all()
    assert (model(result.x_adv).argmax(1) != model(x).argmax(1)).all()


def test_deepfool_targeted_linear_equals_distance_to_target_half_space(linear_problem):
    model, x, weight, bias = linear_problem
    source = model(x).argmax(1)
    # Every (image, target) pair whose single closed-form step lands in the target's region.
    images, targets, dists, normals = [], [], [], []
    for t in range(5):
        tt = torch.full_like(source, t)
        dist, normal = _boundary(weight, bias, x, source, tt)
        landing = x.flatten(1) + (1 + OVERSHOOT) * (dist + _NUDGE)[:, None] * normal
        ok = (source != t) & (model(landing.view_as(x)).argmax(1) == t)
        images.append(x[ok]), targets.append(tt[ok]), dists.append(dist[ok]), normals.append(normal[ok])
    xs, ts, dist, normal = torch.cat(images), torch.cat(targets), torch.cat(dists), torch.cat(normals)
    nearest_untargeted = model(deepfool(model, xs).x_adv).argmax(1)
    assert len(xs) >= 40 and (nearest_untargeted != ts).sum() >= 10, "targets must differ from the nearest class"

    result = deepfool(model, xs, target=ts, overshoot=OVERSHOOT)
    assert result.success.all() and (result.steps == 1).all()
    assert (model(result.x_adv).argmax(1) == ts).all()
    assert torch.allclose(result.norm / (1 + OVERSHOOT), dist, atol=1e-4)
    assert torch.allclose((result.x_adv - xs).flatten(1), (1 + OVERSHOOT) * (dist + _NUDGE)[:, None] * normal, atol=1e-5)


def test_deepfool_freezes_images_already_fooled(linear_problem):
    model, x, _, _ = linear_problem
    pred = model(x).argmax(1)
    y = pred.clone()
    y[::2] = (pred[::2] + 1) % 5  # half the labels already disagree with the model
    result = deepfool(model, x, y)
    assert result.success.all()
    assert torch.equal(result.x_adv[::2], x[::2]) and (result.steps[::2] == 0).all() and (result.norm[::2] == 0).all()
    assert (result.steps[1::2] == 1).all() and (result.norm[1::2] > 0).all()
    # targeted at the class it already has: nothing to do
    same = deepfool(model, x, target=pred)
    assert torch.equal(same.x_adv, x) and same.success.all() and (same.steps == 0).all()


# ---------------------------------------------------------------- DeepFool on a trained CNN


def test_deepfool_fools_every_correct_image_and_matches_foolbox(digits_model):
    model, x, y = digits_model
    result = DeepFool(overshoot=OVERSHOOT, max_iter=50, num_candidates=10)(model, x, y)
    assert isinstance(result, AttackResult)
    assert result.success.all()
    assert (model(result.x_adv).argmax(1) != y).all()
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert torch.allclose(result.norm, (result.x_adv - x).flatten(1).norm(dim=1))
    assert (result.steps >= 1).all() and (result.steps <= 50).all()

    model.requires_grad_(False)  # foolbox calls .backward(); keep weight gradients out of the model
    try:
        attack = foolbox.attacks.L2DeepFoolAttack(steps=50, candidates=10, overshoot=OVERSHOOT)
        _, fb_adv, fb_success = attack(foolbox.PyTorchModel(model, bounds=(0, 1)), x, y, epsilons=None)
    finally:
        model.requires_grad_(True)
    assert fb_success.all()
    ours, theirs = rho(result.x_adv, x).median(), rho(fb_adv, x).median()
    assert abs(ours / theirs - 1) < 0.02, (ours, theirs)


def test_deepfool_batch_equals_one_image_at_a_time(digits_model):
    model, x, y = digits_model
    batch = deepfool(model, x[:4], y[:4])
    for i in range(4):
        single = deepfool(model, x[i : i + 1], y[i : i + 1])
        assert torch.allclose(single.x_adv, batch.x_adv[i : i + 1], atol=1e-5)
        assert single.steps.item() == batch.steps[i].item()


def test_deepfool_targeted_reaches_its_targets(digits_model):
    model, x, y = digits_model
    target = (y + 1 + torch.arange(len(y)) % 9) % 10  # every other class, never y
    result = deepfool(model, x[:32], target=target[:32])
    assert result.success.float().mean() >= 0.95
    pred = model(result.x_adv).argmax(1)
    assert torch.equal(pred == target[:32], result.success)
    # reaching a chosen class costs more than leaving the source class for the nearest one
    untargeted = deepfool(model, x[:32], y[:32])
    assert result.norm.median() > untargeted.norm.median()


# ---------------------------------------------------------------- runner-up


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_runner_up_ends_with_initial_runner_up_on_top(digits_model, norm):
    model, x, y = digits_model
    with torch.no_grad():
        runner_up = model(x).topk(2, dim=1).indices[:, 1]
    attack = RunnerUp(step_size=0.05 if norm == "l2" else 0.01, max_steps=300, norm=norm)
    result = attack(model, x)
    assert result.success.all()
    assert torch.equal(model(result.x_adv).argmax(1), runner_up)
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert (result.steps >= 1).all() and len(result.steps.unique()) > 3  # each image stops at its own success


def test_runner_up_steps_match_closed_form_on_two_class_linear_model():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(2, 12, generator=g)
    bias = -0.5 * weight.sum(1)  # the boundary passes through the centre of the box
    model = _linear(weight, bias)
    x = 0.4 + 0.2 * torch.rand(16, 1, 3, 4, generator=g)
    source = model(x).argmax(1)
    dist, normal = _boundary(weight, bias, x, source, 1 - source)
    step = 0.01
    expected_steps = torch.ceil(dist / step).long()  # margin grows by exactly `step` of distance per step
    result = RunnerUp(step_size=step, max_steps=1000)(model, x)
    assert result.success.all() and torch.equal(result.steps, expected_steps)
    assert torch.allclose((result.x_adv - x).flatten(1), (expected_steps * step)[:, None] * normal, atol=1e-5)


def test_runner_up_target_replaces_runner_up(digits_model):
    model, x, y = digits_model
    with torch.no_grad():
        third = model(x[:32]).topk(3, dim=1).indices[:, 2]
    result = RunnerUp(step_size=0.05, max_steps=400)(model, x[:32], target=third)
    assert result.success.all() and torch.equal(model(result.x_adv).argmax(1), third)


# ---------------------------------------------------------------- PGD and FGSM


@pytest.mark.parametrize(
    "attack, lp",
    [
        (PGDLinf(eps=0.1, step_size=0.03, steps=10), math.inf),
        (PGDL2(eps=0.8, step_size=0.2, steps=10), 2),
        (FGSM(eps=0.1), math.inf),
    ],
)
def test_pgd_stays_in_eps_ball_and_pixel_box(digits_model, attack, lp):
    model, x, y = digits_model
    torch.manual_seed(0)
    result = attack(model, x, y)
    delta = (result.x_adv - x).flatten(1)
    assert delta.norm(p=lp, dim=1).max() <= attack.eps + 1e-6
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert torch.equal(result.success, model(result.x_adv).argmax(1) != y)
    # ascent on the loss: a random perturbation of the same size fools far fewer images
    noise = torch.randn_like(x).sign() if lp == math.inf else torch.randn_like(x)
    noise = noise / noise.flatten(1).norm(p=lp, dim=1).view(-1, 1, 1, 1) * attack.eps
    noisy = model((x + noise).clamp(0, 1)).argmax(1) != y
    assert result.success.float().mean() > noisy.float().mean() + 0.2


def test_fgsm_is_one_clipped_sign_step(digits_model):
    model, x, y = digits_model
    xa = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(xa), y, reduction="sum"), xa)
    result = FGSM(eps=0.05)(model, x, y)
    assert torch.allclose(result.x_adv, (x + 0.05 * grad.sign()).clamp(0, 1), atol=1e-6)


def test_pgd_targeted_moves_towards_target(digits_model):
    model, x, y = digits_model
    target = (y + 3) % 10
    result = PGDL2(eps=2.0, step_size=0.3, steps=20)(model, x, target=target)
    assert torch.equal(result.success, model(result.x_adv).argmax(1) == target)
    assert result.success.float().mean() > 0.5


# ---------------------------------------------------------------- shared contract and bad input


ATTACKS = [
    DeepFool(max_iter=3),
    RunnerUp(step_size=0.05, max_steps=3),
    PGDLinf(eps=0.05, step_size=0.01, steps=2),
    PGDL2(eps=0.5, step_size=0.1, steps=2),
    FGSM(eps=0.05),
]
IDS = ["deepfool", "runner_up", "pgd_linf", "pgd_l2", "fgsm"]


@pytest.mark.parametrize("attack", ATTACKS, ids=IDS)
def test_attack_leaves_model_state_alone(digits_model, attack):
    model, x, y = digits_model
    flags = [True, False] * len(list(model.parameters()))
    for p, flag in zip(model.parameters(), flags):
        p.requires_grad_(flag)
    try:
        with torch.no_grad():  # attacks turn gradients on themselves
            result = attack(model, x[:8], y[:8])
        assert not model.training
        assert [p.requires_grad for p in model.parameters()] == flags[: len(list(model.parameters()))]
        assert all(p.grad is None for p in model.parameters())
        assert result.x_adv.shape == x[:8].shape and result.x_adv.device == x.device and not result.x_adv.requires_grad
        assert result.success.dtype == torch.bool and result.steps.dtype == torch.long and result.norm.shape == (8,)
    finally:
        model.requires_grad_(True)


@pytest.mark.parametrize("name", IDS)
def test_attack_configs_build(name):
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[2] / "conf" / "attack" / f"{name}.yaml"
    attack = build("attack", OmegaConf.load(conf))
    assert type(attack).__name__ == type(ATTACKS[IDS.index(name)]).__name__


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: PGDLinf(eps=-0.1), "eps must be >= 0"),
        (lambda: PGDL2(eps=-1.0), "eps must be >= 0"),
        (lambda: FGSM(eps=-0.01), "eps must be >= 0"),
        (lambda: PGDLinf(steps=0), "steps must be a positive integer"),
        (lambda: DeepFool(overshoot=-0.1), "overshoot must be >= 0"),
        (lambda: DeepFool(num_candidates=1), "num_candidates"),
        (lambda: RunnerUp(norm="l1"), "unknown norm"),
        (lambda: RunnerUp(step_size=0.0), "step_size must be > 0"),
    ],
)
def test_bad_attack_parameters(build, match):
    with pytest.raises(InputError, match=match) as info:
        build()
    assert info.value.hint


@pytest.mark.parametrize("attack", ATTACKS, ids=IDS)
def test_bad_inputs_get_clear_errors(digits_model, attack):
    model, x, y = digits_model
    x, y = x[:4], y[:4]
    nan = x.clone()
    nan[1, 0, 2, 2] = float("nan")
    cases = [
        ((model, nan, y), {}, "NaN"),
        ((model, x * 2.0, y), {}, r"\[0, 1\]"),
        ((model, x - 0.5, y), {}, r"\[0, 1\]"),
        ((model, x, torch.tensor([0, 1, 2, 10])), {}, r"labels must lie in \[0, 9\]"),
        ((model, x, torch.tensor([0, -1, 2, 3])), {}, r"labels must lie in \[0, 9\]"),
        ((model, x, y[:3]), {}, "4 images but 3 labels"),
        ((model, x, y), {"target": torch.tensor([0, 1, 2, 12])}, r"target classes must lie in \[0, 9\]"),
        ((model, x.double(), y), {}, "move the images"),
    ]
    for args, kwargs, match in cases:
        with pytest.raises(InputError, match=match):
            attack(*args, **kwargs)
    model.train()
    try:
        with pytest.raises(InputError, match="training mode") as info:
            attack(model, x, y)
        assert "model.eval()" in info.value.hint
    finally:
        model.eval()
    with torch.inference_mode(), pytest.raises(InputError, match="inference mode"):
        attack(model, x, y)


@pytest.mark.parametrize("attack", ATTACKS, ids=IDS)
def test_empty_batch(digits_model, attack):
    model, x, _ = digits_model
    result = attack(model, x[:0])
    assert result.x_adv.shape == (0, *x.shape[1:]) and result.success.shape == (0,) and result.norm.shape == (0,)


# ---------------------------------------------------------------- the two attack shapes


class _ForwardCounter(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x)


def test_attacks_are_one_of_two_kinds():
    from robustness.attacks.colour import ColourAttack

    for attack in (DeepFool(), RunnerUp()):
        assert isinstance(attack, MinimisationAttack) and not isinstance(attack, FixedEpsilonAttack)
    for attack in (PGDLinf(), PGDL2(), FGSM(), ColourAttack()):
        assert isinstance(attack, FixedEpsilonAttack) and not isinstance(attack, MinimisationAttack)
    assert (PGDLinf().norm, PGDL2().norm, FGSM().norm) == ("linf", "l2", "linf")


def test_with_eps_moves_the_radius_and_the_relative_step():
    from robustness.attacks.colour import ColourAttack

    pgd = PGDLinf(eps=0.1, step_size=0.01, steps=7).with_eps(0.2, relative_step=0.25)
    assert isinstance(pgd, PGDLinf) and (pgd.eps, pgd.step_size, pgd.steps) == (0.2, 0.05, 7)
    assert PGDL2(eps=0.5, step_size=0.1).with_eps(1.0).step_size == 0.1  # no relative step: kept
    assert FGSM(eps=0.1).with_eps(0.3, relative_step=0.25).eps == 0.3
    colour = ColourAttack(max_hue=45.0, grid=3)
    wider = colour.with_eps(90.0)
    assert (wider.eps, wider.max_hue, wider.grid, colour.max_hue) == (90.0, 90.0, 3, 45.0)
    with pytest.raises(InputError, match="eps must be >= 0"):
        PGDLinf().with_eps(-0.1)


def test_deepfool_success_comes_from_its_last_forward(linear_problem):
    """One step on a linear model: the clean forward and the forward that finds the image fooled,
    and no third forward for the success mask."""
    model, x, _, _ = linear_problem
    counted = _ForwardCounter(model).eval()
    result = DeepFool()(counted, x)
    assert counted.calls == 2 and result.success.all()
    # the base's one criterion agrees with the model on the returned images
    assert torch.equal(result.success, model(result.x_adv).argmax(1) != model(x).argmax(1))


def test_success_is_decided_by_the_base_for_every_attack(digits_model):
    model, x, y = digits_model
    target = (y + 1) % 10
    for attack in ATTACKS:
        for kwargs, reached in (({}, lambda p: p != y[:16]), ({"target": target[:16]}, lambda p: p == target[:16])):
            if isinstance(attack, RunnerUp) and not kwargs:
                continue  # its untargeted goal is the runner-up class: covered above
            result = attack(model, x[:16], y[:16], **kwargs)
            assert torch.equal(result.success, reached(model(result.x_adv).argmax(1))), type(attack).__name__
