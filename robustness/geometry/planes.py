"""Two-dimensional slices of input space through one image, and what they show of the boundary.

A plane through ``x0`` is spanned by two orthonormal directions ``u`` and ``v``; the point with
plane coordinates ``(a, b)`` is ``x0 + a u + b v``, so coordinates are l2 distances in pixel
space. Grids are indexed ``labels[i, j]`` = class at ``(u_coords[i], v_coords[j])``: rows run along
``u`` (the direction towards the boundary), columns along ``v``.

Everything here is plain batched tensor code: no Lightning, no plotting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from robustness.errors import InputError
from robustness.tensors import predict

# Directions are orthogonalised in double precision so that <u, v> stays at float32 round-off.
_GS_DTYPE = torch.float64


def _check_model(model: nn.Module) -> None:
    if model.training:
        raise InputError(
            "the model is in training mode; grid labels would depend on the batch (batch-norm statistics, dropout)",
            "call model.eval() before classifying a plane",
        )


def _unit(vector: Tensor, what: str) -> Tensor:
    norm = vector.norm()
    if not torch.isfinite(norm) or float(norm) <= 1e-12:
        raise InputError(
            f"{what} has zero or non-finite length, so it defines no direction",
            "pick another sample or seed; for an attack direction, check that the attack moved the image",
        )
    return vector / norm


def gaussian_direction(shape: Sequence[int], seed: int) -> Tensor:
    """A standard Gaussian tensor of ``shape`` drawn on the CPU from ``seed``.

    Drawn on the CPU so that the same seed gives the same direction on every device.
    """
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32)


def image_seed(seed: int, index: int) -> int:
    """The direction seed of image ``index`` when a probe draws one plane per image.

    Derived from ``(seed, index)`` alone, so image ``index`` gets the same plane whatever other
    images a run measures, every model meets the same draw, and neighbouring seeds or indices
    give unrelated streams (unlike ``seed + index``).
    """
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


def orthonormalize(vectors: Sequence[Tensor]) -> list[Tensor]:
    """Gram-Schmidt on ``vectors`` in order: the k-th output is the k-th input minus its components
    along the earlier outputs, scaled to unit l2 norm. Shapes are kept; dtype and device follow the first input."""
    if not vectors:
        return []
    dtype, device = vectors[0].dtype, vectors[0].device
    basis: list[Tensor] = []
    for index, vector in enumerate(vectors):
        if vector.shape != vectors[0].shape:
            raise InputError(f"direction {index} has shape {tuple(vector.shape)}, expected {tuple(vectors[0].shape)}")
        flat = vector.detach().to(device=device, dtype=_GS_DTYPE).flatten()
        # Twice is enough (Kahan): one pass loses orthogonality when the vector is nearly in the span.
        for _ in range(2):
            for earlier in basis:
                flat = flat - (flat @ earlier) * earlier
        basis.append(_unit(flat, f"direction {index} after removing the earlier ones"))
    return [b.view(vectors[0].shape).to(dtype) for b in basis]


def direction_pair(shape: Sequence[int], seed: int, first: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Orthonormal ``(u, v)`` of ``shape``.

    With ``first`` given, ``u`` is ``first`` normalised and ``v`` is the seed's Gaussian draw made
    orthogonal to it: the same seed gives the same draw whatever ``first`` is, so every model's
    plane uses the same random direction up to its own ``u`` component. Without ``first`` both are
    random (two draws from the same seed).
    """
    shape = tuple(shape)
    if first is None:
        draws = gaussian_direction((2, *shape), seed)
        u, v = orthonormalize([draws[0], draws[1]])
        return u, v
    if tuple(first.shape) != shape:
        raise InputError(f"the first direction has shape {tuple(first.shape)}, expected {shape}")
    draw = gaussian_direction(shape, seed).to(device=first.device, dtype=first.dtype)
    u, v = orthonormalize([first, draw])
    return u, v


def plane_points(x0: Tensor, u: Tensor, v: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """The images ``x0 + a[k] u + b[k] v`` for paired coordinates ``a``, ``b`` of equal length.

    ``x0``, ``u``, ``v`` share one image shape (no batch dimension); the result is ``(len(a), *shape)``.
    """
    if not (x0.shape == u.shape == v.shape):
        raise InputError(f"x0, u and v must share one shape, got {tuple(x0.shape)}, {tuple(u.shape)}, {tuple(v.shape)}")
    if a.shape != b.shape or a.dim() != 1:
        raise InputError(f"coordinates must be two 1-D tensors of equal length, got {tuple(a.shape)} and {tuple(b.shape)}")
    basis = torch.stack([u.flatten(), v.flatten()]).to(x0.dtype)
    coords = torch.stack([a, b], dim=1).to(device=x0.device, dtype=x0.dtype)
    # One matrix product per chunk: cheaper than two broadcast multiply-adds over the image size.
    points = torch.addmm(x0.flatten().unsqueeze(0), coords, basis)
    return points.view(len(a), *x0.shape)


@torch.no_grad()
def classify_coords(
    model: nn.Module,
    x0: Tensor,
    u: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    *,
    batch_size: int = 256,
    clamp: bool = False,
) -> Tensor:
    """Predicted labels at ``x0 + a[k] u + b[k] v``, built and classified ``batch_size`` points at a time.

    Points are built chunk by chunk, so memory holds one batch of images however large the grid.
    ``clamp`` clips each point to [0, 1] before the forward pass (the plane is then folded onto the
    pixel box); without it points are evaluated as they are.
    """
    _check_model(model)
    if batch_size <= 0:
        raise InputError(f"batch_size must be positive, got {batch_size}", "set probe.batch_size to a positive integer")
    labels = torch.empty(len(a), dtype=torch.long, device=x0.device)
    for start in range(0, len(a), batch_size):
        stop = start + batch_size
        points = plane_points(x0, u, v, a[start:stop], b[start:stop])
        if clamp:
            points.clamp_(0.0, 1.0)
        labels[start:stop] = predict(model, points, batch_size=batch_size)
    return labels


def classify_plane(
    model: nn.Module,
    x0: Tensor,
    u: Tensor,
    v: Tensor,
    u_coords: Tensor,
    v_coords: Tensor,
    *,
    batch_size: int = 256,
    clamp: bool = False,
    until_exit_of: int | None = None,
) -> Tensor:
    """Labels on the grid ``u_coords`` x ``v_coords``: ``labels[i, j]`` is the class at
    ``x0 + u_coords[i] u + v_coords[j] v``.

    With ``until_exit_of`` a class, rows are classified from the first up only until every column
    holds a point outside that class; the rows above are -1. The points are sent in the very
    batches of the full grid (the flattened grid cut every ``batch_size`` points), so every
    classified row is the full grid's bit for bit, and what :func:`first_exit_rows` reads from
    row 0 (so :func:`boundary_along_u` too) is the same. Batches of another size would not do:
    a matrix product rounds differently with the batch's size, and a grid point within rounding
    of the boundary (the grid's rows and a smooth boundary meet exactly at some points) can then
    change its label.
    """
    rows, columns = len(u_coords), len(v_coords)
    a = u_coords.to(x0.device).repeat_interleave(columns)
    b = v_coords.to(x0.device).repeat(rows)
    if until_exit_of is None:
        return classify_coords(model, x0, u, v, a, b, batch_size=batch_size, clamp=clamp).view(rows, columns)
    labels = torch.full((rows * columns,), -1, dtype=torch.long, device=x0.device)
    left = torch.ones(columns, dtype=torch.bool, device=x0.device)  # columns still all inside so far
    step = batch_size * -(-columns // batch_size)  # whole batches, at least one row
    checked = 0  # rows whose points are all classified and counted in ``left``
    for start in range(0, len(a), step):
        stop = min(start + step, len(a))
        labels[start:stop] = classify_coords(model, x0, u, v, a[start:stop], b[start:stop], batch_size=batch_size, clamp=clamp)
        complete = stop // columns
        left &= (labels[checked * columns : complete * columns].view(-1, columns) == until_exit_of).all(dim=0)
        checked = complete
        if not bool(left.any()):
            labels[complete * columns :] = -1  # a row classified in part reads as not classified
            break
    return labels.view(rows, columns)


def origin_index(coords: Tensor) -> int:
    """Index of the grid coordinate closest to 0 (where the sample lies)."""
    return int(coords.abs().argmin())


def first_exit_rows(labels: Tensor, start_row: int, label: int) -> Tensor:
    """Per column, the first row above ``start_row`` whose label is not ``label``.

    Rows ``start_row`` .. result-1 of that column all carry ``label``. Columns that do not start in
    ``label`` at ``start_row``, or never leave it, get -1.
    """
    if labels.dim() != 2:
        raise InputError(f"labels must be a 2-D grid, got shape {tuple(labels.shape)}")
    if not 0 <= start_row < labels.shape[0]:
        raise InputError(f"start row {start_row} is outside a grid of {labels.shape[0]} rows")
    outside = labels[start_row:] != label
    exits = outside.any(dim=0) & ~outside[0]
    # argmax returns the first maximum, i.e. the first row outside the class.
    rows = start_row + outside.to(torch.uint8).argmax(dim=0)
    return torch.where(exits, rows, torch.full_like(rows, -1))


@torch.no_grad()
def refine_boundary(
    model: nn.Module,
    x0: Tensor,
    u: Tensor,
    v: Tensor,
    v_coords: Tensor,
    inside: Tensor,
    outside: Tensor,
    label: int,
    *,
    steps: int = 12,
    batch_size: int = 256,
    clamp: bool = False,
) -> Tensor:
    """Bisection along ``u`` for each column at once: ``inside[j]`` is classified ``label``, ``outside[j]``
    is not; after ``steps`` halvings the crossing is returned as the midpoint of the final bracket
    (error at most ``|outside - inside| / 2**(steps + 1)``)."""
    if steps < 0:
        raise InputError(f"bisection steps must be >= 0, got {steps}", "set probe.bisection_steps to 0 or more")
    lo = inside.to(device=x0.device, dtype=torch.float64).clone()
    hi = outside.to(device=x0.device, dtype=torch.float64).clone()
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        still_inside = classify_coords(model, x0, u, v, mid, v_coords.to(mid), batch_size=batch_size, clamp=clamp) == label
        lo = torch.where(still_inside, mid, lo)
        hi = torch.where(still_inside, hi, mid)
    return 0.5 * (lo + hi)


def boundary_along_u(
    model: nn.Module,
    x0: Tensor,
    u: Tensor,
    v: Tensor,
    labels: Tensor,
    u_coords: Tensor,
    v_coords: Tensor,
    label: int,
    *,
    bisection_steps: int = 12,
    batch_size: int = 256,
    clamp: bool = False,
) -> Tensor:
    """The boundary of ``label``'s region as a function of the ``v`` coordinate: for each grid column,
    the ``u`` coordinate where the column, walked upwards from the sample's row (``u = 0``), first
    leaves ``label``, refined by bisection between the last grid point inside and the first outside.

    Returns a float64 tensor of length ``len(v_coords)``; NaN where the column starts outside the
    class or never leaves it within the grid.
    """
    if labels.shape != (len(u_coords), len(v_coords)):
        raise InputError(f"labels have shape {tuple(labels.shape)}, expected {(len(u_coords), len(v_coords))}")
    if len(u_coords) > 1 and not bool((u_coords[1:] > u_coords[:-1]).all()):
        raise InputError("u coordinates must increase along the grid rows", "build them with torch.linspace(low, high, n)")
    rows = first_exit_rows(labels, origin_index(u_coords), label).to(u_coords.device)
    found = rows >= 0
    boundary = torch.full((len(v_coords),), float("nan"), dtype=torch.float64, device=x0.device)
    if not bool(found.any()):
        return boundary
    columns = found.nonzero().flatten()
    coords = u_coords.to(torch.float64)
    refined = refine_boundary(
        model, x0, u, v,
        v_coords[columns.to(v_coords.device)],
        coords[rows[found] - 1],
        coords[rows[found]],
        label,
        steps=bisection_steps,
        batch_size=batch_size,
        clamp=clamp,
    )
    boundary[columns.to(boundary.device)] = refined
    return boundary


def fit_quadratic(s: Tensor, t: Tensor) -> Tensor:
    """Least-squares ``(c0, c1, c2)`` of ``t(s) = c0 + c1 s + c2 s^2``, ignoring non-finite ``t``; float64."""
    s = s.detach().to(torch.float64).flatten().cpu()
    t = t.detach().to(torch.float64).flatten().cpu()
    if s.shape != t.shape:
        raise InputError(f"s and t must have equal length, got {len(s)} and {len(t)}")
    keep = torch.isfinite(s) & torch.isfinite(t)
    s, t = s[keep], t[keep]
    if len(s) < 3 or len(torch.unique(s)) < 3:
        raise InputError(
            f"a quadratic needs at least 3 distinct points, got {len(torch.unique(s))}",
            "widen the fit window or the grid so that more columns cross the boundary",
        )
    design = torch.stack([torch.ones_like(s), s, s * s], dim=1)
    return torch.linalg.lstsq(design, t.unsqueeze(1)).solution.flatten()


def quadratic_values(coeffs: Tensor, s: Tensor) -> Tensor:
    """``c0 + c1 s + c2 s^2``."""
    s = s.to(torch.float64)
    return coeffs[0] + coeffs[1] * s + coeffs[2] * s * s


def curvature_at_zero(coeffs: Tensor) -> float:
    """Signed curvature at ``s = 0`` of the curve ``t(s) = c0 + c1 s + c2 s^2``: ``2 c2 / (1 + c1^2)^(3/2)``.

    Positive when the boundary bends away from the sample (towards larger ``u``) on both sides.
    """
    c1, c2 = float(coeffs[1]), float(coeffs[2])
    return 2.0 * c2 / (1.0 + c1 * c1) ** 1.5


@dataclass(frozen=True)
class RegionStats:
    """What a labelled grid says about the classes around the sample.

    num_classes:   distinct classes on the grid
    area_fraction: share of grid points carrying ``label`` (the sample's class)
    class_counts:  grid points per class, indexed by class (length: largest label + 1)
    """

    num_classes: int
    area_fraction: float
    class_counts: Tensor


def region_statistics(labels: Tensor, label: int) -> RegionStats:
    """Class-region statistics of a labelled grid for the sample's class ``label``."""
    if labels.numel() == 0:
        raise InputError("the label grid is empty", "use a grid resolution of at least 1")
    flat = labels.flatten().to(torch.long).cpu()
    if int(flat.min()) < 0:
        raise InputError(f"labels must be class indices >= 0, got {int(flat.min())}")
    counts = torch.bincount(flat, minlength=int(label) + 1)
    return RegionStats(
        num_classes=int((counts > 0).sum()),
        area_fraction=float(counts[int(label)]) / flat.numel(),
        class_counts=counts,
    )
