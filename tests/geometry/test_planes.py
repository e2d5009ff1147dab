"""Boundary and random planes (report Figures 2-4): the maths on classifiers whose boundaries and
regions are known in closed form, the probes end to end, and the experiments on digits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from helpers import run_experiment
from robustness.data.base import DatasetInfo
from robustness.errors import ConfigError, InputError
from robustness.geometry.planes import (
    boundary_along_u,
    classify_coords,
    classify_plane,
    curvature_at_zero,
    direction_pair,
    first_exit_rows,
    fit_quadratic,
    gaussian_direction,
    image_seed,
    orthonormalize,
    plane_points,
    region_statistics,
)
from robustness.probes import boundary_plane, random_plane
from robustness.probes.base import ProbeContext, ProbeResult
from robustness.reporting import boundary_plane as boundary_report
from robustness.reporting import random_plane as regions_report
from robustness.tensors import inference_copy

SHAPE = (2, 4, 4)
DEEPFOOL = {"name": "deepfool", "overshoot": 0.02, "max_iter": 50, "num_candidates": 10}


class PlaneData:
    """A data module stand-in: a few images near mid-grey, so attacks and planes stay inside [0, 1]."""

    def __init__(self, num_classes: int = 3) -> None:
        self.info = DatasetInfo(
            name="toy",
            num_classes=num_classes,
            image_shape=SHAPE,
            class_names=tuple(f"class{i}" for i in range(num_classes)),
            mean=(0.5, 0.5),
            std=(0.25, 0.25),
        )
        generator = torch.Generator().manual_seed(7)
        self.x = 0.5 + 0.05 * (torch.rand(4, *SHAPE, generator=generator) - 0.5)
        self.y = torch.tensor([0, 1, 2, 0])

    def split_tensors(self, split: str = "test", limit: int | None = None, indices=None) -> tuple[Tensor, Tensor]:
        if indices is None:
            return self.x[:limit], self.y[:limit]
        if any(not 0 <= i < len(self.x) for i in indices):
            raise ConfigError("bad index in the toy data", "pick an index in [0, 3]")
        return self.x[list(indices)], self.y[list(indices)]


def _context(models: dict[str, nn.Module], cfg: dict, data: PlaneData | None = None, tmp_path: Path | None = None) -> ProbeContext:
    return ProbeContext(
        options=cfg, models=models, data=data or PlaneData(), attack=dict(DEEPFOOL), device=torch.device("cpu"),
        seed=0, work_dir=tmp_path or Path("."),
    )


class PlaneFunction(nn.Module):
    """Two classes on flattened input; class 0 where ``g(x) > 0`` with
    ``g = offset - <n, x - x0> + slope <w, x - x0> + k <w, x - x0>^2`` (``n``, ``w`` orthonormal),
    so in the plane ``x0 + t n + s w`` the boundary is exactly ``t = offset + slope s + k s^2``."""

    def __init__(self, x0: Tensor, n: Tensor, w: Tensor, offset: float, slope: float = 0.0, k: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("x0", x0.flatten().clone())
        self.register_buffer("n", n.flatten().clone())
        self.register_buffer("w", w.flatten().clone())
        self.offset, self.slope, self.k = offset, slope, k

    def forward(self, x: Tensor) -> Tensor:
        d = x.flatten(1) - self.x0
        q = d @ self.w
        g = self.offset - d @ self.n + self.slope * q + self.k * q * q
        return torch.stack([g, -g], dim=1)


# ---------------------------------------------------------------- directions and grids


def test_direction_pair_is_orthonormal_and_a_function_of_the_seed() -> None:
    u, v = direction_pair(SHAPE, seed=3)
    assert u.shape == v.shape == SHAPE
    assert float(u.norm()) == pytest.approx(1.0, abs=1e-6) and float(v.norm()) == pytest.approx(1.0, abs=1e-6)
    assert abs(float((u * v).sum())) < 1e-6
    u2, v2 = direction_pair(SHAPE, seed=3)
    assert torch.equal(u, u2) and torch.equal(v, v2)
    u3, _ = direction_pair(SHAPE, seed=4)
    assert abs(float((u * u3).sum())) < 0.9

    # With a given first direction, v is the seed's Gaussian draw minus its component along it.
    first = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * 5.0
    u, v = direction_pair(SHAPE, seed=3, first=first)
    assert torch.allclose(u, first / first.norm(), atol=1e-6)
    g = gaussian_direction(SHAPE, 3)
    expected = g - (g * u).sum() * u
    assert torch.allclose(v, expected / expected.norm(), atol=1e-5)
    assert abs(float((u * v).sum())) < 1e-6


def test_gram_schmidt_stays_orthogonal_for_nearly_parallel_vectors() -> None:
    a = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    b = a + 1e-4 * torch.randn(1000, generator=torch.Generator().manual_seed(2))
    u, v = orthonormalize([a, b])
    assert abs(float(u @ v)) < 1e-6 and float(v.norm()) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(InputError, match="zero or non-finite length"):
        orthonormalize([a, 2 * a])


def test_grid_labels_match_one_forward_per_point_whatever_the_chunk_size() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(64, 5)).eval()
    x0 = torch.rand(SHAPE)
    u, v = direction_pair(SHAPE, seed=1)
    u_coords, v_coords = torch.linspace(-3, 3, 7), torch.linspace(-2, 2, 5)
    grid = classify_plane(model, x0, u, v, u_coords, v_coords, batch_size=4)
    assert grid.shape == (7, 5)
    with torch.no_grad():
        expected = torch.tensor([[int(model((x0 + a * u + b * v)[None]).argmax()) for b in v_coords] for a in u_coords])
    assert torch.equal(grid, expected)
    assert torch.equal(classify_plane(model, x0, u, v, u_coords, v_coords, batch_size=4096), expected)
    assert len(torch.unique(grid)) > 1  # the comparison above is not between two constant grids


class _FlattensWithView(nn.Module):
    """A backbone written the old way: ``.view`` on a feature map, which a channels-last copy cannot run."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(48, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x).view(len(x), -1))


def test_inference_copy_folds_batch_norm_and_keeps_the_function_and_the_original() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(32, 5),
    )
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # statistics far from the identity, so a missed fold shows
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.2, 3)
            module.weight.data.uniform_(0.5, 2)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(64, *SHAPE)
    fast = inference_copy(model, x[:2])
    assert fast is not model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    # A forward the copy's layout breaks gets the model itself back, never an error.
    old_style = _FlattensWithView().eval()
    assert inference_copy(old_style, x[:2]) is old_style
    with pytest.raises(InputError, match="training mode"):
        inference_copy(model.train(), x[:2])
    model.eval()

    # For attacks and Hessian products: the same input gradient and Hessian-vector product.
    folded = inference_copy(model, x[:2], for_gradients=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    v = torch.randn_like(x)

    def gradient_and_hvp(net: nn.Module) -> tuple[Tensor, Tensor]:
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(torch.logsumexp(net(xg), 1).sum(), xg, create_graph=True)
        (hv,) = torch.autograd.grad(g, xg, grad_outputs=v)
        return g.detach(), hv

    for got, want in zip(gradient_and_hvp(folded), gradient_and_hvp(model)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    assert all(p.requires_grad for p in model.parameters())  # the original keeps its training flags


class _ReshapesByBatchLength(nn.Module):
    """``len(x)`` is a constant to a TorchScript trace, so a graph traced on one batch size fails another."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(48, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x).reshape(len(x), -1))


def test_inference_copy_keeps_a_graph_only_where_it_holds_for_other_batches() -> None:
    torch.manual_seed(0)
    x = torch.rand(64, *SHAPE)
    specialised = _ReshapesByBatchLength().eval()
    fast = inference_copy(specialised, x[:1])
    assert not any(isinstance(m, torch.jit.ScriptModule) for m in fast.modules())  # the traced graph failed batch 2: not kept
    with torch.no_grad():
        assert torch.allclose(fast(x), specialised(x), atol=1e-5)
    plain = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).eval()
    frozen = inference_copy(plain, x[:1])
    assert any(isinstance(m, torch.jit.ScriptModule) for m in frozen.modules()) and not frozen.training  # frozen, in eval mode
    with torch.no_grad():
        assert torch.allclose(frozen(x), plain(x), atol=1e-5)
        assert torch.allclose(frozen(x[:5]), plain(x[:5]), atol=1e-5)


def test_clamp_folds_the_plane_into_the_pixel_box() -> None:
    class AnyNegativePixel(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            negative = (x.flatten(1).min(dim=1).values < 0).float()
            return torch.stack([1 - negative, negative], dim=1)

    model = AnyNegativePixel().eval()
    x0 = torch.full(SHAPE, 0.5)
    u, v = direction_pair(SHAPE, seed=0)
    coords = torch.linspace(-4, 4, 21)
    raw = classify_plane(model, x0, u, v, coords, coords)
    clamped = classify_plane(model, x0, u, v, coords, coords, clamp=True)
    points = plane_points(x0, u, v, coords.repeat_interleave(21), coords.repeat(21))
    assert torch.equal(raw.flatten(), (points.flatten(1).min(1).values < 0).long())
    assert 0 < int(raw.sum()) < raw.numel() and int(clamped.sum()) == 0


def test_first_exit_rows_on_a_hand_made_grid() -> None:
    labels = torch.tensor(
        [
            [5, 5, 5, 5],
            [1, 1, 2, 1],  # start row
            [1, 3, 1, 1],
            [1, 1, 4, 1],
            [3, 1, 1, 1],
        ]
    )
    rows = first_exit_rows(labels, start_row=1, label=1)
    # column 0 leaves at row 4, column 1 at row 2, column 2 starts outside, column 3 never leaves
    assert rows.tolist() == [4, 2, -1, -1]


def test_quadratic_fit_and_curvature_recover_exact_coefficients() -> None:
    s = torch.linspace(-1, 1, 11, dtype=torch.float64)
    t = 0.3 - 0.4 * s + 1.5 * s**2
    t[3] = float("nan")  # columns without a boundary are skipped
    coeffs = fit_quadratic(s, t)
    assert torch.allclose(coeffs, torch.tensor([0.3, -0.4, 1.5], dtype=torch.float64), atol=1e-10)
    assert curvature_at_zero(coeffs) == pytest.approx(3.0 / 1.16**1.5, rel=1e-10)
    with pytest.raises(InputError, match="at least 3 distinct points"):
        fit_quadratic(s[:2], t[:2])


@pytest.mark.parametrize("slope, k", [(0.0, 0.8), (0.5, -0.6), (-1.0, 1.2)])
def test_boundary_of_a_known_parabola_gives_its_curvature(slope: float, k: float) -> None:
    x0 = torch.full(SHAPE, 0.5)
    u, v = direction_pair(SHAPE, seed=5)
    offset = 1.0
    model = PlaneFunction(x0, u, v, offset, slope, k).eval()
    coords = torch.linspace(-1.0, 2.0, 151)
    s = torch.linspace(-0.5, 0.5, 51)
    labels = classify_plane(model, x0, u, v, coords, s)
    boundary = boundary_along_u(model, x0, u, v, labels, coords, s, label=0, bisection_steps=14)
    exact = offset + slope * s.double() + k * s.double() ** 2
    # 14 halvings of a 0.02 grid step: the boundary is found to ~1e-6 (float32 points).
    assert torch.allclose(boundary, exact, atol=5e-6)
    coeffs = fit_quadratic(s, boundary)
    true_curvature = 2 * k / (1 + slope**2) ** 1.5
    assert curvature_at_zero(coeffs) == pytest.approx(true_curvature, rel=1e-3)


@pytest.mark.parametrize("slope, k", [(0.0, 0.8), (-1.0, 1.2), (0.5, -8.0)])
def test_rows_classified_until_every_column_leaves_give_the_full_grids_boundary(slope: float, k: float) -> None:
    x0 = torch.full(SHAPE, 0.5)
    u, v = direction_pair(SHAPE, seed=5)
    model = CountingModel(PlaneFunction(x0, u, v, 1.0, slope, k)).eval()
    rows = torch.linspace(0.0, 3.0, 151)
    s = torch.linspace(-0.5, 0.5, 51)
    full = classify_plane(model, x0, u, v, rows, s, batch_size=64)
    model.points = 0
    partial = classify_plane(model, x0, u, v, rows, s, batch_size=64, until_exit_of=0)
    # The boundary t = 1 + slope s + k s^2 lies below t = 3 - 1.5 in every column: the rows above
    # the highest exit are never classified, and every row below it is the full grid's.
    highest = int(first_exit_rows(full, 0, 0).max())
    assert 0 < highest < 120 and model.points < 0.85 * full.numel()
    assert torch.equal(partial[: highest + 1], full[: highest + 1])
    assert bool((partial[highest + 1 + 64 // len(s):] == -1).all())
    assert torch.equal(first_exit_rows(partial, 0, 0), first_exit_rows(full, 0, 0))
    torch.testing.assert_close(
        boundary_along_u(model, x0, u, v, partial, rows, s, label=0), boundary_along_u(model, x0, u, v, full, rows, s, label=0),
        rtol=0, atol=0, equal_nan=True,
    )
    # A column that never leaves the class keeps every row classified.
    inside = classify_plane(model, x0, u, v, rows[:30], s, batch_size=64, until_exit_of=0)
    assert torch.equal(inside, full[:30])


class BatchSizeSensitiveModel(nn.Module):
    """Adds ``1e-3 * len(x)`` to the margin of class 0: a grid point near the boundary gets its
    label from the size of the batch it is classified in, as a point within float rounding of the
    boundary does when a matrix product rounds differently for another batch size."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        logits = self.inner(x)
        return logits + torch.tensor([1e-3, -1e-3]) * len(x)


@pytest.mark.parametrize("batch_size", [64, 37, 200])
def test_rows_classified_until_every_column_leaves_are_the_full_grids_rows_whatever_the_batch_does(batch_size: int) -> None:
    x0 = torch.full(SHAPE, 0.5)
    u, v = direction_pair(SHAPE, seed=5)
    model = BatchSizeSensitiveModel(PlaneFunction(x0, u, v, 1.0, 0.3, 0.8)).eval()
    rows = torch.linspace(0.0, 3.0, 151)
    s = torch.linspace(-0.5, 0.5, 51)
    full = classify_plane(model, x0, u, v, rows, s, batch_size=batch_size)
    partial = classify_plane(model, x0, u, v, rows, s, batch_size=batch_size, until_exit_of=0)
    classified = (partial >= 0).all(dim=1)
    highest = int(first_exit_rows(full, 0, 0).max())
    assert bool(classified[: highest + 1].all()) and not bool(classified[-1])
    assert bool(((partial == -1).all(dim=1) | classified).all())  # a row is classified whole or not at all
    assert torch.equal(partial[classified], full[classified])
    assert torch.equal(first_exit_rows(partial, 0, 0), first_exit_rows(full, 0, 0))


class CountingModel(nn.Module):
    """Counts the points it classifies."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.points = inner, 0

    def forward(self, x: Tensor) -> Tensor:
        self.points += len(x)
        return self.inner(x)


def test_inference_copy_is_made_once_per_model_until_its_weights_change() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).eval()
    x = torch.rand(8, *SHAPE)
    first = inference_copy(model, x[:1])
    assert inference_copy(model, x[:3]) is first  # another batch of the same images' shape
    assert inference_copy(model, x[:1], reuse=False) is not first
    assert inference_copy(model, x[:1], for_gradients=True) is not first  # another kind of copy
    changes = [
        lambda: model[0].weight.mul_(2.0),  # in place: the version counter moves
        lambda: model[4].bias.data.add_(1.0),  # through .data: no counter sees it, the sum does
        lambda: model[1].running_mean.fill_(0.3),  # a buffer
        lambda: setattr(model[4], "weight", nn.Parameter(torch.randn(3, 64))),  # replaced
        lambda: model.load_state_dict({k: v + 0.01 for k, v in model.state_dict().items() if v.is_floating_point()}, strict=False),
    ]
    for change in changes:
        before = inference_copy(model, x[:1])
        with torch.no_grad():
            change()
        after = inference_copy(model, x[:1])
        assert after is not before
        with torch.no_grad():
            assert torch.allclose(after(x), model(x), atol=1e-5)


def test_region_statistics_of_a_known_partition() -> None:
    labels = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 1], [0, 2, 2, 1]])
    stats = region_statistics(labels, label=2)
    assert stats.num_classes == 3
    assert stats.area_fraction == pytest.approx(5 / 16)
    assert stats.class_counts.tolist() == [5, 6, 5]
    assert region_statistics(labels, label=7).area_fraction == 0.0


def test_training_mode_model_is_refused() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(32, 2))
    x0 = torch.full(SHAPE, 0.5)
    u, v = direction_pair(SHAPE, seed=0)
    with pytest.raises(InputError, match="model.eval"):
        classify_coords(model, x0, u, v, torch.zeros(3), torch.zeros(3))


# ---------------------------------------------------------------- the boundary_plane probe


def _linear_two_class(x0: Tensor, seed: int = 0) -> tuple[nn.Module, float, Tensor]:
    """A linear classifier with class 0 at ``x0`` and its exact distance and unit normal."""
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(x0.numel(), 2)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(2, x0.numel(), generator=generator))
        diff = layer.weight[0] - layer.weight[1]
        # Bias chosen so that the logit gap at x0 is 0.15 ||w0 - w1||: the boundary is 0.15 away.
        layer.bias.copy_(torch.tensor([0.15 * float(diff.norm()) - float(diff @ x0.flatten()), 0.0]))
    return nn.Sequential(nn.Flatten(), layer).eval(), 0.15, -diff / diff.norm()


def test_boundary_plane_of_a_linear_classifier_is_straight_at_the_deepfool_distance(tmp_path: Path) -> None:
    data = PlaneData(num_classes=2)
    x0 = data.x[0]
    model, distance, normal = _linear_two_class(x0)
    result = boundary_plane.compute(_context({"linear": model}, {"name": "boundary_plane"}, data, tmp_path))
    (row,) = result.tables["curvature"]
    # DeepFool lands (1 + overshoot) times the exact distance along the normal.
    assert row["attack_distance"] == pytest.approx(1.02 * distance, rel=1e-3)
    assert float((result.arrays["linear/u"].flatten() * normal).sum()) == pytest.approx(1.0, abs=1e-5)
    assert row["boundary_distance"] == pytest.approx(distance, rel=1e-4)
    assert abs(row["curvature_x_distance"]) < 1e-3 and abs(row["slope"]) < 1e-3
    assert row["fit_columns"] == 101  # |s| <= d on a 201-point grid over [-2d, 2d]
    boundary = result.arrays["linear/boundary"]
    assert torch.isfinite(boundary).all() and torch.allclose(boundary, torch.full_like(boundary, distance), atol=1e-4 * distance)


@pytest.mark.parametrize("k", [4.0, -4.0])
def test_boundary_plane_curvature_of_a_known_quadratic_boundary(tmp_path: Path, k: float) -> None:
    data = PlaneData(num_classes=2)
    x0 = data.x[0]
    normal = torch.zeros(SHAPE)
    normal[0, 1, 2] = 1.0
    # The probe's random direction for this seed, known in advance: the attack direction of this
    # model at x0 is exactly `normal`, so the plane is (normal, w) and the boundary t = 0.1 + k s^2.
    _, w = direction_pair(SHAPE, seed=11, first=normal)
    model = PlaneFunction(x0, normal, w, offset=0.1, k=k).eval()
    cfg = {"name": "boundary_plane", "direction_seed": 11}
    result = boundary_plane.compute(_context({"quadratic": model}, cfg, data, tmp_path))
    (row,) = result.tables["curvature"]
    v = result.arrays["quadratic/v"]
    true_curvature = 2 * k * float((v * w).sum()) ** 2
    assert true_curvature == pytest.approx(2 * k, rel=1e-6)
    assert row["curvature"] == pytest.approx(true_curvature, rel=0.05)
    assert row["boundary_distance"] == pytest.approx(0.1, rel=1e-4)


def test_boundary_plane_uses_the_same_sample_and_random_draw_for_every_model(tmp_path: Path) -> None:
    data = PlaneData(num_classes=2)
    x0 = data.x[1]
    models = {"a": _linear_two_class(x0, seed=0)[0], "b": _linear_two_class(x0, seed=1)[0]}
    cfg = {"name": "boundary_plane", "sample_index": 1, "resolution": 21, "direction_seed": 2}
    result = boundary_plane.compute(_context(models, cfg, data, tmp_path))
    assert torch.equal(result.arrays["x0"], x0)
    g = gaussian_direction(SHAPE, 2)
    for variant in models:
        u, v = result.arrays[f"{variant}/u"], result.arrays[f"{variant}/v"]
        expected = g - (g * u).sum() * u
        assert torch.allclose(v, expected / expected.norm(), atol=1e-5)
    assert result.meta["sample_index"] == 1 and result.meta["true_label"] == 1


def test_boundary_plane_explains_an_attack_that_cannot_move_the_sample(tmp_path: Path) -> None:
    class Constant(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return torch.tensor([1.0, 0.0]).expand(len(x), 2) + 0.0 * x.flatten(1)[:, :2]

    with pytest.raises(InputError, match="left sample 0 unchanged for variant 'flat'"):
        boundary_plane.compute(_context({"flat": Constant().eval()}, {"name": "boundary_plane"}, PlaneData(2), tmp_path))


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"resolution": 200}, "must be odd"),
        ({"resolution": 1}, "at least 3"),
        ({"extent": 0.0}, "extent"),
        ({"fit_halfwidth": -1.0}, "fit_halfwidth"),
        ({"resolutoin": 201}, "unknown option"),
        ({"resolution": "fine"}, "wrong type"),
    ],
)
def test_bad_probe_options_are_config_errors(cfg: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        boundary_plane.BoundaryPlaneOptions.from_cfg({"name": "boundary_plane", **cfg})


def test_per_image_boundary_of_a_linear_classifier_is_flat_at_each_images_own_distance(tmp_path: Path) -> None:
    data = PlaneData(num_classes=2)
    model, _, _ = _linear_two_class(data.x[0])
    layer = model[1]
    cfg = {"name": "boundary_plane", "stats_resolution": 41, "num_images": 10}
    result = boundary_plane.compute(_context({"linear": model}, cfg, data, tmp_path))
    logits = layer(data.x.flatten(1)).detach()
    exact = (logits[:, 0] - logits[:, 1]).abs() / (layer.weight[0] - layer.weight[1]).norm()
    assert torch.equal(result.arrays["per_image/index"], torch.arange(4))  # capped at the 4 images there are
    assert torch.allclose(result.arrays["linear/per_image/attack_distance"], 1.02 * exact.double(), rtol=1e-3)
    curvature = result.arrays["linear/per_image/curvature_x_distance"]
    assert torch.isfinite(curvature).all() and curvature.abs().max() < 1e-3
    # 41 points over [-2d, 2d]: the 21 columns with |s| <= d enter the fit.
    assert result.arrays["linear/per_image/fit_columns"].tolist() == [21] * 4
    assert [row["image"] for row in result.tables["per_image"]] == [0, 1, 2, 3]


class ShiftedAlongNormal(PlaneData):
    """Images ``x0 + alpha_i n``: at each of them the attack direction of :class:`PlaneFunction` is ``n``."""

    def __init__(self, x0: Tensor, n: Tensor, alphas: list[float]) -> None:
        super().__init__(num_classes=2)
        self.x = torch.stack([x0 + a * n for a in alphas])
        self.y = torch.zeros(len(alphas), dtype=torch.long)


@pytest.mark.parametrize("k", [3.0, -3.0])
def test_per_image_curvature_of_a_known_quadratic_boundary_in_each_images_own_plane(tmp_path: Path, k: float) -> None:
    x0 = PlaneData(num_classes=2).x[0]
    normal = torch.zeros(SHAPE)
    normal[1, 2, 1] = 1.0
    w = torch.zeros(SHAPE)
    w[0, 0, 3] = 1.0
    data = ShiftedAlongNormal(x0, normal, [0.0, 0.02, -0.03, 0.04])
    model = PlaneFunction(x0, normal, w, offset=0.1, k=k).eval()
    cfg = {"name": "boundary_plane", "direction_seed": 5, "stats_resolution": 81, "chunk_size": 3}
    result = boundary_plane.compute(_context({"quadratic": model}, cfg, data, tmp_path))
    # In image i's plane (n, v_i) the boundary is t = 0.1 - alpha_i + k <w, v_i>^2 s^2.
    for i in range(4):
        _, v = direction_pair(SHAPE, image_seed(5, i), first=normal)
        expected = 2 * k * float((v * w).sum()) ** 2
        assert float(result.arrays["quadratic/per_image/curvature"][i]) == pytest.approx(expected, rel=0.05, abs=1e-4)
    # Different images draw different directions (else the statistics would repeat one plane).
    assert len({round(float(c), 6) for c in result.arrays["quadratic/per_image/curvature"]}) == 4


def test_per_image_values_do_not_depend_on_the_chunking_and_resume_from_kept_chunks(tmp_path: Path) -> None:
    data = PlaneData(num_classes=3)
    models = {"a": _linear_two_class(data.x[0], seed=0)[0], "b": _linear_two_class(data.x[0], seed=4)[0]}
    base_cfg = {"name": "random_plane", "resolution": 21, "stats_resolution": 31}
    whole = random_plane.compute(_context(models, {**base_cfg, "chunk_size": 4}, data, tmp_path / "one"))
    pieces = random_plane.compute(_context(models, {**base_cfg, "chunk_size": 1}, data, tmp_path / "four"))
    for variant in models:
        for key in ("area_fraction", "num_classes", "predicted"):
            assert torch.equal(whole.arrays[f"{variant}/per_image/{key}"], pieces.arrays[f"{variant}/per_image/{key}"])
    kept = sorted(p.name for p in (tmp_path / "four").rglob("*.pt"))
    assert len(kept) == 8  # 4 chunks of 1 image for each of the 2 models
    again = random_plane.compute(_context(models, {**base_cfg, "chunk_size": 1}, data, tmp_path / "four"))
    assert again.tables["per_image"] == pieces.tables["per_image"]


def test_per_image_area_fraction_of_a_disk_in_each_images_own_plane(tmp_path: Path) -> None:
    data = PlaneData(num_classes=3)
    x0 = data.x[0]
    u, v = direction_pair(SHAPE, seed=image_seed(9, 0))  # image 0's own plane
    half_width = 1.5 * float(x0.norm())
    model = DiskAndHalves(x0, u, v, 0.6 * half_width).eval()
    cfg = {"name": "random_plane", "direction_seed": 9, "extent": 1.5, "resolution": 21, "stats_resolution": 201, "num_images": 1}
    result = random_plane.compute(_context({"disk": model}, cfg, data, tmp_path))
    (row,) = result.tables["per_image"]
    assert row["predicted_label"] == 2 and row["num_classes"] == 3
    assert row["area_fraction"] == pytest.approx(math.pi * 0.36 / 4 * (200 / 201) ** 2, rel=0.005)


# ---------------------------------------------------------------- the random_plane probe


class DiskAndHalves(nn.Module):
    """Class 2 inside the disk ``p^2 + q^2 < r^2`` of plane coordinates, else 0 or 1 by the sign of ``p``."""

    def __init__(self, x0: Tensor, u: Tensor, v: Tensor, radius: float) -> None:
        super().__init__()
        self.x0, self.u, self.v, self.radius = x0.flatten(), u.flatten(), v.flatten(), radius

    def forward(self, x: Tensor) -> Tensor:
        d = x.flatten(1) - self.x0
        p, q = d @ self.u, d @ self.v
        label = torch.where(p * p + q * q < self.radius**2, 2, (p > 0).long())
        return nn.functional.one_hot(label, 3).float()


def test_random_plane_region_statistics_match_known_areas(tmp_path: Path) -> None:
    data = PlaneData(num_classes=3)
    x0 = data.x[2]
    u, v = direction_pair(SHAPE, seed=9)  # the plane the probe will draw for this seed
    half_width = 1.5 * float(x0.norm())
    radius = 0.6 * half_width
    models = {"disk": DiskAndHalves(x0, u, v, radius).eval(), "wide": DiskAndHalves(x0, u, v, 2 * half_width).eval()}
    cfg = {"name": "random_plane", "sample_index": 2, "direction_seed": 9, "extent": 1.5}
    result = random_plane.compute(_context(models, cfg, data, tmp_path))
    disk, wide = result.tables["regions"]
    assert result.meta["half_width"] == pytest.approx(half_width, rel=1e-6)
    assert disk["sample_class"] == "class2" and disk["num_classes"] == 3
    # Each of the 201 x 201 points stands for a cell of side 2H / 200, so the grid covers a square of
    # side 2H * 201/200 (the figure's extent) and the disk of radius 0.6 H fills pi 0.36 / 4 * (200/201)^2 of it.
    assert disk["area_fraction"] == pytest.approx(math.pi * 0.36 / 4 * (200 / 201) ** 2, rel=0.005)
    assert wide["num_classes"] == 1 and wide["area_fraction"] == 1.0
    # The other two classes split the rest evenly (p > 0 vs p <= 0 is symmetric up to one grid row).
    counts = torch.bincount(result.arrays["disk/labels"].flatten(), minlength=3).double() / 201**2
    assert float(counts[0] - counts[1]) == pytest.approx(0.0, abs=2 / 201)


# ---------------------------------------------------------------- reporters


def test_results_survive_a_round_trip_and_draw_their_figures_and_tables(tmp_path: Path) -> None:
    data = PlaneData(num_classes=2)
    x0 = data.x[0]
    models = {"base": _linear_two_class(x0, 0)[0], "adversarial": _linear_two_class(x0, 3)[0]}
    for module, reporter, cfg, table in [
        (boundary_plane, boundary_report, {"name": "boundary_plane", "resolution": 41}, "boundary_plane_curvature"),
        (random_plane, regions_report, {"name": "random_plane", "resolution": 41}, "random_plane_regions"),
    ]:
        result = module.compute(_context(models, cfg, data, tmp_path))
        result.save(tmp_path / module.__name__)
        loaded = ProbeResult.load(tmp_path / module.__name__)
        out = tmp_path / f"out_{module.__name__.rsplit('.', 1)[1]}"
        artefacts = reporter.draw(loaded, out)
        written = {path.name for artefact in artefacts for path in artefact.paths}
        figure, spread = artefacts[0].name, artefacts[2].name
        assert written == {f"{figure}.png", f"{figure}.pdf", f"{table}.csv", f"{table}.md", f"{spread}.png", f"{spread}.pdf"}
        # Captions stay short; how it was measured goes to the appendix text.
        assert all(artefact.caption.count(". ") <= 1 for artefact in artefacts)
        assert all("per-image statistics" in artefact.methods.lower() for artefact in artefacts)
        assert all(path.stat().st_size > 0 for artefact in artefacts for path in artefact.paths)
        header = (out / f"{table}.csv").read_text().splitlines()[0].split(",")
        assert header[:2] == ["variant", "sample_class"]
        assert [row["variant"] for row in artefacts[1].rows] == ["base", "adversarial"]
        assert "Figure" in artefacts[0].caption


# ---------------------------------------------------------------- the experiments on digits

# A coarse grid keeps the experiment tests quick; the maths is checked above at full resolution.
COARSE_IMAGES = 6
COARSE = ["++probe.resolution=41", "++probe.stats_resolution=21", f"++probe.num_images={COARSE_IMAGES}"]  # ++: a report has no probe node of its own to override


def _written(out: Path) -> set[str]:
    return {path.name for path in out.rglob("*") if path.is_file() and path.stat().st_size > 0}


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment, figure, table",
    [("fig2_boundary", "boundary_plane", "boundary_plane_curvature"), ("fig3_regions", "random_plane", "random_plane_regions")],
)
def test_experiment_on_digits_writes_its_figure_and_table(tmp_path: Path, experiment: str, figure: str, table: str) -> None:
    out = run_experiment(experiment, COARSE, tmp_path)
    assert {f"{figure}.png", f"{figure}.pdf", f"{table}.csv", f"{table}.md"} <= _written(out)
    tables = ProbeResult.load(out / "results" / figure).tables
    rows = tables["curvature" if figure == "boundary_plane" else "regions"]
    assert [row["variant"] for row in rows] == ["base", "adversarial", "pgd"]
    # The per-image statistics: every variant at each of the first num_images test images.
    assert [(row["variant"], row["image"]) for row in tables["per_image"]] == [(v, i) for v in ("base", "adversarial", "pgd") for i in range(COARSE_IMAGES)]


@pytest.mark.slow
def test_fig4_draws_the_cure_model_in_both_planes(tmp_path: Path) -> None:
    out = run_experiment("fig4_cure", COARSE, tmp_path)
    written = _written(out)
    assert "report.md" in written
    for name in ("boundary_plane", "random_plane"):
        assert {f"{name}.png", f"{name}.pdf"} <= written
    for table in ("boundary_plane_curvature", "random_plane_regions"):
        (csv,) = [p for p in out.rglob(f"{table}.csv")]
        # CURE beside the two models it is compared with, on one scale.
        assert [line.split(",")[0] for line in csv.read_text().splitlines()[1:]] == ["base", "adversarial", "cure"]


@pytest.mark.slow
def test_per_image_statistics_are_kept_per_model_and_reused_by_other_lists_of_variants(tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = run_experiment("fig3_regions", [*COARSE, "variants=[base,adversarial]"], tmp_path / "a", artifacts_dir=store)
    shared = store / "digits" / "smallcnn" / "probes" / "per-model"
    folders = sorted(p.name for p in shared.iterdir())
    assert len(folders) == 2 and all(name.startswith("random_plane-") for name in folders)  # one per model
    stamps = {p: p.stat().st_mtime_ns for p in shared.rglob("*.pt")}
    second = run_experiment("fig3_regions", [*COARSE, "variants=[base,adversarial,cure]"], tmp_path / "b", artifacts_dir=store)
    assert len(list(shared.iterdir())) == 3  # only the new model's statistics were computed
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # base's and adversarial's were read, not rewritten
    a = ProbeResult.load(first / "results" / "random_plane").arrays
    b = ProbeResult.load(second / "results" / "random_plane").arrays
    for variant in ("base", "adversarial"):
        assert torch.equal(a[f"{variant}/per_image/area_fraction"], b[f"{variant}/per_image/area_fraction"])
    # recompute=true shares nothing: the per-model folder is left as it was
    run_experiment("fig3_regions", [*COARSE, "variants=[base]", "recompute=true"], tmp_path / "c", artifacts_dir=store)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
