"""Certify that straight segments stay inside one class of a piecewise-linear network: interval
bounds (:mod:`robustness.geometry.bounds`) prove most of each segment, and the exact walk
(:mod:`robustness.geometry.walk`) decides what they leave, piece by piece.

:class:`Certifier` is what the path search calls; :func:`certify_with_bounds` halves each segment
until the bounds prove its parts, then walks the parts still undecided. Both ways give the
walk's answer: a segment is "certified" only if every point of it is in the class.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor, nn

from robustness.errors import ConfigError
from robustness.geometry.bounds import IntervalBounds, bound_problems
from robustness.geometry.walk import SegmentCertificates, certify_segments, check_segments, class_margins, piecewise_linear_problems

# What one bounded interval costs against ``max_pieces``, in walked pieces: its forward carries
# the centres and radii at both ends (four rows against the walk's two). A unit of budget, not of
# time: float32 bounds cost less than float64 ones, and count the same so that a budget gives the
# same verdicts in both precisions.
BOUND_CHECK_COST = 3


@dataclass(frozen=True)
class Certifier:
    """Segment certification with its settings bound, as the path search calls it: interval
    bounds first (:func:`certify_with_bounds`; in float64, or in float32 rounded outwards with
    ``outward=True``), the exact walk for what they leave undecided; ``bisect_depth=None`` walks
    every segment piece by piece (:func:`certify_segments`)."""

    max_pieces: int = 10_000
    batch_size: int = 256
    affine: tuple[type[nn.Module], ...] = ()
    containers: tuple[type[nn.Module], ...] = ()
    bisect_depth: int | None = 10
    outward: bool = False

    def problems(self, model: nn.Module) -> list[str]:
        return piecewise_linear_problems(model, self.affine, self.containers)

    def __call__(self, model: nn.Module, a: Tensor, b: Tensor, label: Tensor, stop_at_exit: bool = True) -> SegmentCertificates:
        options = dict(max_pieces=self.max_pieces, batch_size=self.batch_size, affine=self.affine, containers=self.containers, stop_at_exit=stop_at_exit)
        if self.bisect_depth is None:
            return certify_segments(model, a, b, label, **options)
        return certify_with_bounds(model, a, b, label, bisect_depth=self.bisect_depth, outward=self.outward, **options)


def certify_with_bounds(
    model: nn.Module,
    a: Tensor,
    b: Tensor,
    label: Tensor,
    *,
    bisect_depth: int = 10,
    outward: bool = False,
    max_pieces: int = 10_000,
    batch_size: int = 256,
    affine: Iterable[type[nn.Module]] = (),
    containers: Iterable[type[nn.Module]] = (),
    stop_at_exit: bool = True,
) -> SegmentCertificates:
    """:func:`certify_segments`' answer, mostly from interval bounds: each segment is halved until
    the bounds prove its parts (at most ``bisect_depth`` times), and only the parts left undecided
    are walked piece by piece. The bounds and the walk share the ``max_pieces`` budget, each bounded
    interval counting ``BOUND_CHECK_COST`` pieces: a segment that has spent it with parts still
    undecided is "over_budget".

    A plain forward at every bounded interval's ends comes with the bounds (it is also their
    guard, as in the walk); once it finds a point outside the class, the parts after it are
    dropped, since the first exit lies before it. So ``stop_at_exit`` makes no difference here:
    ``worst_t`` of a segment that exits is the deepest point outside among those evaluated
    (every bounded end and every walked piece end), which the path search splits at.

    ``outward``: the bounds in float64 (False, the default) or in float32 rounded outwards
    (True). Both are sound and give the same verdicts. The float32 bounds cost about half as
    much per interval, but the rounding they must carry grows through every layer's |A| to some
    1e-3 of the logits' scale: they cannot prove the intervals that touch a vertex the search
    pulled just inside the boundary, which float64 bounds prove at once. So those fall back to
    float64 (below), and on the path search's segments the float32 bounds end up no faster.

    ``pieces`` counts the pieces walked, ``bound_checks`` the intervals bounded (each one forward
    of four rows per interval, plus a float64 forward at each new midpoint). ``min_margin`` of a certified segment is a lower bound of its
    smallest margin (the proven bounds), exact where the walk ran.
    """
    affine, containers = tuple(affine), tuple(containers)
    problems = piecewise_linear_problems(model, affine, containers)
    if problems:  # the walk explains it
        return certify_segments(model, a, b, label, max_pieces=max_pieces, batch_size=batch_size, affine=affine, containers=containers)
    check_segments(model, a, b, label)
    if bisect_depth < 0:
        raise ConfigError(f"bisect_depth must be >= 0, got {bisect_depth}", "e.g. 10: parts of 1/1024 of a segment are walked")
    exact = copy.deepcopy(model).to(torch.float64).eval()
    if bound_problems(exact):
        return certify_segments(model, a, b, label, max_pieces=max_pieces, batch_size=batch_size, affine=affine, containers=containers,
                                stop_at_exit=stop_at_exit)
    n = len(a)
    label = label.to(a.device)
    a64, direction = a.detach().to(torch.float64), (b.detach().to(torch.float64) - a.detach().to(torch.float64))
    view = (-1,) + (1,) * (a.dim() - 1)
    owner = torch.arange(n, device=a.device)
    t0 = torch.zeros(n, dtype=torch.float64, device=a.device)
    t1 = torch.ones_like(t0)
    out = SegmentCertificates.empty(n, record_breakpoints=False)
    out.bound_checks = torch.zeros(n, dtype=torch.long)
    inconsistent = torch.zeros(n, dtype=torch.bool)
    over_budget = torch.zeros(n, dtype=torch.bool)
    # The first point known to be outside the class (a plain forward at an interval's end): parts
    # after it cannot hold the first exit, so they are dropped; the deepest such point is worst_t.
    outside_t = torch.full((n,), math.inf, dtype=torch.float64)
    bounds = IntervalBounds(model, outward=outward)
    # Float32 bounds rounded outwards are wider than float64 ones by their rounding, which the
    # radii carry through every layer's |A|: along a segment that hugs the boundary (a pulled
    # vertex sits just inside it) they can prove nothing that float64 bounds prove at once. So an
    # interval they leave undecided, by no more than twice what rounding cost its segment at
    # depth 0 (``slack``), is bounded in float64 too; both are sound, the larger bound counts.
    plain = IntervalBounds(model, outward=False) if outward else None
    slack = torch.zeros(n, dtype=torch.float64)

    def plain_at(who: Tensor, t: Tensor) -> Tensor:
        """The plain logits at ``a + t (b - a)`` of segments ``who``, in batches."""
        logits = []
        for i in range(0, len(who), batch_size):
            rows = who[i : i + batch_size]
            logits.append(exact(a64[rows] + t[i : i + batch_size].view(view) * direction[rows]))
        return torch.cat(logits)

    try:
        with torch.no_grad():
            # Each interval's plain logits at its ends: a halved interval's ends are its parent's
            # and the midpoint, so each bisection level costs one plain forward per new midpoint.
            z_start, z_end = plain_at(owner, t0), plain_at(owner, t1)
            for depth in range(bisect_depth + 1):
                if not len(owner):
                    break
                decided = torch.zeros(len(owner), dtype=torch.bool)
                # Bounds take four rows per interval: a quarter of the walk's batch keeps memory alike.
                step = max(1, batch_size // 4)
                for first in range(0, len(owner), step):
                    part = slice(first, first + step)
                    who = owner[part]
                    x0 = a64[who] + t0[part].view(view) * direction[who]
                    x1 = x0 + (t1[part] - t0[part]).view(view) * direction[who]
                    low, consistent = (v.cpu() for v in bounds(x0, x1, label[who], z_start[part], z_end[part]))
                    if plain is not None:
                        rows = who.cpu()
                        retry = consistent & (low <= 0)
                        if depth:
                            retry &= low >= -1.1 * slack[rows]
                        if retry.any():
                            at = retry.nonzero().flatten().to(x0.device)
                            low64, consistent64 = (v.cpu() for v in plain(x0[at], x1[at], label[who][at], z_start[part][at], z_end[part][at]))
                            if not depth:
                                slack[rows[retry]] = (low64 - low[retry]).nan_to_num(0.0).clamp(min=0)
                            low[retry] = torch.maximum(low[retry], low64)
                            consistent[retry] &= consistent64
                            low[~consistent] = math.nan
                    m0 = class_margins(z_start[part], label[who]).amin(1).cpu()
                    m1 = class_margins(z_end[part], label[who]).amin(1).cpu()
                    out.batched_calls += 1
                    rows = who.cpu()
                    ok = consistent & (low > 0)
                    decided[part] = ok | ~consistent
                    inconsistent[rows[~consistent]] = True
                    out.min_margin.scatter_reduce_(0, rows[ok], low[ok], "amin")
                    for margin, where in ((m0, t0[part].cpu()), (m1, t1[part].cpu())):
                        out.outside_point(rows, margin, where, outside_t)
                out.bound_checks += torch.bincount(owner.cpu(), minlength=n)
                # The budget holds for the bounds too: a segment whose checks have cost max_pieces stops.
                spent = (BOUND_CHECK_COST * out.bound_checks >= max_pieces)[owner.cpu()]
                left = ~decided & (t0.cpu() < outside_t[owner.cpu()])
                over_budget[owner.cpu()[left & spent]] = True
                keep = left & ~spent
                owner, t0, t1 = owner[keep.to(owner.device)], t0[keep.to(t0.device)], t1[keep.to(t1.device)]
                z_start, z_end = z_start[keep.to(z_start.device)], z_end[keep.to(z_end.device)]
                if depth < bisect_depth and len(owner):
                    middle = (t0 + t1) / 2
                    z_middle = plain_at(owner, middle)
                    owner, t0, t1 = torch.cat([owner, owner]), torch.cat([t0, middle]), torch.cat([middle, t1])
                    z_start, z_end = torch.cat([z_start, z_middle]), torch.cat([z_middle, z_end])
    finally:
        bounds.close()
        if plain is not None:
            plain.close()

    # Over budget: the bounds had parts left undecided when the segment's checks ran out.
    out.status = [
        "inconsistent" if odd else "exits" if math.isfinite(t) else "over_budget" if spent else "certified"
        for odd, t, spent in zip(inconsistent.tolist(), outside_t.tolist(), over_budget.tolist())
    ]
    keep = (t0.cpu() < outside_t[owner.cpu()]).to(owner.device)  # parts before the first known outside point
    owner, t0, t1 = owner[keep], t0[keep], t1[keep]
    if len(owner):
        starts = a64[owner] + t0.view(view) * direction[owner]
        ends = a64[owner] + t1.view(view) * direction[owner]
        # What is left of each segment's budget, shared equally among its undecided parts.
        parts = torch.bincount(owner.cpu(), minlength=n)
        left = (max_pieces - BOUND_CHECK_COST * out.bound_checks) // parts.clamp(min=1)
        share = left.clamp(min=1)[owner.cpu()]
        walked = certify_segments(exact, starts, ends, label[owner], max_pieces=share, batch_size=batch_size, affine=affine,
                                  containers=containers, stop_at_exit=True)
        out.batched_calls += walked.batched_calls
        rank = {"certified": 0, "over_budget": 1, "exits": 2, "inconsistent": 3}
        length = (t1 - t0).cpu()
        for j, segment in enumerate(owner.cpu().tolist()):
            out.pieces[segment] += walked.pieces[j]
            if rank[walked.status[j]] > rank[out.status[segment]]:
                out.status[segment] = walked.status[j]
            if walked.status[j] == "exits":
                where = float(t0[j]) + float(length[j]) * float(walked.exit_t[j])
                if not where >= float(out.exit_t[segment]):  # NaN (none yet) or later
                    out.exit_t[segment] = where
            if float(walked.min_margin[j]) < float(out.min_margin[segment]):
                out.min_margin[segment] = walked.min_margin[j]
                out.worst_t[segment] = float(t0[j]) + float(length[j]) * float(walked.worst_t[j])
    for segment, t in enumerate(outside_t.tolist()):
        if math.isfinite(t) and math.isnan(float(out.exit_t[segment])):  # the walk stopped within rounding of that point
            out.exit_t[segment] = t
    return out