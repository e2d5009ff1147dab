"""Paths inside one classification region, after Fawzi et al. 2018 (report section 2.2).

:func:`find_paths` looks for a polygonal path between two images of the same class ``k``:

* a straight segment is checked at evenly spaced points (one batched forward); with a
  ``certifier`` (piecewise-linear networks, :mod:`robustness.geometry.certify`) a segment whose
  points all pass is then certified exactly: every point of it, not only the checked ones, is
  classified ``k``. A segment the certifier proves to leave ``k`` is treated like one whose check
  failed; one it cannot decide within its budget is kept, but only as sampled;
* a segment that fails its sampled check is split at its midpoint, one the certifier proves to
  leave ``k`` at its point deepest outside ``k``; that point becomes a vertex, pulled back into
  ``k`` first when it lies outside by the targeted ``attack`` the caller passes (the probe builds
  it from its ``pull_attack`` config: targeted DeepFool), then both halves are searched the same
  way, one level deeper, up to ``max_depth``.

A completed path is "certified" when every one of its segments was certified, "sampled" when
some segment passed the sampled check only; a path that cannot be completed within the limits is
a failure, never a success.

The recursion runs breadth-first over all pairs at once, so each level costs one batched forward
for every segment check of every pair, one certification walk over every segment that passed and
one batched attack call for every midpoint to pull.

:func:`path_metrics` measures a path by its number of vertices and by its largest distance from
the straight segment between its endpoints, divided by that segment's length (Table 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from robustness.errors import ConfigError, InputError
from robustness.geometry.certify import Certifier
from robustness.tensors import predict



class TargetedAttack(Protocol):
    """The attack group's call shape, targeted: ``attack(model, x, target=t)`` returns an
    ``AttackResult``-like object with ``x_adv`` (each image moved towards ``t[i]``) and ``steps``
    (iterations each image used; each costs one forward and backward, plus a final forward)."""

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor | None = None, target: Tensor | None = None) -> Any: ...

# A sanity bound on the recursion: deeper than this, a path would have more vertices than any
# search could afford to find.
MAX_DEPTH_LIMIT = 50


@dataclass
class PathResult:
    """One searched path.

    vertices:    (V, *image_shape) the polyline from the start to the end image, in order; for a
                 failure, the vertices found before the search stopped (possibly with gaps)
    success:     True when every segment passed its check within the limits (sampled, at least)
    certified:   True when, besides, every segment was certified: every point of the path is in the class
    depth:       deepest recursion level reached (0: the straight segment was kept)
    evaluations: images the model classified for this path: check points of every segment, each
                 pull's own evaluations (one forward+backward per attack step plus its final
                 forward) and one check of its result, and the two endpoints
    reason:      why the search failed ("" on success): "max_depth", "max_vertices" or "pull_failed"
    pieces:      linear pieces the certifier walked for this path's segments (each one a forward
                 of the segment and its direction), 0 without a certifier
    bound_checks: intervals of this path's segments the certifier bounded (each one forward of
                 the interval's bounds and its two ends); most segments are proved this way
    uncertified: kept segments the certifier could not decide (over its piece budget)
    """

    vertices: Tensor
    success: bool
    depth: int
    evaluations: int
    reason: str = ""
    certified: bool = False
    pieces: int = 0
    uncertified: int = 0
    bound_checks: int = 0

    @property
    def status(self) -> str:
        """"certified", "sampled" (completed, some segment only sampled) or "failed"."""
        return "certified" if self.certified else "sampled" if self.success else "failed"


def check_fractions(points_per_segment: int) -> Tensor:
    """Where a segment is checked, as fractions of its length: interior points plus the midpoint.

    The endpoints are never re-checked: they are vertices already known to lie in the class.
    The midpoint is always among them because the search needs its label when it splits.
    """
    t = torch.arange(1, points_per_segment + 1, dtype=torch.float64) / (points_per_segment + 1)
    return torch.unique(torch.cat([t, torch.tensor([0.5], dtype=torch.float64)]))


def find_paths(
    model: nn.Module,
    x_start: Tensor,
    x_end: Tensor,
    label: Tensor,
    *,
    attack: TargetedAttack,
    points_per_segment: int = 16,
    max_depth: int = 10,
    max_vertices: int | None = None,
    batch_size: int = 256,
    certifier: Certifier | None = None,
) -> list[PathResult]:
    """Search a path inside class ``label[i]`` from ``x_start[i]`` to ``x_end[i]`` for every pair ``i``.

    ``attack`` pulls split points that lie outside the class back in. ``max_vertices``
    (optional) fails a pair whose path would need more vertices. ``certifier`` (optional; the
    model must then be piecewise linear) certifies every segment that passes its sampled check.
    Both endpoints of every pair must already be classified ``label[i]``; the model must be in
    eval mode.
    """
    _check_search_inputs(model, x_start, x_end, label, points_per_segment, max_depth, max_vertices, batch_size)
    if certifier is not None and (problems := certifier.problems(model)):
        raise InputError(
            "a certifier was given but the model is not piecewise linear: " + "; ".join(problems[:3]),
            "search without a certifier (segments are then only sampled)",
        )
    n_pairs = len(label)
    label = label.to(x_start.device)

    ends = predict(model, torch.cat([x_start, x_end]), batch_size)
    bad = ((ends[:n_pairs] != label) | (ends[n_pairs:] != label)).nonzero().flatten().tolist()
    if bad:
        raise InputError(
            f"{len(bad)} of {n_pairs} pairs have an endpoint the model does not put in the path's class (first: pair {bad[0]})",
            "pass pairs whose two images the model classifies as 'label' (predict them first)",
        )

    evaluations = [2] * n_pairs
    depth_reached = [0] * n_pairs
    alive = [True] * n_pairs
    reason = [""] * n_pairs
    pieces = [0] * n_pairs
    bound_checks = [0] * n_pairs
    # (key of the segment, start vertex, whether the segment was certified)
    kept: list[list[tuple[str, Tensor, bool]]] = [[] for _ in range(n_pairs)]

    fractions = check_fractions(points_per_segment).to(x_start.device, x_start.dtype)
    mid_column = int((fractions == 0.5).nonzero())
    view = (1, -1) + (1,) * (x_start.dim() - 1)

    # Pending segments of all pairs: start, end, owner pair, depth, and a key that orders the
    # segments of a pair along its path: the left/right turns ("0"/"1") from the root segment, so
    # the kept segments (leaves of the split tree) sort into path order.
    seg_a, seg_b = x_start.detach(), x_end.detach()
    owner = torch.arange(n_pairs)
    depth = torch.zeros(n_pairs, dtype=torch.long)
    keys = [""] * n_pairs

    while len(owner):
        m = len(fractions)
        points = seg_a.unsqueeze(1) + fractions.view(view) * (seg_b - seg_a).unsqueeze(1)
        labels = predict(model, points.flatten(0, 1), batch_size).view(len(owner), m).cpu()
        target = label.cpu()[owner]
        ok = (labels == target.unsqueeze(1)).all(1)
        certified = torch.zeros_like(ok)
        # Where a failed segment is split, and whether that point must be pulled into the class.
        split_at = torch.full((len(owner),), 0.5, dtype=torch.float64)
        outside_at_split = labels[:, mid_column] != target
        sampled_ok = ok.nonzero().flatten()
        if certifier is not None and len(sampled_ok):
            # Walked to the end even past an exit, so that a proven exit also says where the
            # segment lies deepest outside the class: that point is split off and pulled in.
            found = certifier(model, seg_a[sampled_ok], seg_b[sampled_ok], label[owner[sampled_ok]], stop_at_exit=False)
            for j, i in enumerate(sampled_ok.tolist()):
                pieces[int(owner[i])] += int(found.pieces[j])
                if found.bound_checks is not None:
                    bound_checks[int(owner[i])] += int(found.bound_checks[j])
                certified[i] = found.status[j] == "certified"
                if found.status[j] == "exits":
                    ok[i] = False
                    split_at[i] = float(found.worst_t[j])
                    outside_at_split[i] = True
        for i, pair in enumerate(owner.tolist()):
            evaluations[pair] += m
            depth_reached[pair] = max(depth_reached[pair], int(depth[i]))
            if ok[i]:
                kept[pair].append((keys[i], seg_a[i], bool(certified[i])))

        split = (~ok).nonzero().flatten()
        for i in split[depth[split] >= max_depth].tolist():
            _fail(alive, reason, int(owner[i]), "max_depth")
        # A pair that just failed needs no more pulls: drop all its segments now.
        split = split[(depth[split] < max_depth) & torch.tensor([alive[int(owner[i])] for i in split.tolist()], dtype=torch.bool)]

        fraction = split_at[split].to(seg_a.device, seg_a.dtype).view((-1,) + (1,) * (seg_a.dim() - 1))
        mids = torch.where(fraction == 0.5, (seg_a[split] + seg_b[split]) / 2, seg_a[split] + fraction * (seg_b[split] - seg_a[split]))
        outside = outside_at_split[split].nonzero().flatten()
        if len(outside):
            result = attack(model, mids[outside], target=label[owner[split[outside]]].to(mids.device))
            pulled = result.x_adv.detach().to(mids.dtype)
            now = predict(model, pulled, batch_size).cpu()
            # The attack's last forward finds the target reached; it runs no step after it.
            forwards = torch.as_tensor(result.steps).cpu() + 1
            for j, i in enumerate(split[outside].tolist()):
                pair = int(owner[i])
                evaluations[pair] += int(forwards[j]) + 1
                if now[j] != target[i]:
                    _fail(alive, reason, pair, "pull_failed")
            mids[outside] = pulled

        seg_a = torch.cat([seg_a[split], mids])
        seg_b = torch.cat([mids, seg_b[split]])
        owner = torch.cat([owner[split], owner[split]])
        depth = torch.cat([depth[split], depth[split]]) + 1
        keys = [keys[i] + "0" for i in split.tolist()] + [keys[i] + "1" for i in split.tolist()]

        if max_vertices is not None:
            # Every kept or pending segment contributes its start vertex; the end image adds one.
            pending = torch.bincount(owner, minlength=n_pairs).tolist()
            for pair in range(n_pairs):
                if alive[pair] and len(kept[pair]) + pending[pair] + 1 > max_vertices:
                    _fail(alive, reason, pair, "max_vertices")

        keep = torch.tensor([alive[p] for p in owner.tolist()], dtype=torch.bool)
        seg_a, seg_b, owner, depth = seg_a[keep], seg_b[keep], owner[keep], depth[keep]
        keys = [key for key, alive_segment in zip(keys, keep.tolist()) if alive_segment]

    results = []
    for pair in range(n_pairs):
        segments = sorted(kept[pair], key=lambda item: item[0])
        vertices = torch.stack([vertex for _, vertex, _ in segments] + [x_end[pair].detach()])
        uncertified = sum(not c for _, _, c in segments) if certifier is not None else 0
        certified = alive[pair] and certifier is not None and uncertified == 0
        results.append(
            PathResult(vertices, alive[pair], depth_reached[pair], evaluations[pair], reason[pair], certified, pieces[pair], uncertified,
                       bound_checks[pair])
        )
    return results


def _fail(alive: list[bool], reason: list[str], pair: int, why: str) -> None:
    if alive[pair]:
        alive[pair], reason[pair] = False, why


def _check_search_inputs(
    model: nn.Module,
    x_start: Tensor,
    x_end: Tensor,
    label: Tensor,
    points_per_segment: int,
    max_depth: int,
    max_vertices: int | None,
    batch_size: int,
) -> None:
    if model.training:
        raise InputError("the model is in training mode; the path search needs deterministic outputs", "call model.eval() first")
    for name, x in (("x_start", x_start), ("x_end", x_end)):
        if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 2:
            raise InputError(f"{name} must be a batched floating-point tensor (pairs, ...), got {getattr(x, 'shape', type(x).__name__)}")
        if not torch.isfinite(x).all():
            raise InputError(f"{name} contains NaN or infinite values", "clean or drop those images before searching paths")
    if x_start.shape != x_end.shape:
        raise InputError(f"start and end images differ in shape: {tuple(x_start.shape)} vs {tuple(x_end.shape)}")
    if not torch.is_tensor(label) or label.dim() != 1 or label.dtype != torch.long or len(label) != len(x_start):
        raise InputError(
            f"label must be a LongTensor with one class per pair ({len(x_start)}), got {getattr(label, 'dtype', type(label).__name__)} "
            f"of shape {tuple(getattr(label, 'shape', ()))}"
        )
    if points_per_segment < 1:
        raise ConfigError(f"points_per_segment must be >= 1, got {points_per_segment}", "set probe.points_per_segment, e.g. 16")
    if not 0 <= max_depth <= MAX_DEPTH_LIMIT:
        raise ConfigError(f"max_depth must lie in [0, {MAX_DEPTH_LIMIT}], got {max_depth}", "set probe.max_depth, e.g. 10")
    if max_vertices is not None and max_vertices < 2:
        raise ConfigError(f"max_vertices must be >= 2 (a path has two endpoints), got {max_vertices}", "set probe.max_vertices=null for no limit")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}", "set probe.batch_size, e.g. 256")


def path_metrics(vertices: Tensor) -> dict[str, float]:
    """Table 2's measures of one path given as (V, *shape) vertices.

    points:       number of vertices representing the path
    deviation:    largest distance of a vertex from the segment joining the endpoints, divided by
                  that segment's length (the polyline's farthest point is always a vertex, since the
                  distance to a convex set is convex along each edge)
    length_ratio: polyline length over the segment's length (1 for a straight path)
    """
    if not torch.is_tensor(vertices) or vertices.dim() < 2 or len(vertices) < 2:
        raise InputError(f"a path needs at least two vertices stacked as (V, ...), got shape {tuple(getattr(vertices, 'shape', ()))}")
    v = vertices.detach().flatten(1).double()
    chord = v[-1] - v[0]
    length = float(chord.norm())
    if not length > 0:
        raise InputError("the path's endpoints coincide, so its deviation is undefined", "pair two distinct images")
    # The endpoints lie on the segment by definition; measuring them would only add rounding.
    rel = v[1:-1] - v[0]
    t = (rel @ chord / length**2).clamp(0.0, 1.0)
    distance = (rel - t.unsqueeze(1) * chord).norm(dim=1)
    deviation = float(distance.max()) / length if len(distance) else 0.0
    polyline = float((v[1:] - v[:-1]).norm(dim=1).sum())
    return {"points": float(len(v)), "deviation": deviation, "length_ratio": polyline / length}


def resample_path(vertices: Tensor, num: int) -> Tensor:
    """``num`` points spaced evenly by arc length along the polyline, both endpoints included."""
    if num < 2:
        raise ConfigError(f"a resampled path needs at least 2 points, got {num}", "raise probe.pca_points")
    if not torch.is_tensor(vertices) or vertices.dim() < 2 or len(vertices) < 2:
        raise InputError(f"a path needs at least two vertices stacked as (V, ...), got shape {tuple(getattr(vertices, 'shape', ()))}")
    v = vertices.detach().flatten(1).double()
    edges = (v[1:] - v[:-1]).norm(dim=1)
    cumulative = torch.cat([torch.zeros(1, dtype=v.dtype), edges.cumsum(0)])
    total = float(cumulative[-1])
    if not total > 0:
        return vertices[:1].expand(num, *vertices.shape[1:]).clone()
    s = torch.linspace(0.0, total, num, dtype=v.dtype)
    edge = (torch.searchsorted(cumulative, s, right=True) - 1).clamp(0, len(edges) - 1)
    within = ((s - cumulative[edge]) / edges[edge].clamp_min(math.ulp(1.0))).clamp(0.0, 1.0)
    points = v[edge] + within.unsqueeze(1) * (v[edge + 1] - v[edge])
    return points.to(vertices.dtype).view(num, *vertices.shape[1:])
