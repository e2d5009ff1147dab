"""Path-connectivity (report section 2.2, Figures 5-8, Table 2): the search on classifiers whose
regions are known in closed form, the path metrics on hand-built polylines, the probe and its
resumption on a toy model, and the three experiments on digits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import Tensor, nn

from helpers import compose, run_experiment
from omegaconf import OmegaConf
from robustness.attacks.base import AttackResult
from robustness.attacks.deepfool import DeepFool
from robustness.data.base import DatasetInfo
from robustness.errors import ConfigError, InputError
from robustness.geometry.certify import Certifier
from robustness.geometry.walk import certify_segments
from robustness.geometry.paths import check_fractions, find_paths, path_metrics, resample_path
from robustness.probes import path_connectivity as probe
from robustness.probes.base import ProbeContext, ProbeResult
from robustness.tensors import predict
from robustness.reporting import path_connectivity as reporter

ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------- hand-made classifiers

CENTRE = torch.tensor([0.5, 0.5])
R_IN, R_OUT = 0.15, 0.45  # class 1 is the annulus R_IN < |x - CENTRE| < R_OUT
RADIUS, OFFSET = 0.3, 0.03  # endpoints on the circle of radius RADIUS, chord OFFSET above the centre
MARGIN = 0.02  # the exact pull lands this fraction of R_IN beyond the inner circle


class Annulus(nn.Module):
    """Two classes in the plane; class 1 is an annulus around CENTRE, class 0 the hole and the outside."""

    def forward(self, x: Tensor) -> Tensor:
        r = (x - CENTRE).norm(dim=1)
        score = torch.minimum(r - R_IN, R_OUT - r)
        return torch.stack([-score, score], dim=1)


def radial_pull(model: nn.Module, x: Tensor, y: Tensor | None = None, target: Tensor | None = None) -> AttackResult:
    """The exact minimal move into the annulus (plus MARGIN), along the radius, in one step."""
    assert target is not None and (target == 1).all()
    d = x - CENTRE
    r = d.norm(dim=1, keepdim=True)
    new_r = torch.where(r < R_IN, torch.full_like(r, R_IN * (1 + MARGIN)), torch.where(r > R_OUT, torch.full_like(r, R_OUT * (1 - MARGIN)), r))
    moved = CENTRE + d / r * new_r
    return AttackResult(moved, torch.ones(len(x), dtype=torch.bool), (moved - x).norm(dim=1), torch.zeros(len(x), dtype=torch.long))


def chord_pair(angle: float = 0.0) -> tuple[Tensor, Tensor]:
    """Two nearly opposite points on the circle of radius RADIUS, their chord OFFSET from the centre,
    rotated by ``angle``."""
    half = math.sqrt(RADIUS**2 - OFFSET**2)
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    a = CENTRE + rotation @ torch.tensor([-half, OFFSET])
    b = CENTRE + rotation @ torch.tensor([half, OFFSET])
    return a.unsqueeze(0), b.unsqueeze(0)


def lower_bound() -> float:
    # Any path avoiding the hole crosses the chord's perpendicular bisector at distance >= R_IN from
    # the centre, i.e. >= R_IN - OFFSET from the chord; the chord is 2 sqrt(RADIUS^2 - OFFSET^2) long.
    return (R_IN - OFFSET) / (2 * math.sqrt(RADIUS**2 - OFFSET**2))


def segment_points(vertices: Tensor, fractions: Tensor) -> Tensor:
    a, b = vertices[:-1], vertices[1:]
    return (a.unsqueeze(1) + fractions.view(1, -1, *([1] * (vertices.dim() - 1))).to(a.dtype) * (b - a).unsqueeze(1)).flatten(0, 1)


def never_pull(model: nn.Module, x: Tensor, y: Tensor | None = None, target: Tensor | None = None) -> AttackResult:
    raise AssertionError("a convex region never needs a pull")


# ---------------------------------------------------------------- the search


def test_linear_classifier_paths_are_straight_segments() -> None:
    torch.manual_seed(1)
    model = nn.Linear(6, 3).eval()
    x = torch.randn(400, 6)  # around the origin, where all three half-spaces meet
    label = predict(model, x)
    starts, ends = [], []
    for k in range(3):
        idx = (label == k).nonzero().flatten()
        starts += idx[:3].tolist()
        ends += idx[3:6].tolist()
    results = find_paths(model, x[starts], x[ends], label[starts], attack=never_pull, points_per_segment=8, max_depth=6)
    assert len(results) == 9
    for result, s, e in zip(results, starts, ends):
        assert result.success and result.reason == "" and result.depth == 0
        assert torch.equal(result.vertices, torch.stack([x[s], x[e]]))
        metrics = path_metrics(result.vertices)
        assert metrics["points"] == 2 and metrics["deviation"] == 0.0 and metrics["length_ratio"] == pytest.approx(1.0)
        # the two endpoints plus one batched check of 8 interior points and the midpoint
        assert result.evaluations == 2 + 9


def test_annulus_path_bends_around_the_hole() -> None:
    model = Annulus().eval()
    a, b = chord_pair()
    (result,) = find_paths(model, a, b, torch.tensor([1]), attack=radial_pull, points_per_segment=8, max_depth=8)
    assert result.success and result.depth >= 1
    v = result.vertices
    assert torch.equal(v[0], a[0]) and torch.equal(v[-1], b[0])
    # every checked point, and a dense sampling of the whole polyline, keeps class 1
    assert (predict(model, segment_points(v, check_fractions(8))) == 1).all()
    assert (predict(model, segment_points(v, torch.linspace(0, 1, 500))) == 1).all()
    # it goes over the hole: some vertex lies on the bisector at least R_IN from the centre
    assert ((v[:, 0] - 0.5).abs() < 1e-6).any() and (v[:, 1] - 0.5).max() >= R_IN
    deviation = path_metrics(v)["deviation"]
    upper = (R_IN * (1 + MARGIN) - OFFSET) / (2 * math.sqrt(RADIUS**2 - OFFSET**2))
    assert lower_bound() <= deviation <= upper + 1e-6
    assert len(v) > 2


def test_annulus_path_with_targeted_deepfool_pull() -> None:
    model = Annulus().eval()
    a, b = chord_pair()
    (result,) = find_paths(model, a, b, torch.tensor([1]), attack=DeepFool(overshoot=0.1), points_per_segment=16, max_depth=10)
    assert result.success
    assert (predict(model, segment_points(result.vertices, check_fractions(16))) == 1).all()
    # DeepFool reaches the inner circle exactly (the classifier is linear along a radius), then
    # overshoots by 10% of the step from the chord's midpoint: ~ R_IN/chord, 10% above the bound.
    assert lower_bound() <= path_metrics(result.vertices)["deviation"] <= 1.1 * lower_bound() * 1.01
    # each DeepFool pull costs at least one forward+backward and the search's check of its result
    assert result.evaluations > 2 + len(check_fractions(16)) * (len(result.vertices) - 1)


@pytest.mark.parametrize("max_depth", [0, 2])
def test_search_that_exceeds_its_max_depth_fails(max_depth: int) -> None:
    a, b = chord_pair()
    (result,) = find_paths(Annulus().eval(), a, b, torch.tensor([1]), attack=radial_pull, points_per_segment=8, max_depth=max_depth)
    assert not result.success and result.reason == "max_depth" and result.depth == max_depth


def test_pull_that_does_not_reach_the_class_fails_the_path() -> None:
    a, b = chord_pair()
    def stuck(model: nn.Module, x: Tensor, y: Tensor | None = None, target: Tensor | None = None) -> AttackResult:
        return AttackResult(x.clone(), torch.zeros(len(x), dtype=torch.bool), torch.zeros(len(x)), torch.full((len(x),), 3))

    (result,) = find_paths(Annulus().eval(), a, b, torch.tensor([1]), attack=stuck, points_per_segment=8)
    assert not result.success and result.reason == "pull_failed"
    # endpoints, one check, the attack's 3 steps and its final forward, the check of its result
    assert result.evaluations == 2 + 9 + (3 + 1) + 1


def test_max_vertices_fails_a_path_that_needs_more() -> None:
    a, b = chord_pair()
    model = Annulus().eval()
    (free,) = find_paths(model, a, b, torch.tensor([1]), attack=radial_pull, points_per_segment=8)
    (capped,) = find_paths(model, a, b, torch.tensor([1]), attack=radial_pull, points_per_segment=8, max_vertices=len(free.vertices) - 1)
    (enough,) = find_paths(model, a, b, torch.tensor([1]), attack=radial_pull, points_per_segment=8, max_vertices=len(free.vertices))
    assert free.success and enough.success and not capped.success and capped.reason == "max_vertices"


def test_pairs_searched_together_match_pairs_searched_alone() -> None:
    model = Annulus().eval()
    pairs = [chord_pair(angle) for angle in (0.0, 1.0, 2.5, 4.0)]
    a = torch.cat([p[0] for p in pairs])
    b = torch.cat([p[1] for p in pairs])
    label = torch.ones(4, dtype=torch.long)
    together = find_paths(model, a, b, label, attack=radial_pull, points_per_segment=8, max_depth=3)
    alone = [find_paths(model, a[i : i + 1], b[i : i + 1], label[:1], attack=radial_pull, points_per_segment=8, max_depth=3)[0] for i in range(4)]
    for t, s in zip(together, alone):
        assert (t.success, t.depth, t.evaluations, t.reason) == (s.success, s.depth, s.evaluations, s.reason)
        assert torch.allclose(t.vertices, s.vertices)
    # rotating the annulus problem rotates the path: same number of vertices and deviation
    assert len({len(t.vertices) for t in together}) == 1


def test_search_rejects_bad_inputs() -> None:
    model = Annulus().eval()
    a, b = chord_pair()
    with pytest.raises(InputError, match="endpoint"):
        find_paths(model, a, CENTRE.unsqueeze(0), torch.tensor([1]), attack=radial_pull)
    with pytest.raises(InputError, match="LongTensor"):
        find_paths(model, a, b, torch.tensor([1.0]), attack=radial_pull)
    with pytest.raises(ConfigError, match="points_per_segment"):
        find_paths(model, a, b, torch.tensor([1]), attack=radial_pull, points_per_segment=0)
    with pytest.raises(ConfigError, match="max_depth"):
        find_paths(model, a, b, torch.tensor([1]), attack=radial_pull, max_depth=-1)
    with pytest.raises(InputError, match="training mode"):
        find_paths(nn.Sequential(nn.Dropout(), Annulus()).train(), a, b, torch.tensor([1]), attack=radial_pull)


# ---------------------------------------------------------------- exact certification


def max_of_affine(weight: Tensor, bias: Tensor) -> tuple[list[nn.Module], Tensor, Tensor]:
    """ReLU layers computing max_i (weight_i x + bias_i) for 2^k rows by a tree of pairwise maxima
    (max(u, v) = relu(v) - relu(-v) + relu(u - v)), exact weights; returns the layers and the
    affine map (A, beta) from their last hidden layer to the maximum."""
    layers: list[nn.Module] = []
    A, beta = weight.double(), bias.double()
    while len(A) > 1:
        m = len(A) // 2
        even, odd, b_even, b_odd = A[0::2], A[1::2], beta[0::2], beta[1::2]
        linear = nn.Linear(A.shape[1], 3 * m).double()
        with torch.no_grad():
            linear.weight.copy_(torch.cat([odd, -odd, even - odd]))
            linear.bias.copy_(torch.cat([b_odd, -b_odd, b_even - b_odd]))
        layers += [linear, nn.ReLU()]
        eye = torch.eye(m, dtype=torch.float64)
        A, beta = torch.cat([eye, -eye, eye], dim=1), torch.zeros(m, dtype=torch.float64)
    return layers, A, beta


def two_class_head(A: Tensor, beta: Tensor, low: float, high: float) -> list[nn.Module]:
    """Logits (0, s) with s = min(g - low, high - g) for g = A h + beta: class 1 iff low < g < high."""
    mid, half = (low + high) / 2, (high - low) / 2
    fold = nn.Linear(A.shape[1], 2).double()
    out = nn.Linear(2, 2).double()
    with torch.no_grad():
        fold.weight.copy_(torch.cat([A, -A]))
        fold.bias.copy_(torch.cat([beta - mid, mid - beta]))
        out.weight.copy_(torch.tensor([[0.0, 0.0], [-1.0, -1.0]]))
        out.bias.copy_(torch.tensor([0.0, half], dtype=torch.float64))
    return [fold, nn.ReLU(), out]  # s = half - |g - mid|


SIDES = 8
OCT_IN, OCT_OUT = 0.15, 0.45  # class 1: OCT_IN < g(x) < OCT_OUT, g the regular octagon's gauge (apothem)
TOP = OCT_IN / math.cos(math.pi / SIDES)  # the inner octagon has a vertex straight above the centre, this far up


def octagon_annulus() -> nn.Module:
    """A ReLU MLP whose class 1 is an octagonal annulus around CENTRE, built from exact weights."""
    angles = torch.tensor([math.pi / SIDES + k * 2 * math.pi / SIDES for k in range(SIDES)], dtype=torch.float64)
    normals = torch.stack([angles.cos(), angles.sin()], dim=1)
    layers, A, beta = max_of_affine(normals, -normals @ CENTRE.double())
    return nn.Sequential(*layers, *two_class_head(A, beta, OCT_IN, OCT_OUT)).eval()


GAP = (0.499, 0.501)  # class 0 between the stripes (and outside them)
STRIPES = ((0.40, GAP[0]), (GAP[1], 0.60))


def two_stripes() -> nn.Module:
    """A ReLU MLP whose class 1 is two thin vertical stripes, STRIPES, split by a thinner gap."""
    (a0, a1), (b0, b1) = STRIPES
    first = nn.Linear(2, 4).double()
    second = nn.Linear(4, 3).double()
    out = nn.Linear(3, 2).double()
    with torch.no_grad():
        # |x0 - centre| of each stripe, then s = max(sA, sB) with s_i = half_i - |x0 - centre_i|
        first.weight.copy_(torch.tensor([[1.0, 0], [-1, 0], [1, 0], [-1, 0]]))
        ca, cb = (a0 + a1) / 2, (b0 + b1) / 2
        first.bias.copy_(torch.tensor([-ca, ca, -cb, cb], dtype=torch.float64))
        ha, hb = (a1 - a0) / 2, (b1 - b0) / 2
        # rows: sA - sB, sB, -sB  (sA = ha - h0 - h1, sB = hb - h2 - h3)
        second.weight.copy_(torch.tensor([[-1.0, -1, 1, 1], [0, 0, -1, -1], [0, 0, 1, 1]]))
        second.bias.copy_(torch.tensor([ha - hb, hb, -hb], dtype=torch.float64))
        out.weight.copy_(torch.tensor([[0.0, 0, 0], [1, 1, -1]]))
        out.bias.zero_()
    return nn.Sequential(first, nn.ReLU(), second, nn.ReLU(), out).eval()


def dense_labels(model: nn.Module, vertices: Tensor, num: int = 20001) -> Tensor:
    return predict(model, segment_points(vertices.double(), torch.linspace(0, 1, num, dtype=torch.float64)))


def clipping_chord() -> tuple[Tensor, Tensor, float, float]:
    """A chord inside the annulus except for a sliver of width ~5e-3 where it clips the hole's top
    vertex, between the sampler's check points; returns it and the sliver's t-interval."""
    depth = 1e-3  # how far below the top vertex the chord runs
    y = 0.5 + TOP - depth
    left, right = -0.25, 0.30
    a = torch.tensor([[0.5 + left, y]], dtype=torch.float64)
    b = torch.tensor([[0.5 + right, y]], dtype=torch.float64)
    # Near the vertex the hole is bounded by the sides at 90 +- 180/SIDES degrees: |dx| < depth * tan(that)
    half_width = depth * math.tan(math.pi / 2 - math.pi / SIDES)
    return a, b, (-half_width - left) / (right - left), (half_width - left) / (right - left)


def test_certifier_rejects_a_chord_the_sampler_accepts_on_the_annulus() -> None:
    model = octagon_annulus()
    a, b, t_in, t_out = clipping_chord()
    assert predict(model, torch.cat([a, b])).tolist() == [1, 1]
    # the sampler's premise: every check point is in class 1, yet the chord leaves it
    assert (predict(model, segment_points(torch.cat([a, b]), check_fractions(16).double())) == 1).all()
    assert (dense_labels(model, torch.cat([a, b])) == 0).any()
    (sampled,) = find_paths(model, a, b, torch.tensor([1]), attack=DeepFool(), points_per_segment=16)
    assert sampled.success and sampled.status == "sampled" and len(sampled.vertices) == 2

    found = certify_segments(model, a, b, torch.tensor([1]))
    assert found.status == ["exits"]
    assert float(found.exit_t[0]) == pytest.approx(t_in, abs=1e-9)  # where the chord enters the hole, in closed form
    assert float(found.min_margin[0]) < 0

    # a path over the hole: certified, and every one of 20001 points on it is in class 1
    over = torch.tensor([[0.25, 0.5 + TOP - 1e-3], [0.5, 0.5 + TOP + 0.05], [0.8, 0.5 + TOP - 1e-3]], dtype=torch.float64)
    inside = certify_segments(model, over[:-1], over[1:], torch.tensor([1, 1]))
    assert inside.status == ["certified", "certified"] and (inside.min_margin > 0).all()
    assert (dense_labels(model, over) == 1).all()

    # the certified search goes around: more vertices, and dense sampling agrees with its certificate
    (certified,) = find_paths(model, a, b, torch.tensor([1]), attack=DeepFool(), points_per_segment=16, certifier=Certifier())
    assert certified.certified and certified.status == "certified" and len(certified.vertices) > 2
    assert certified.pieces > 0 and certified.uncertified == 0
    assert (dense_labels(model, certified.vertices) == 1).all()


def test_no_path_between_two_stripes_is_certified() -> None:
    model = two_stripes()
    ys = torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64)
    a = torch.stack([torch.full_like(ys, 0.41), ys], dim=1)
    b = torch.stack([torch.full_like(ys, 0.57), ys.flip(0)], dim=1)
    label = torch.ones(3, dtype=torch.long)
    sampled = find_paths(model, a, b, label, attack=DeepFool(), points_per_segment=16, max_depth=6)
    # every pair "succeeds" by sampling, though the gap cuts the class in two
    assert [p.status for p in sampled] == ["sampled"] * 3
    for path in sampled:
        assert (dense_labels(model, path.vertices) == 0).any()
    certified = find_paths(model, a, b, label, attack=DeepFool(), points_per_segment=16, max_depth=6, certifier=Certifier())
    assert [p.status for p in certified] == ["failed"] * 3 and all(p.reason for p in certified)
    # on the straight segments, the first exit is where x0 reaches the gap: t = (0.499 - 0.41) / 0.16
    found = certify_segments(model, a, b, label)
    assert found.status == ["exits"] * 3
    assert found.exit_t.tolist() == pytest.approx([(GAP[0] - 0.41) / 0.16] * 3, abs=1e-9)



# ---------------------------------------------------------------- metrics on hand-built polylines


def test_metrics_of_hand_built_polylines() -> None:
    tent = path_metrics(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]]))
    assert tent == pytest.approx({"points": 3.0, "deviation": 0.5, "length_ratio": math.sqrt(2)})
    # a vertex beyond the end: its distance is to the segment's endpoint, not to the infinite line
    beyond = path_metrics(torch.tensor([[0.0, 0.0], [3.0, 1.0], [2.0, 0.0]]))
    assert beyond["deviation"] == pytest.approx(math.sqrt(2) / 2)
    assert beyond["length_ratio"] == pytest.approx((math.sqrt(10) + math.sqrt(2)) / 2)
    # collinear extra vertices: straight, but more points
    line = path_metrics(torch.tensor([[0.0, 0.0, 0.0], [0.25, 0.5, 0.0], [1.0, 2.0, 0.0]]))
    assert line == pytest.approx({"points": 3.0, "deviation": 0.0, "length_ratio": 1.0}, abs=1e-12)
    # images: the metric works on flattened pixels; a 3-4-5 triangle in a 2x2 image
    images = torch.zeros(3, 1, 2, 2)
    images[1, 0, 0, 0], images[1, 0, 1, 1] = 3.0, 4.0
    images[2, 0, 0, 0] = 6.0
    assert path_metrics(images)["deviation"] == pytest.approx(4.0 / 6.0)
    with pytest.raises(InputError, match="coincide"):
        path_metrics(torch.tensor([[1.0, 1.0], [2.0, 0.0], [1.0, 1.0]]))
    with pytest.raises(InputError, match="two vertices"):
        path_metrics(torch.tensor([[1.0, 1.0]]))


def test_resample_path_spaces_points_by_arc_length() -> None:
    corner = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    points = resample_path(corner, 5)
    expected = torch.tensor([[0.0, 0.0], [0.5, 0.0], [1.0, 0.0], [1.0, 0.5], [1.0, 1.0]])
    assert torch.allclose(points, expected, atol=1e-6)


def test_path_pca_of_straight_and_bent_paths() -> None:
    straight = probe.path_pca(torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, 4.0, 0.0, 0.0]]), 50, 10)
    ratio = straight["explained_variance_ratio"]
    assert ratio.shape == (10,) and ratio[0] == pytest.approx(1.0, abs=1e-6) and ratio[1:].abs().max() < 1e-6
    span = straight["projection"][:, 0]
    assert float(span.max() - span.min()) == pytest.approx(5.0, rel=1e-5)  # the chord's length
    assert straight["vertex_projection"][:, 0].tolist() == pytest.approx([-2.5, 2.5], rel=1e-5)  # oriented start -> end
    # an L of two unit legs, points uniform along it: each coordinate has variance 5/48 and their
    # covariance is 3/48, so the components (the diagonals) carry 8/48 and 2/48: a ratio of 4
    bent = probe.path_pca(torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]), 401, 3)
    ratio = bent["explained_variance_ratio"]
    assert ratio[2] < 1e-9 and float(ratio[0] / ratio[1]) == pytest.approx(4.0, rel=0.01)


# ---------------------------------------------------------------- the probe on a toy model

SHAPE = (1, 3, 3)


class ToyData:
    """A data module stand-in: random images in [0, 1]."""

    info = DatasetInfo(name="toy", num_classes=4, image_shape=SHAPE, class_names=("a", "b", "c", "d"), mean=(0.5,), std=(0.25,))

    def __init__(self) -> None:
        self.x = torch.rand(80, *SHAPE, generator=torch.Generator().manual_seed(3))

    def split_tensors(self, split: str = "test", limit: int | None = None, indices=None) -> tuple[Tensor, Tensor]:
        return self.x[:limit], torch.zeros(len(self.x[:limit]), dtype=torch.long)


def linear_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(9, 4)).eval()


def toy_context(tmp_path: Path, variants: tuple[str, ...] = ("base", "other"), **cfg) -> ProbeContext:
    options = {"name": "path_connectivity", "pair_types": ["natural", "adversarial", "noise"], "natural_pairs": 3, "adversarial_pairs": 4,
               "noise_pairs": 2, "candidate_images": 80, "pairs_per_batch": 3, "pca_points": 20, **cfg}
    models = {name: linear_model(seed) for seed, name in enumerate(variants)}
    return ProbeContext(options=options, models=models, data=ToyData(), attack={}, device=torch.device("cpu"), seed=0, work_dir=tmp_path / "work")


def test_probe_on_convex_regions_gives_straight_paths_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = toy_context(tmp_path)
    result = probe.compute(ctx)
    table = {(r["model"], r["pair_type"]): r for r in result.tables["table2"]}
    assert set(table) == {(m, t) for m in ("base", "other") for t in ("natural", "adversarial", "noise")}
    for (model, pair_type), row in table.items():
        # linear classifier: convex regions, so every path is its straight segment
        assert row["pairs"] == {"natural": 3, "adversarial": 4, "noise": 2}[pair_type]
        assert row["success_rate"] == 1.0 and row["points_mean"] == 2.0 and row["points_std"] == 0.0
        # affine models: every straight path is certified by the bounds of its one interval, exact for an affine map
        assert row["check"] == "certified" and row["certified"] == row["pairs"] and row["bound_checks_mean"] == 1.0
        assert row["pieces_mean"] == 0.0
        assert row["deviation_mean"] == 0.0
    for row in result.tables["pairs"]:
        if row["pair_type"] == "adversarial":
            # a third class, different from both originals
            assert row["class"] not in (row["start_class"], row["end_class"]) and row["start_class"] != row["end_class"]
        if row["pair_type"] == "natural":
            assert row["start_class"] == row["end_class"] == row["class"] and row["start_index"] != row["end_index"]
    assert result.arrays["base/adversarial/explained_variance_ratio"][0] == pytest.approx(1.0, abs=1e-5)
    # every successful path's ratios, one row per path: a straight path has all its variance on one component
    per_path = result.arrays["other/natural/pair_explained_variance_ratio"]
    assert per_path.shape == (3, result.meta["options"]["pca_components"])
    assert per_path[:, 0].tolist() == pytest.approx([1.0] * 3, abs=1e-5)

    # A rerun reuses every saved pair: no search at all. Losing one pair's file redoes that pair only.
    calls: list[int] = []
    real = probe.find_paths
    monkeypatch.setattr(probe, "find_paths", lambda model, a, *args, **kw: calls.append(len(a)) or real(model, a, *args, **kw))
    again = probe.compute(toy_context(tmp_path))
    assert calls == [] and again.tables == result.tables
    # Each model's pairs sit in a folder named by its fingerprint: two models, two folders per type.
    folders = sorted((tmp_path / "work" / "path_connectivity").glob("*/adversarial"))
    assert len(folders) == 2
    (folders[0] / "pair_0002.pt").unlink()
    probe.compute(toy_context(tmp_path))
    assert calls == [1]
    # A section that draws other things from the same pairs (Table 2 after Figures 5-8) shares a
    # run's shared folder and searches nothing again.
    calls.clear()
    shared = toy_context(tmp_path, draw=["figures"])
    shared.shared_dir, shared.work_dir = tmp_path / "shared", tmp_path / "figures-work"
    first = probe.compute(shared)
    assert sum(calls) == 3 + 4 + 2 + 3 + 4 + 2
    calls.clear()
    table_section = toy_context(tmp_path, draw=["table2"], pair_types=["natural", "adversarial"])
    table_section.shared_dir, table_section.work_dir = tmp_path / "shared", tmp_path / "table-work"
    assert probe.compute(table_section).tables["table2"] == [r for r in first.tables["table2"] if r["pair_type"] != "noise"]
    assert calls == []
    # Other options mean other pairs: nothing is reused.
    calls.clear()
    probe.compute(toy_context(tmp_path, points_per_segment=5, pair_types=["natural"]))
    assert sum(calls) == 6

    # Drawing is slow: one model and two pair types are enough to check every figure of the report.
    small = probe.compute(toy_context(tmp_path, variants=("base",), pair_types=["natural", "adversarial"]))
    small.save(tmp_path / "saved")
    artefacts = reporter.draw(ProbeResult.load(tmp_path / "saved"), tmp_path / "report")
    names = {a.name for a in artefacts}
    assert {"fig5_natural_path", "fig6_natural_variance", "fig7_adversarial_path", "fig8_adversarial_variance", "table2_paths"} <= names
    for artefact in artefacts:
        assert all(path.stat().st_size > 0 for path in artefact.paths)
    table2 = next(a for a in artefacts if a.name == "table2_paths")
    assert table2.rows[0]["number of points"] == "2 ± 0" and "Table 2" in table2.caption
    assert table2.rows[0]["certified"] == 3 and table2.rows[0]["check"] == "certified"
    # the per-pair table is written and linked, never an artefact to embed
    assert "path_pairs" not in names and (tmp_path / "report" / "path_pairs.csv").stat().st_size > 0
    assert "path_pairs.csv" in table2.caption and str(table2.paths[0]).endswith("table2_paths.csv")

    # the three experiments split the drawings: in a report, each figure and table appears once
    drawn: list[str] = []
    for experiment in ("fig5_6_natural_path", "fig7_8_adversarial_path", "table2_paths"):
        cfg = compose(experiment, ["variants=[base]"])
        options = probe.PathOptions.from_cfg(OmegaConf.to_container(cfg.probe, resolve=True))
        shown = ProbeResult.load(tmp_path / "saved")
        shown.meta["options"]["draw"] = options.draw
        shown.meta["pair_types"] = [t for t in shown.meta["pair_types"] if t in options.pair_types]
        drawn += [a.name for a in reporter.draw(shown, tmp_path / experiment)]
    assert sorted(drawn) == sorted(["fig5_natural_path", "fig6_natural_variance", "fig7_adversarial_path", "fig8_adversarial_variance", "table2_paths"])


def test_failed_and_sampled_only_paths_count_against_the_success_rate_only() -> None:
    def row(status: str, points: float, deviation: float, depth: int, evaluations: int, check: str = "certified") -> dict:
        success = status == "certified" or (status == "sampled" and check != "certified")
        return {"model": "m", "pair_type": "natural", "check": check, "status": status, "success": success, "points": points,
                "deviation": deviation, "depth": depth, "evaluations": evaluations, "pieces": 7, "bound_checks": 3, "seconds": 1.0}

    rows = [
        row("certified", 3, 0.1, 1, 10),
        row("certified", 5, 0.3, 2, 20),
        row("sampled", 9, 0.9, 3, 30),  # completed, but a segment over the piece budget: not a success
        row("failed", math.nan, math.nan, 4, 100),
    ]
    (out,) = probe.table2_rows(rows)
    assert (out["certified"], out["sampled_only"], out["failed"], out["successes"]) == (2, 1, 1, 2)
    assert out["success_rate"] == pytest.approx(2 / 4) and out["check"] == "certified"
    assert out["points_mean"] == 4.0 and out["points_std"] == pytest.approx(math.sqrt(2))
    assert out["deviation_mean"] == pytest.approx(0.2) and out["deviation_std"] == pytest.approx(math.sqrt(0.02))
    assert out["evaluations_mean"] == 40.0
    # a model that cannot be certified: its sampled paths are its successes, and say so
    sampled = "sampled at 16 points per segment"
    (out,) = probe.table2_rows([row("sampled", 3, 0.1, 1, 10, sampled), row("failed", math.nan, math.nan, 4, 100, sampled)])
    assert (out["certified"], out["sampled_only"], out["successes"], out["check"]) == (0, 1, 1, sampled)


def test_options_match_the_config_file_and_reject_typos() -> None:
    cfg = yaml.safe_load((ROOT / "conf" / "probe" / "path_connectivity.yaml").read_text())
    assert probe.PathOptions.from_cfg(cfg) == probe.PathOptions()
    with pytest.raises(ConfigError, match="max_dept"):
        probe.PathOptions.from_cfg({"max_dept": 3})
    with pytest.raises(ConfigError, match="pair types"):
        probe.PathOptions.from_cfg({"pair_types": ["natural", "bogus"]})
    # the attacks are attack-group nodes, built (and checked) by the registry before any work
    options = probe.PathOptions()
    pull, push = options.attack("pull_attack"), options.attack("push_attack")
    assert isinstance(pull, DeepFool) and (pull.overshoot, pull.max_iter) == (1.0, 50)
    assert isinstance(push, DeepFool) and (push.overshoot, push.max_iter) == (0.02, 50)
    with pytest.raises(ConfigError, match="unknown attack 'bogus'"):
        probe.PathOptions.from_cfg({"pull_attack": {"name": "bogus"}})
    with pytest.raises(ConfigError, match="overshoot"):
        probe.PathOptions.from_cfg({"push_attack": {"name": "deepfool", "overshoot": -1.0}})
    with pytest.raises(ConfigError, match="unknown option"):
        probe.PathOptions.from_cfg({"pull_attack": {"name": "deepfool", "overshot": 1.0}})
    with pytest.raises(ConfigError, match="'name' key"):
        probe.PathOptions.from_cfg({"pull_attack": 0.5})


# ---------------------------------------------------------------- the experiments on digits

# Few pairs and shallow searches keep these quick; the maths is checked above.
SMALL = ["variants=[base]", "probe.natural_pairs=2", "probe.adversarial_pairs=2", "probe.candidate_images=120", "probe.max_depth=6"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment, pair_types",
    [("fig5_6_natural_path", ["natural"]), ("fig7_8_adversarial_path", ["adversarial"]), ("table2_paths", ["natural", "adversarial"])],
)
def test_experiment_on_digits_writes_its_files(tmp_path: Path, experiment: str, pair_types: list[str]) -> None:
    out = run_experiment(experiment, SMALL, tmp_path)
    files = {p.name for p in out.rglob("*") if p.is_file() and p.stat().st_size > 0}
    assert "path_pairs.csv" in files
    assert ({"table2_paths.csv", "table2_paths.md"} <= files) == (experiment == "table2_paths")
    result = ProbeResult.load(out / "results" / "path_connectivity")
    table = {row["pair_type"]: row for row in result.tables["table2"]}
    assert sorted(table) == sorted(pair_types) and all(row["pairs"] == 2 for row in table.values())
    # the digits smallcnn is ReLU + max-pool + batch-norm: its paths are certified, not sampled
    assert all(row["check"] == "certified" for row in table.values())
    assert all(row["certified"] + row["sampled_only"] + row["failed"] == 2 for row in table.values())
    figures = {"natural": ("fig5_natural_path", "fig6_natural_variance"), "adversarial": ("fig7_adversarial_path", "fig8_adversarial_variance")}
    for pair_type in pair_types:
        # a type's figures are drawn exactly when one of its paths succeeded, by its figure experiment
        drawn = pair_type in result.meta["figure_paths"].get("base", {})  # a variant without a success has no entry
        assert drawn == (table[pair_type]["successes"] > 0)
        for name in figures[pair_type]:
            assert ({f"{name}.png", f"{name}.pdf"} <= files) == (drawn and experiment != "table2_paths")
    if "natural" in table:
        assert table["natural"]["certified"] > 0
