"""The certifier: the exact walk (geometry/walk.py), the interval bounds in float64 and in float32
rounded outwards (geometry/bounds.py), and their combination (geometry/certify.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from robustness.attacks.deepfool import DeepFool
from robustness.data.base import DatasetInfo
from robustness.errors import ConfigError, InputError
from robustness.geometry.bounds import bound_problems, interval_margin_bounds
from robustness.geometry.certify import BOUND_CHECK_COST, Certifier, certify_with_bounds
from robustness.geometry.paths import find_paths
from robustness.geometry.walk import _pair, certify_segments, max_pool_windows, piecewise_linear_problems
from robustness.tensors import predict

# ---------------------------------------------------------------- small piecewise-linear networks


def random_relu_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)  # larger weights: more pieces and more class changes per segment
    return model


def tiny_conv_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.3, 0.3), bn.running_var.uniform_(0.5, 2.0), bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), bn, nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 3)).double().eval()


def activation_pattern(model: nn.Module, x: Tensor) -> Tensor:
    """Every ReLU's signs and every max-pool's winners at the points x, by brute force."""
    parts: list[Tensor] = []
    hooks = []
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            hooks.append(module.register_forward_hook(lambda m, i, o: parts.append((i[0] > 0).flatten(1).long())))
        if isinstance(module, nn.MaxPool2d):
            hooks.append(module.register_forward_hook(
                lambda m, i, o: parts.append(torch.nn.functional.max_pool2d(i[0], m.kernel_size, m.stride, return_indices=True)[1].flatten(1))
            ))
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, 2, 1), nn.MaxPool2d((2, 3), (1, 2)), nn.MaxPool2d(2, dilation=2)])
def test_max_pool_windows_hold_each_outputs_entries_in_place(pool: nn.MaxPool2d) -> None:
    x = torch.randn(3, 2, 9, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    windows = max_pool_windows(pool, x, -math.inf)
    out = pool(x)
    assert windows.shape == (3, 2, windows.shape[2], out.shape[2] * out.shape[3])
    assert windows.shape[2] == math.prod(_pair(pool.kernel_size))
    assert torch.equal(windows.amax(2).view(out.shape), out)  # every output position sees exactly its own window


@pytest.mark.parametrize("build, shape", [(random_relu_mlp, (2,)), (tiny_conv_net, (1, 4, 4))])
def test_piece_boundaries_match_a_dense_brute_force_sampling(build, shape: tuple[int, ...]) -> None:
    model = build(0)
    generator = torch.Generator().manual_seed(1)
    a = 2 * torch.randn(8, *shape, generator=generator, dtype=torch.float64)
    b = 2 * torch.randn(8, *shape, generator=generator, dtype=torch.float64)
    label = predict(model, a)
    found = certify_segments(model, a, b, label, record_breakpoints=True)
    ts = torch.linspace(0, 1, 100001, dtype=torch.float64)
    step = float(ts[1])
    total = 0
    for i in range(len(a)):
        points = a[i] + ts.view(-1, *([1] * len(shape))) * (b[i] - a[i])
        pattern = activation_pattern(model, points)
        changes = ts[(pattern[1:] != pattern[:-1]).any(1).nonzero().flatten()]  # a change within (t, t + step]
        walked = torch.tensor(found.breakpoints[i], dtype=torch.float64)
        if found.status[i] == "exits":
            changes = changes[changes < float(found.exit_t[i]) - step]  # the walk stops at the exit
        else:
            assert found.status[i] == "certified"
        # every change the dense grid sees is a walked boundary, and every walked boundary a change
        for t in changes.tolist():
            assert ((walked > t - 1e-12) & (walked <= t + step + 1e-12)).any(), (i, t)
        for t in walked.tolist():
            assert ((changes >= t - step - 1e-12) & (changes < t + 1e-12)).any(), (i, t)
        assert int(found.pieces[i]) == len(walked) + 1
        total += len(walked)
        # the certificate agrees with the labels of the dense grid
        first_out = (predict(model, points) != label[i]).nonzero().flatten()
        if found.status[i] == "certified":
            assert len(first_out) == 0
        else:
            assert float(found.exit_t[i]) == pytest.approx(float(ts[first_out[0]]), abs=step)
    assert total >= 10  # the comparison covered many pieces
    assert set(found.status) == {"certified", "exits"}


def test_segment_over_its_piece_budget_is_uncertified_and_its_path_sampled_only() -> None:
    model = random_relu_mlp(0)
    a = torch.tensor([[1.262426814259294, -1.7982703257729509]], dtype=torch.float64)
    b = torch.tensor([[-1.1155868871565213, 1.3814375768516804]], dtype=torch.float64)
    label = predict(model, a)
    full = certify_segments(model, a, b, label)
    assert full.status == ["certified"] and int(full.pieces[0]) == 10  # in the class, across 10 linear pieces
    capped = certify_segments(model, a, b, label, max_pieces=2)
    assert capped.status == ["over_budget"] and int(capped.pieces[0]) == 2 and math.isnan(float(capped.exit_t[0]))
    # the search keeps the segment (its sampled checks pass) but cannot call the path certified
    walk_only = Certifier(max_pieces=2, bisect_depth=None)
    (path,) = find_paths(model, a, b, label, attack=DeepFool(), certifier=walk_only)
    assert path.success and path.status == "sampled" and path.uncertified == 1 and path.pieces == 2
    (enough,) = find_paths(model, a, b, label, attack=DeepFool(), certifier=Certifier(bisect_depth=None))
    assert enough.status == "certified" and enough.pieces == 10 and len(enough.vertices) == 2
    # the bounds prove it for the price of three bounded intervals (the whole, then its halves), where the walk needs 10 pieces
    (bounded,) = find_paths(model, a, b, label, attack=DeepFool(), certifier=Certifier(max_pieces=3 * BOUND_CHECK_COST))
    assert bounded.status == "certified" and bounded.pieces == 0 and bounded.bound_checks == 3


def _dense_margins(model: nn.Module, x0: Tensor, x1: Tensor, label: Tensor, num: int) -> Tensor:
    """(S, num) class margins at ``num`` evenly spaced points of every interval, by brute force."""
    s = torch.linspace(0, 1, num, dtype=torch.float64).view(1, -1, *([1] * (x0.dim() - 1)))
    points = (x0.unsqueeze(1) + s * (x1 - x0).unsqueeze(1)).flatten(0, 1)
    with torch.no_grad():
        z = model(points).view(len(x0), num, -1)
    own = z.gather(2, label.view(-1, 1, 1).expand(-1, num, 1))
    return (own - z).scatter(2, label.view(-1, 1, 1).expand(-1, num, 1), math.inf).amin(2)


def residual_net(seed: int) -> nn.Module:
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(seed)
    block = BasicBlock(4, 4)
    for bn in (block.bn1, block.bn2):
        with torch.no_grad():
            bn.running_mean.uniform_(-0.3, 0.3), bn.running_var.uniform_(0.5, 2.0), bn.weight.uniform_(-1.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), block, nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3)).double().eval()
    with torch.no_grad():
        model[-1].weight.mul_(8), model[-1].bias.zero_()  # classes that change across the input space
    return model


@pytest.mark.parametrize("build, shape", [(random_relu_mlp, (2,)), (tiny_conv_net, (1, 4, 4)), (residual_net, (1, 4, 4))])
def test_interval_bounds_hold_below_every_margin_and_tighten_to_it(build, shape: tuple[int, ...]) -> None:
    from torchvision.models.resnet import BasicBlock

    model = build(0)
    assert bound_problems(model) == [] and piecewise_linear_problems(model, containers=(BasicBlock,)) == []
    generator = torch.Generator().manual_seed(2)
    x0 = torch.randn(64, *shape, generator=generator, dtype=torch.float64)
    label = predict(model, x0)
    for length in (1.0, 1e-1, 1e-3):
        x1 = x0 + length * torch.randn(64, *shape, generator=generator, dtype=torch.float64)
        true_min = _dense_margins(model, x0, x1, label, 2001).amin(1)
        low = {}
        for outward in (False, True):  # the plain float64 bounds and the float32 ones rounded outwards
            low[outward], consistent = interval_margin_bounds(model, x0, x1, label, outward=outward)
            assert consistent.all()
            assert (low[outward] <= true_min + 1e-9).all()  # sound: never above the smallest margin on the interval
            if length == 1e-3:
                # short intervals have almost no switching units: the bound is nearly the margin itself
                positive = true_min > 1e-2
                assert positive.sum() > 10 and ((true_min - low[outward])[positive] < 0.05 * true_min[positive]).float().mean() > 0.9
        # The two agree to float32 rounding, and the float32 bounds are the wider ones.
        with torch.no_grad():
            scale = 1.0 + model(torch.cat([x0, x1])).abs().amax(1).view(2, -1).amax(0)
        assert (low[True] <= low[False] + 1e-9 * scale).all()
        assert (low[False] - low[True] <= 1e-4 * scale).all()
        assert int(((low[True] > 0) == (low[False] > 0)).sum()) >= len(x0) - 2


@pytest.mark.parametrize("build, shape, reach", [(random_relu_mlp, (2,), 0.5), (tiny_conv_net, (1, 4, 4), 0.5), (residual_net, (1, 4, 4), 1.0)])
def test_bounds_then_walk_decide_every_segment_as_the_walk_alone_does(build, shape: tuple[int, ...], reach: float) -> None:
    from torchvision.models.resnet import BasicBlock

    model = build(1)  # seed 1: the residual net's classes change across these segments
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(40, *shape, generator=generator, dtype=torch.float64)
    b = a + reach * torch.randn(40, *shape, generator=generator, dtype=torch.float64)
    label = predict(model, a)
    walk = certify_segments(model, a, b, label, containers=(BasicBlock,))
    for depth, outward in ((0, True), (3, True), (10, False), (10, True)):
        both = certify_with_bounds(model, a, b, label, bisect_depth=depth, outward=outward, containers=(BasicBlock,))
        assert both.status == walk.status
        exits = torch.tensor([s == "exits" for s in walk.status])
        assert both.exit_t[exits].tolist() == pytest.approx(walk.exit_t[exits].tolist(), abs=1e-9)
        assert (both.min_margin[~exits] > 0).all() and (both.min_margin[exits] < 0).all()
    assert set(walk.status) == {"certified", "exits"}
    # the bounds prove most segments without walking them
    assert int((both.pieces == 0).sum()) > len(a) // 4 and int(both.pieces.sum()) <= int(walk.pieces.sum())
    # worst_t of an exiting segment is a point outside the class, as deep as the margin found there
    points = a[exits] + both.worst_t[exits].view(-1, *([1] * len(shape))) * (b[exits] - a[exits])
    with torch.no_grad():
        z = model(points)
    rows = torch.arange(len(points))
    margin = (z[rows, label[exits]][:, None] - z).scatter(1, label[exits][:, None], math.inf).amin(1)
    assert (margin <= 0).all() and margin.tolist() == pytest.approx(both.min_margin[exits].tolist(), abs=1e-9)


def test_bounds_refuse_a_non_linearity_hidden_in_a_vouched_container() -> None:
    torch.manual_seed(0)
    head = nn.Linear(4, 2)
    with torch.no_grad():
        head.bias.copy_(torch.tensor([10.0, 0.0]))
    model = nn.Sequential(Vouched(nn.Linear(2, 4)), head).double().eval()
    a, b = torch.tensor([[-3.0, 1.0]], dtype=torch.float64), torch.tensor([[3.0, -1.0]], dtype=torch.float64)
    found = Certifier(containers=(Vouched,))(model, a, b, torch.tensor([0]))
    assert found.status == ["inconsistent"]


def test_certifiability_is_read_off_the_modules() -> None:
    from torchvision.models import resnet as tv_resnet

    from robustness.models.normalize import Normalize
    from robustness.models.resnet import resnet18
    from robustness.models.smallcnn import smallcnn

    info = DatasetInfo(name="toy", num_classes=10, image_shape=(1, 8, 8), class_names=tuple("0123456789"), mean=(0.5,), std=(0.25,))
    relu_cnn = smallcnn(info, width=4).eval()
    assert piecewise_linear_problems(relu_cnn, affine=(Normalize,)) == []
    assert any("Normalize" in p for p in piecewise_linear_problems(relu_cnn))
    for activation in ("softplus", "tanh", "elu"):
        problems = piecewise_linear_problems(smallcnn(info, width=4, activation=activation).eval(), affine=(Normalize,))
        assert problems and all(activation.lower() in p.lower() for p in problems)
    assert any("batch statistics" in p for p in piecewise_linear_problems(smallcnn(info, width=4).train(), affine=(Normalize,)))
    rgb = DatasetInfo(name="toy", num_classes=10, image_shape=(3, 32, 32), class_names=tuple("0123456789"), mean=(0.5,) * 3, std=(0.25,) * 3)
    net = resnet18(rgb).eval()
    assert any("own forward" in p for p in piecewise_linear_problems(net, affine=(Normalize,)))
    containers = (tv_resnet.ResNet, tv_resnet.BasicBlock)
    assert piecewise_linear_problems(net, affine=(Normalize,), containers=containers) == []
    with pytest.raises(InputError, match="not piecewise linear"):
        certify_segments(smallcnn(info, width=4, activation="tanh").eval(), torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 8, 8), torch.tensor([0]))


class Vouched(nn.Sequential):
    """A container that claims to be plain but applies a functional tanh the module walk cannot see."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(super().forward(x))


def test_guard_catches_a_non_linearity_hidden_in_a_vouched_container() -> None:
    torch.manual_seed(0)
    head = nn.Linear(4, 2)
    with torch.no_grad():
        head.bias.copy_(torch.tensor([10.0, 0.0]))  # class 0 everywhere: |tanh| < 1 cannot close a gap of 10
    model = nn.Sequential(Vouched(nn.Linear(2, 4)), head).double().eval()
    a = torch.tensor([[-3.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[3.0, -1.0]], dtype=torch.float64)
    found = certify_segments(model, a, b, torch.tensor([0]), containers=(Vouched,))
    # one "piece" (no ReLU), whose straight extrapolation misses the logits at b
    assert found.status == ["inconsistent"] and int(found.pieces[0]) == 1
    # the same layers without the hidden tanh certify
    plain = nn.Sequential(nn.Linear(2, 4), head).double().eval()
    assert certify_segments(plain, a, b, torch.tensor([0])).status == ["certified"]


def test_bounds_share_the_piece_budget() -> None:
    model = random_relu_mlp(0)
    generator = torch.Generator().manual_seed(3)
    a = torch.randn(40, 2, generator=generator, dtype=torch.float64)
    b = a + 0.5 * torch.randn(40, 2, generator=generator, dtype=torch.float64)
    label = predict(model, a)
    free = certify_with_bounds(model, a, b, label)
    hard = [i for i in range(len(a)) if free.status[i] == "certified" and int(free.bound_checks[i]) > 1]
    assert hard, "some certified segment needs more than one interval"
    capped = certify_with_bounds(model, a[hard], b[hard], label[hard], max_pieces=1)
    assert capped.status == ["over_budget"] * len(hard) and capped.bound_checks.tolist() == [1] * len(hard)


def test_each_segment_keeps_its_own_piece_budget() -> None:
    model = random_relu_mlp(0)
    generator = torch.Generator().manual_seed(5)
    a = 2 * torch.randn(30, 2, generator=generator, dtype=torch.float64)
    b = 2 * torch.randn(30, 2, generator=generator, dtype=torch.float64)
    label = predict(model, a)
    free = certify_segments(model, a, b, label)
    many = [i for i in range(len(a)) if free.status[i] == "certified" and int(free.pieces[i]) >= 3]
    assert len(many) >= 2, "some certified segments cross several pieces"
    need = free.pieces[many]
    # Every other segment gets one piece too few, the rest exactly what they need: batched together,
    # each ends as it does alone with its own budget.
    budget = need - torch.tensor([i % 2 for i in range(len(many))])
    together = certify_segments(model, a[many], b[many], label[many], max_pieces=budget)
    assert together.status == ["over_budget" if i % 2 else "certified" for i in range(len(many))]
    assert together.pieces.tolist() == budget.tolist()
    for j, i in enumerate(many):
        alone = certify_segments(model, a[i : i + 1], b[i : i + 1], label[i : i + 1], max_pieces=int(budget[j]))
        assert alone.status[0] == together.status[j]
    with pytest.raises(ConfigError, match="one per segment"):
        certify_segments(model, a[:3], b[:3], label[:3], max_pieces=torch.tensor([5, 5]))


# ---------------------------------------------------------------- within rounding of a boundary

DIP = 1e-7  # how far the segments reach past (or stop short of) the boundary, in logits
SLOPE = 10.0  # the margin's slope across the boundary: the dip is 2 DIP / SLOPE wide in x1
WIDE = 64  # further input coordinates, constant along the segments, summed with large cancelling terms


def rounding_probe(seed: int, dip: float) -> nn.Module:
    """A ReLU net on (S, 1 + WIDE) inputs with class margin ``z0 - z1 = SLOPE |x1| + dip``.

    Its first layer sums 64 terms of up to 200 into p = a.x + 1000, q = (a + e).x + 1000 and
    r = e.x + 1000; the second forms p - q + r - 999, which is 1, exactly: float32 rounds it by
    some 1e-4, a thousand times the dip, where float64 rounds it by some 1e-13. Only the sums
    round: the weights are exact in float32, and so are the inputs they weigh."""
    generator = torch.Generator().manual_seed(seed)
    a, e = (torch.round(64 * 200 * (2 * torch.rand(WIDE, generator=generator, dtype=torch.float64) - 1)) / 64 for _ in range(2))
    zero = torch.zeros(1, dtype=torch.float64)
    first, second, head = nn.Linear(WIDE + 1, 4).double(), nn.Linear(4, 3).double(), nn.Linear(3, 2).double()
    with torch.no_grad():
        first.weight.copy_(torch.stack([torch.cat([torch.ones(1, dtype=torch.float64), 0 * a])] + [torch.cat([zero, g]) for g in (a, a + e, e)]))
        first.bias.copy_(torch.tensor([0.0, 1000.0, 1000.0, 1000.0], dtype=torch.float64))
        second.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [0, 1.0, -1.0, 1.0]], dtype=torch.float64))
        second.bias.copy_(torch.tensor([0.0, 0.0, -999.0], dtype=torch.float64))
        # z0 = SLOPE (relu(x1) + relu(-x1)) + relu(1) - 1 + dip, z1 = 0
        head.weight.copy_(torch.tensor([[SLOPE, SLOPE, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64))
        head.bias.copy_(torch.tensor([dip - 1.0, 0.0], dtype=torch.float64))
    return nn.Sequential(first, second, nn.ReLU(), head).eval()


def boundary_segments(n: int) -> tuple[Tensor, Tensor]:
    """Segments from x1 = -1 to x1 = 1.3 (the boundary's dip at t = 1 / 2.3, between the sampled
    check points); the other coordinates are constant along each, random multiples of 1/256."""
    rest = torch.round(256 * (torch.rand(n, WIDE, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 2 - 1)) / 256
    return torch.cat([torch.full((n, 1), -1.0, dtype=torch.float64), rest], 1), torch.cat([torch.full((n, 1), 1.3, dtype=torch.float64), rest], 1)


def smallest_margin(x0: Tensor, x1: Tensor, dip: float) -> Tensor:
    """The exact smallest margin ``SLOPE |x1| + dip`` on each interval: at x1 = 0 where it crosses."""
    first, last = x0[:, 0], x1[:, 0]
    nearest = torch.where(first * last <= 0, torch.zeros_like(first), torch.minimum(first.abs(), last.abs()))
    return SLOPE * nearest + dip


@pytest.mark.parametrize("dip", [-DIP, DIP])
def test_segments_within_rounding_of_the_boundary_get_the_walks_verdict_in_both_precisions(dip: float) -> None:
    a, b = boundary_segments(12)
    label = torch.zeros(len(a), dtype=torch.long)
    for seed in range(2):
        model = rounding_probe(seed, dip)
        walk = certify_segments(model, a, b, label)
        assert walk.status == ["exits" if dip < 0 else "certified"] * len(a)
        checks = {}
        for outward in (False, True):
            both = certify_with_bounds(model, a, b, label, outward=outward)
            assert both.status == walk.status
            checks[outward] = both.bound_checks
            assert int(both.bound_checks.sum()) > len(a)  # the bounds halved the segments towards the dip
            exits = torch.tensor([s == "exits" for s in walk.status])
            assert both.exit_t[exits].tolist() == pytest.approx(walk.exit_t[exits].tolist(), abs=1e-9)
        # Near the dip the float32 bounds cannot beat their rounding: those intervals are bounded
        # in float64 too, so the float32 bisection is the float64 one, not one down to its depth.
        assert torch.equal(checks[True], checks[False])


def test_float32_bounds_hold_within_rounding_of_the_boundary_and_would_not_without_outward_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    from robustness.geometry import bounds

    a, b = boundary_segments(64)
    label = torch.zeros(len(a), dtype=torch.long)
    tip = 1 / 2.3
    for width in (1e-2, 1e-5, 1e-8):  # intervals of the segments around the dip, the widest first
        shift = torch.linspace(-0.4, 0.4, len(a), dtype=torch.float64) * width  # the dip anywhere inside
        x0, x1 = a.clone(), a.clone()
        x0[:, 0] = -1 + 2.3 * (tip - width / 2 + shift)
        x1[:, 0] = -1 + 2.3 * (tip + width / 2 + shift)
        true_min = smallest_margin(x0, x1, -DIP)
        assert (true_min == -DIP).all()  # every interval holds the dip
        for seed in range(2):
            model = rounding_probe(seed, -DIP)
            low, consistent = interval_margin_bounds(model, x0, x1, label, outward=True)
            assert consistent.all() and (low <= true_min).all()
            low64, _ = interval_margin_bounds(model, x0, x1, label, outward=False)
            assert (low64 <= true_min).all() and (low <= low64 + 1e-9).all()
    # The same float32 maths rounded to nearest, without widening (the inputs taken as rounded):
    # its bounds rise above the dip's true margin and prove intervals that leave the class. So
    # these intervals are within float32 rounding of the boundary. (Here the plain logits at the
    # ends would fall outside such bounds, as the sums round alike all along these segments: the
    # guard is switched off to show it.)
    monkeypatch.setattr(bounds, "CONSISTENCY_RTOL", math.inf)
    monkeypatch.setattr(bounds, "_gamma", lambda terms: 0.0)
    monkeypatch.setattr(bounds, "_up", lambda value, roundings: value)
    monkeypatch.setattr(bounds, "_widened", lambda centre, radius: radius)
    monkeypatch.setattr(bounds, "_rounded_up", lambda exact, dtype: torch.zeros_like(exact, dtype=dtype))  # inputs taken as rounded
    proved = sum(int((interval_margin_bounds(rounding_probe(seed, -DIP), x0, x1, label, outward=True)[0] > 0).sum()) for seed in range(4))
    assert proved >= 4
