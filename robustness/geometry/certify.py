"""Exact certification that a straight segment stays inside one class of a piecewise-linear network.

Two ways, one answer: :func:`certify_with_bounds` (what the path search uses) proves most of a
segment with interval bounds and walks only what they leave undecided, piece by piece, with
:func:`certify_segments`, which is described first.

Along ``x(t) = a + t (b - a)``, ``t`` in [0, 1], a network made of affine layers, ReLUs and
max-pools has logits that are piecewise linear in ``t``: they are linear as long as no ReLU
pre-activation changes sign and no max-pool window changes its winner. :func:`certify_segments`
walks those linear pieces from ``t = 0``: one forward-mode derivative (a jvp along ``b - a``,
computed by one doubled forward, see :class:`_PieceTracker`) at the start of a piece gives every
pre-activation ``p + s dp`` and every window entry ``e + s de`` as exact linear functions of the
step ``s``, so the next sign change or winner change is found in closed form, and the piece ends
there. Segments are walked in batches, one forward per piece for all segments still walking.

On a piece the class margin ``min_j z_c - z_j`` is a minimum of linear functions of ``s``, hence
concave, so its minimum over the piece is at one of the piece's ends: checking the margin at the
ends of every piece (the rival that is closest may switch inside a piece, but a concave function
cannot dip below both ends) proves that every point of the segment is classified ``c``. Where a
margin is not positive, the first point where it reaches zero is returned as ``exit_t``.

Soundness in floating point: the walk runs on a float64 copy of the model, and a unit whose
pre-activation is within rounding of zero takes the state it has just after ``t`` (a lookahead of
``LOOKAHEAD`` of the segment), so every piece is at least that long and the walk always moves
on. As a guard against a non-linearity the module walk cannot see (a functional ``tanh`` inside a
custom ``forward``), the logits extrapolated to a piece's end are compared with those evaluated at
the next piece's start (and, for the last piece, with those at ``b``); a mismatch makes the
segment "inconsistent", never certified.

:func:`piecewise_linear_problems` decides from the model's modules whether this applies: every
leaf must be an affine layer, a ReLU or a max-pool, and every container's ``forward`` must be
``nn.Sequential``'s or one the caller vouches for (``containers``): a custom ``forward`` could
apply functional non-linearities the walk cannot see.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustness.errors import ConfigError, InputError

# Affine leaves: their output is an affine function of their input (batch-norm in eval mode only).
AFFINE_LEAVES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.Dropout,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
)
# Where a winner is chosen: a ReLU picks between its input and 0, a max-pool between window entries.
SWITCHING_LEAVES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.MaxPool2d)

# A unit within rounding of its switch takes the state it has this far (in t) past the current point.
LOOKAHEAD = 1e-10
# Where the second half of the doubled batch probes the piece, as a fraction of the segment: a power
# of two keeps the division exact, and short of 1 so that the guard below can see a hidden curve
# on a one-piece segment (the logits at b are then not among the points evaluated).
PROBE = 0.5
# Extrapolated vs evaluated logits at a piece boundary: relative tolerance of the consistency guard.
CONSISTENCY_RTOL = 1e-6

STATUSES = ("certified", "exits", "over_budget", "inconsistent")


def piecewise_linear_problems(
    model: nn.Module, affine: Iterable[type[nn.Module]] = (), containers: Iterable[type[nn.Module]] = ()
) -> list[str]:
    """Why ``model`` cannot be certified exactly: one line per offending module; empty if it can.

    ``affine``: further leaf types whose output is affine in their input (the project's
    ``Normalize``); ``containers``: module types whose ``forward`` only calls their children,
    adds their outputs or reshapes them (torchvision's ResNet blocks).
    """
    affine_types = AFFINE_LEAVES + tuple(affine)
    container_types = tuple(containers)
    problems = []
    for name, module in model.named_modules():
        where = name or "(the model)"
        children = list(module.children())
        if isinstance(module, affine_types):
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None):
                problems.append(f"{where}: {type(module).__name__} uses batch statistics (training mode or no running stats)")
            elif isinstance(module, nn.Dropout) and module.training:
                problems.append(f"{where}: Dropout in training mode is random")
            continue
        if isinstance(module, SWITCHING_LEAVES):
            if isinstance(module, nn.MaxPool2d) and (module.ceil_mode or module.return_indices):
                problems.append(f"{where}: MaxPool2d with ceil_mode or return_indices is not supported")
            continue
        if children and (type(module).forward is nn.Sequential.forward or isinstance(module, container_types)):
            continue
        kind = "container with its own forward" if children else "layer"
        problems.append(f"{where}: {type(module).__name__} ({kind}) is not known to be piecewise linear")
    return problems


@dataclass
class SegmentCertificates:
    """The outcome of certifying S segments.

    status:      per segment, one of STATUSES: "certified" (every point in the class), "exits"
                 (some point is not), "over_budget" (more than max_pieces linear pieces: unknown),
                 "inconsistent" (the guard found a non-linearity the walk does not model: unknown)
    pieces:      (S,) linear pieces walked, i.e. forwards of that segment (with its direction)
    exit_t:      (S,) first t where the margin reaches zero for "exits", NaN otherwise
    min_margin:  (S,) smallest class margin over the piece ends walked (over the whole segment
                 when certified, or when walked with ``stop_at_exit=False``)
    worst_t:     (S,) where that smallest margin is: the point of the segment deepest outside the
                 class when the whole segment was walked
    batched_calls: forwards of the model (each over the segments still walking, doubled)
    breakpoints: per segment, the t where pieces start (after 0), when asked for
    """

    status: list[str]
    pieces: Tensor
    exit_t: Tensor
    min_margin: Tensor
    worst_t: Tensor
    batched_calls: int = 0
    breakpoints: list[list[float]] | None = field(default=None)
    bound_checks: Tensor | None = field(default=None)

    @property
    def certified(self) -> Tensor:
        return torch.tensor([s == "certified" for s in self.status], dtype=torch.bool)

    def outside_point(self, rows: Tensor, margin: Tensor, where: Tensor, first_outside: Tensor) -> None:
        """Note the points ``where`` of segments ``rows`` with class margin ``margin`` (CPU tensors):
        the smallest margin and its t, and (``first_outside``) the first t with a margin <= 0."""
        for row, m, t in zip(rows.tolist(), margin.tolist(), where.tolist()):
            if m < float(self.min_margin[row]):
                self.min_margin[row], self.worst_t[row] = m, t
            if m <= 0 and t < float(first_outside[row]):
                first_outside[row] = t

    @classmethod
    def empty(cls, n: int, record_breakpoints: bool) -> "SegmentCertificates":
        nan = torch.full((n,), math.nan, dtype=torch.float64)
        breakpoints = [[] for _ in range(n)] if record_breakpoints else None
        return cls([""] * n, torch.zeros(n, dtype=torch.long), nan, torch.full((n,), math.inf, dtype=torch.float64), nan.clone(), 0, breakpoints)


class _PieceTracker:
    """Forward hooks that fix each ReLU's and max-pool's state for the current piece and record,
    per segment, the step to the first state change.

    The model runs on a doubled batch ``[x(t); x(t) + PROBE (b - a)]``. Both halves go through
    every ReLU and max-pool in the state the first half chooses, so the network is one affine map
    ``g`` for the whole batch, and (second half - first half) / PROBE is ``J (b - a)``: the exact
    forward-mode derivative of the piece along the segment, at every layer. (The same
    numbers as a jvp, at the cost of one plain forward of twice the batch; torch's forward-mode
    AD runs batch-norm and broadcasting through slow decompositions, about 7x slower here.)
    """

    def __init__(self, model: nn.Module, lookahead: float) -> None:
        self.lookahead = lookahead
        self.next_step: Tensor | None = None
        self.handles = []
        for module in model.modules():
            if isinstance(module, nn.ReLU):
                # An in-place ReLU overwrites its input, so it is read before the module runs.
                self.handles.append(module.register_forward_pre_hook(self._remember))
                self.handles.append(module.register_forward_hook(self._relu))
            elif isinstance(module, nn.MaxPool2d):
                self.handles.append(module.register_forward_hook(self._maxpool))
        self._pending: list[Tensor] = []

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def start(self, n: int, like: Tensor) -> None:
        self.next_step = torch.full((n,), math.inf, dtype=like.dtype, device=like.device)

    def _note(self, steps: Tensor) -> None:
        self.next_step = torch.minimum(self.next_step, steps.flatten(1).amin(1))

    def _remember(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        self._pending.append(inputs[0].clone())

    def _relu(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        both = self._pending.pop()
        p, ahead = both.chunk(2)
        dp = (ahead - p) / PROBE
        active = p + self.lookahead * dp > 0
        # The next switch: an active unit falling to zero, or an inactive one rising to it.
        switching = torch.where(active, dp < 0, dp > 0)
        steps = torch.where(switching, -p / torch.where(switching, dp, torch.ones_like(dp)), torch.full_like(p, math.inf))
        self._note(steps)
        # The piece's own linear function, also at its start (where p may be a rounding off zero).
        return both * active.repeat((2,) + (1,) * (p.dim() - 1)).to(p.dtype)

    def _maxpool(self, module: nn.MaxPool2d, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        windows = _windows(module, inputs[0], -math.inf)
        e, ahead = windows.chunk(2)
        de = torch.where(torch.isfinite(e), (ahead - e) / PROBE, torch.zeros_like(e))  # padding entries never move
        winner = (e + self.lookahead * de).argmax(2, keepdim=True)
        e_k, de_k = e.gather(2, winner), de.gather(2, winner)
        rate = de - de_k  # how fast each entry gains on the winner
        gaining = rate > 0
        steps = torch.where(gaining, (e_k - e) / torch.where(gaining, rate, torch.ones_like(rate)), torch.full_like(e, math.inf))
        self._note(steps)
        return windows.gather(2, torch.cat([winner, winner])).reshape(output.shape)


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _windows(module: nn.MaxPool2d, x: Tensor, pad_value: float) -> Tensor:
    """(N, C, kernel entries, output positions) of a max-pool's windows over ``x``."""
    padding = _pair(module.padding)
    x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]), value=pad_value) if any(padding) else x
    kernel, dilation = _pair(module.kernel_size), _pair(module.dilation)
    stride = _pair(module.stride if module.stride is not None else module.kernel_size)
    n, c = x.shape[:2]
    if dilation == (1, 1):
        # A strided view, copied once: several times faster than F.unfold's one-channel im2col.
        patches = x.unfold(2, kernel[0], stride[0]).unfold(3, kernel[1], stride[1])  # (N, C, oh, ow, kh, kw)
        return patches.permute(0, 1, 4, 5, 2, 3).reshape(n, c, kernel[0] * kernel[1], -1)
    cols = F.unfold(x.reshape(n * c, 1, *x.shape[2:]), kernel, dilation=dilation, stride=stride)
    return cols.view(n, c, cols.shape[1], cols.shape[2])


def _mismatch(z: Tensor, reference: Tensor) -> Tensor:
    return (z - reference).abs().amax(1) > CONSISTENCY_RTOL * (1.0 + reference.abs().amax(1))


def _margins(z: Tensor, label: Tensor) -> Tensor:
    """(S, classes) z_c - z_j, with +inf for j = c so that a row's minimum is the class margin."""
    gap = z.gather(1, label[:, None]) - z
    return gap.scatter(1, label[:, None], math.inf)


def _check_segments(model: nn.Module, a: Tensor, b: Tensor, label: Tensor) -> None:
    if model.training:
        raise InputError("the model is in training mode; certification needs its eval-mode function", "call model.eval() first")
    if a.shape != b.shape or a.dim() < 2 or not torch.is_tensor(label) or label.shape != (len(a),):
        raise InputError(f"segments need matching (S, ...) start and end images and S labels, got {tuple(a.shape)}, {tuple(b.shape)}, {tuple(label.shape)}")


def certify_segments(
    model: nn.Module,
    a: Tensor,
    b: Tensor,
    label: Tensor,
    *,
    max_pieces: int | Tensor = 10_000,
    batch_size: int = 256,
    dtype: torch.dtype = torch.float64,
    affine: Iterable[type[nn.Module]] = (),
    containers: Iterable[type[nn.Module]] = (),
    stop_at_exit: bool = True,
    record_breakpoints: bool = False,
) -> SegmentCertificates:
    """Certify for every segment ``i`` that all of ``a[i] + t (b[i] - a[i])``, t in [0, 1], is class ``label[i]``.

    Segments are walked together, ``batch_size`` at a time, each jvp forward covering the
    segments of the batch still walking. ``max_pieces`` caps the pieces of one segment (one number
    for all, or one per segment): a segment that needs more is "over_budget" (or "exits" if an
    exit was already found). With
    ``stop_at_exit`` False, a segment that exits is walked to its end anyway, so that ``worst_t``
    is the point deepest outside the class. The model must be in eval mode and pass
    :func:`piecewise_linear_problems` (``affine``/``containers`` as there).
    """
    problems = piecewise_linear_problems(model, affine, containers)
    if problems:
        raise InputError(
            "the model is not piecewise linear, so segments cannot be certified exactly: " + "; ".join(problems[:3]),
            "check segments by sampling instead (probe.certify=false), or use ReLU/max-pool/affine layers",
        )
    _check_segments(model, a, b, label)
    budget = torch.as_tensor(max_pieces, dtype=torch.long).flatten().cpu()
    if budget.numel() == 1:
        budget = budget.expand(len(a))
    if budget.shape != (len(a),) or bool((budget < 1).any()) or batch_size < 1:
        raise ConfigError(
            f"max_pieces must be one number or one per segment, all >= 1, and batch_size >= 1; got {max_pieces} for {len(a)} segments and {batch_size}",
            "set probe.max_pieces, e.g. 10000",
        )

    exact = copy.deepcopy(model).to(dtype).eval()
    tracker = _PieceTracker(exact, LOOKAHEAD)
    out = SegmentCertificates.empty(len(a), record_breakpoints)
    try:
        for first in range(0, len(a), batch_size):
            index = torch.arange(first, min(first + batch_size, len(a)))
            out.batched_calls += _walk_batch(exact, tracker, a[index], b[index], label[index].to(a.device), index, budget, stop_at_exit, out)
    finally:
        tracker.close()
    return out


@dataclass(frozen=True)
class Certifier:
    """Segment certification with its settings bound, as the path search calls it: interval
    bounds first (:func:`certify_with_bounds`), the exact walk for what they leave undecided;
    ``bisect_depth=None`` walks every segment piece by piece (:func:`certify_segments`)."""

    max_pieces: int = 10_000
    batch_size: int = 256
    affine: tuple[type[nn.Module], ...] = ()
    containers: tuple[type[nn.Module], ...] = ()
    bisect_depth: int | None = 10

    def problems(self, model: nn.Module) -> list[str]:
        return piecewise_linear_problems(model, self.affine, self.containers)

    def __call__(self, model: nn.Module, a: Tensor, b: Tensor, label: Tensor, stop_at_exit: bool = True) -> SegmentCertificates:
        options = dict(max_pieces=self.max_pieces, batch_size=self.batch_size, affine=self.affine, containers=self.containers, stop_at_exit=stop_at_exit)
        if self.bisect_depth is None:
            return certify_segments(model, a, b, label, **options)
        return certify_with_bounds(model, a, b, label, bisect_depth=self.bisect_depth, **options)


def _walk_batch(
    model: nn.Module,
    tracker: _PieceTracker,
    a: Tensor,
    b: Tensor,
    label: Tensor,
    index: Tensor,
    max_pieces: Tensor,
    stop_at_exit: bool,
    out: SegmentCertificates,
) -> int:
    """Walk the pieces of one batch of segments, writing rows ``index`` of ``out`` (``max_pieces``:
    every segment's budget, indexed like ``out``); returns the forwards run."""
    dtype = next((p.dtype for p in model.parameters()), torch.float64)
    a, b = a.detach().to(dtype), b.detach().to(dtype)
    direction = b - a
    m = len(a)
    view = (-1,) + (1,) * (a.dim() - 1)
    t = torch.zeros(m, dtype=dtype, device=a.device)
    exited = torch.zeros(m, dtype=torch.bool, device=a.device)
    walking = torch.arange(m, device=a.device)
    expected: Tensor | None = None  # logits the previous piece predicts at the current t
    with torch.no_grad():
        tracker.start(m, a)
        # The logits at the far end, against which the last piece's extrapolation is checked.
        at_end = model(torch.cat([b, b]))[:m]
        calls = 1
        while len(walking):
            x = a[walking] + t[walking].view(view) * direction[walking]
            tracker.start(len(walking), t)
            z, ahead = model(torch.cat([x, x + PROBE * direction[walking]])).chunk(2)
            dz = (ahead - z) / PROBE
            calls += 1
            rows = index[walking.cpu()]
            out.pieces[rows] += 1
            y = label[walking]
            now = t[walking]
            remaining = 1.0 - now
            step = torch.minimum(tracker.next_step, remaining)
            finished = step >= remaining
            end_z = z + step[:, None] * dz

            start_gap = _margins(z, y)
            start_margin = start_gap.amin(1)
            end_margin = _margins(end_z, y).amin(1)
            for margin, where in ((start_margin, now), (end_margin, now + step)):
                lower = margin.double().cpu() < out.min_margin[rows]
                out.min_margin[rows[lower]] = margin.double().cpu()[lower]
                out.worst_t[rows[lower]] = where.double().cpu()[lower]

            # At a piece's start the previous piece's extrapolation must agree with the forward;
            # at the segment's end the last piece's must agree with the logits at b.
            inconsistent = finished & _mismatch(end_z, at_end[walking])
            if expected is not None:
                inconsistent |= _mismatch(z, expected)
            first_exit = ~exited[walking] & ((start_margin <= 0) | (end_margin <= 0))
            if first_exit.any():
                rate = dz.gather(1, y[:, None]) - dz  # d/ds of each z_c - z_j
                # First zero of the concave margin on this piece: the earliest rival to catch up.
                catching = rate < 0
                zero_at = torch.where(catching, start_gap / torch.where(catching, -rate, torch.ones_like(rate)), torch.full_like(rate, math.inf))
                zero_at = torch.where(start_gap <= 0, torch.zeros_like(zero_at), zero_at).amin(1)
                hit = first_exit.nonzero().flatten()
                out.exit_t[rows[hit.cpu()]] = (now[hit] + torch.minimum(zero_at[hit], step[hit])).double().cpu()
                exited[walking[hit]] = True
            has_exit = exited[walking]
            over = ~finished & (out.pieces[rows] >= max_pieces[rows]).to(a.device)
            done = inconsistent | finished | over | (has_exit & stop_at_exit)
            for j in done.nonzero().flatten().tolist():
                row = int(rows[j])
                out.status[row] = "inconsistent" if inconsistent[j] else "exits" if has_exit[j] else "certified" if finished[j] else "over_budget"

            t[walking] = now + step
            keep = ~done
            if out.breakpoints is not None:
                for row, value in zip(rows[keep.cpu()].tolist(), t[walking[keep]].tolist()):
                    out.breakpoints[row].append(value)
            expected = end_z[keep]
            walking = walking[keep]
    return calls


# ---- interval bounds along a segment ------------------------------------------------------------
#
# Walking every linear piece costs one forward per piece, and a segment between two digits crosses
# some two thousand. Most of a segment lies far inside its class, where a cheap over-approximation
# already proves it: every hidden value along a sub-interval [t0, t1] of the segment is bounded
# by two linear functions of s in [0, 1] (t = t0 + s (t1 - t0)), kept as a centre c(s) and a
# radius r(s) >= 0, each as (slope, intercept). Affine layers map the centre exactly and the
# radius through |W|; a ReLU or max-pool whose state is fixed on the interval passes its bounds
# on, and one that switches there is relaxed by chords (the maximum of linear functions is convex,
# so the chord through its end values lies above it). The class margin's lower bound is linear in
# s, so it is positive on the whole interval when it is at both ends. Intervals that are not
# proved are halved; those still undecided at ``bisect_depth`` are walked exactly, piece by piece.

# Leaves whose radius passes through unchanged: linear, positive and without offset.
_POSITIVE_LINEAR_LEAVES: tuple[type[nn.Module], ...] = (
    nn.Flatten, nn.Unflatten, nn.Identity, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.Dropout,
)


def _abs_linear(module: nn.Module) -> Any:
    """The map ``r -> |A| r`` of an affine leaf ``x -> A x + b``, or None where it is unknown."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.padding_mode == "zeros":
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[module.weight.dim() - 2]
        weight = module.weight.abs()
        return lambda r: conv(r, weight, None, module.stride, module.padding, module.dilation, module.groups)
    if isinstance(module, nn.Linear):
        weight = module.weight.abs()
        return lambda r: r @ weight.T
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not module.training and module.running_var is not None:
        scale = (module.running_var + module.eps).rsqrt()
        if module.weight is not None:
            scale = scale * module.weight
        scale = scale.abs()
        return lambda r: r * scale.view((1, -1) + (1,) * (r.dim() - 2))
    mean, std = getattr(module, "mean", None), getattr(module, "std", None)
    if torch.is_tensor(mean) and torch.is_tensor(std) and len(list(module.children())) == 0:  # the project's Normalize
        inverse = 1.0 / std.abs()
        return lambda r: r * inverse
    return None


def bound_problems(model: nn.Module) -> list[str]:
    """Leaves the interval bounds cannot propagate through (empty: bounds apply)."""
    problems = []
    for name, module in model.named_modules():
        if list(module.children()) or isinstance(module, SWITCHING_LEAVES + _POSITIVE_LINEAR_LEAVES):
            continue
        if _abs_linear(module) is None:
            problems.append(f"{name or '(the model)'}: no interval rule for {type(module).__name__}")
    return problems


def _ends(parts: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(lower at s=0, lower at s=1, upper at s=0, upper at s=1) of a ``[cw; cb; rw; rb]`` batch."""
    cw, cb, rw, rb = parts.chunk(4)
    return cb - rb, cb + cw - rb - rw, cb + rb, cb + cw + rb + rw


def _parts(l0: Tensor, l1: Tensor, u0: Tensor, u1: Tensor) -> Tensor:
    """The ``[cw; cb; rw; rb]`` batch of bounds given by their end values."""
    c0, c1, r0, r1 = (l0 + u0) / 2, (l1 + u1) / 2, (u0 - l0) / 2, (u1 - l1) / 2
    return torch.cat([c1 - c0, c0, r1 - r0, r0])


class _BoundTracker:
    """Forward hooks that make the model propagate ``[cw; cb; rw; rb]`` bounds (4 S rows) instead
    of images. Affine leaves see only the centres (and one zero image, whose output is the
    offset to take off the slopes); their hook adds the radii through ``|A|``."""

    def __init__(self, model: nn.Module) -> None:
        self.handles = []
        self.final: tuple[nn.Linear, Tensor, Tensor] | None = None  # the last Linear: (module, input bounds, output)
        self._radii: list[Tensor] = []
        self._pending: list[Tensor] = []
        self.enabled = True  # off: the model computes its plain function
        for module in model.modules():
            if list(module.children()):
                continue
            if isinstance(module, nn.ReLU):
                self.handles.append(module.register_forward_pre_hook(self._relu_in))
                self.handles.append(module.register_forward_hook(self._relu_out))
            elif isinstance(module, nn.MaxPool2d):
                self.handles.append(module.register_forward_hook(self._pool_out))
            elif not isinstance(module, _POSITIVE_LINEAR_LEAVES):
                absolute = _abs_linear(module)
                self.handles.append(module.register_forward_pre_hook(self._affine_in))
                self.handles.append(module.register_forward_hook(self._make_affine_out(absolute)))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _affine_in(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor] | None:
        if not self.enabled:
            return None
        parts = inputs[0]
        s = len(parts) // 4
        self._radii.append(parts[2 * s :])
        if isinstance(module, nn.Linear):
            self.final = (module, parts, parts)
        return (torch.cat([parts[: 2 * s], torch.zeros_like(parts[:1])]),)

    def _make_affine_out(self, absolute: Any) -> Any:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            if not self.enabled:
                return None
            radii = self._radii.pop()
            s = len(radii) // 2
            out = torch.cat([output[:s] - output[2 * s :], output[s : 2 * s], absolute(radii)])
            if isinstance(module, nn.Linear) and self.final is not None and self.final[0] is module:
                self.final = (module, self.final[1], out)
            return out

        return hook

    def _relu_in(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        if self.enabled:
            self._pending.append(inputs[0].clone())  # an in-place ReLU overwrites the bounds it relaxes

    def _relu_out(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
        if not self.enabled:
            return None
        l0, l1, u0, u1 = _ends(self._pending.pop())
        zero = torch.zeros_like(l0)
        active = torch.minimum(l0, l1) >= 0
        dead = torch.maximum(u0, u1) <= 0
        # Switching on the interval: above by the chord of max(0, upper); below by the lower bound
        # itself or by 0, whichever is larger on average (both are below max(0, x)).
        take_lower = active | ((l0 + l1) > 0)
        new = (
            torch.where(take_lower, l0, zero), torch.where(take_lower, l1, zero),
            torch.where(active, u0, u0.clamp(min=0)), torch.where(active, u1, u1.clamp(min=0)),
        )
        return _parts(*(torch.where(dead, zero, v) for v in new))

    def _pool_out(self, module: nn.MaxPool2d, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
        if not self.enabled:
            return None
        return _pool_bounds(module, inputs[0], output.shape[2:])


def _pool_bounds(module: nn.MaxPool2d, parts: Tensor, shape: Any) -> Tensor:
    ends = [_windows(module, v, -math.inf) for v in _ends(parts)]
    l0, l1, u0, u1 = ends
    best = (l0 + l1).argmax(2, keepdim=True)  # the entry with the highest lower bound bounds the max from below
    lk0, lk1, uk0, uk1 = (v.gather(2, best) for v in ends)
    others0 = u0.scatter(2, best, -math.inf).amax(2, keepdim=True)
    others1 = u1.scatter(2, best, -math.inf).amax(2, keepdim=True)
    wins = (lk0 >= others0) & (lk1 >= others1)  # that entry is the max on the whole interval
    up0 = torch.where(wins, uk0, u0.amax(2, keepdim=True))
    up1 = torch.where(wins, uk1, u1.amax(2, keepdim=True))
    n, c = parts.shape[0] // 4, parts.shape[1]
    return _parts(*(v.reshape(n, c, *shape) for v in (lk0, lk1, up0, up1)))


# A proved margin must clear this share of the logits' scale: the bounds are float64 sums whose
# rounding is some 1e-15 of it, so a margin this close to zero is left to the exact walk.
BOUND_RTOL = 1e-9
# What one bounded interval costs against ``max_pieces``, in walked pieces: its forward carries the
# centres, the radii and the two ends (six rows against the walk's two), in the walk's float64.
BOUND_CHECK_COST = 3


def interval_margin_bounds(model: nn.Module, x0: Tensor, x1: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
    """For each interval ``x0[i] + s (x1[i] - x0[i])``, s in [0, 1]: a lower bound of the class
    margin ``min_j z_c - z_j`` over the whole interval, and whether the bounds contain the logits
    a plain forward gives at both ends (False: the model computes something the bounds do not
    model, such as a functional non-linearity inside a container). ``model``: float64, eval mode,
    no :func:`bound_problems`."""
    tracker = _BoundTracker(model)
    try:
        with torch.no_grad():
            return _margin_lower_bounds(model, tracker, x0, x1 - x0, label)[:2]
    finally:
        tracker.close()


def _plain_logits(model: nn.Module, tracker: _BoundTracker, x: Tensor) -> Tensor:
    """The model's own logits at ``x``, with the bound hooks off."""
    tracker.enabled = False
    try:
        return model(x)
    finally:
        tracker.enabled = True


def _margin_lower_bounds(
    model: nn.Module, tracker: _BoundTracker, x0: Tensor, slope: Tensor, label: Tensor, ends: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Margin lower bounds, the guard, and the class margins at both ends (see
    :func:`interval_margin_bounds`). ``ends``: the plain logits at both ends, when known already."""
    zeros = torch.zeros_like(x0)
    tracker.final = None
    out = model(torch.cat([slope, x0, zeros, zeros]))
    n = len(x0)
    rows = torch.arange(n, device=x0.device)
    l0, l1, u0, u1 = _ends(out)
    if tracker.final is not None and tracker.final[2] is out:
        # The margins z_c - z_j are an affine map of the last layer's input: bound them as such,
        # not as the difference of two separately bounded logits.
        linear, h, _ = tracker.final
        weight = linear.weight
        bias = linear.bias if linear.bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        gap = weight[label][:, None, :] - weight[None]  # (S, classes, features)
        hw, hb, rw, rb = h.chunk(4)
        centre_w = torch.einsum("skf,sf->sk", gap, hw)
        centre_b = torch.einsum("skf,sf->sk", gap, hb) + (bias[label][:, None] - bias[None])
        spread = gap.abs()
        radius_w, radius_b = torch.einsum("skf,sf->sk", spread, rw), torch.einsum("skf,sf->sk", spread, rb)
        low0, low1 = centre_b - radius_b, centre_b + centre_w - radius_b - radius_w
    else:
        low0, low1 = l0[rows, label][:, None] - u0, l1[rows, label][:, None] - u1
    low = torch.minimum(low0, low1).scatter(1, label[:, None], math.inf).amin(1)
    # The guard: the plain function at both ends must lie within its bounds (to rounding).
    z0, z1 = ends if ends is not None else _plain_logits(model, tracker, torch.cat([x0, x0 + slope])).chunk(2)
    scale = 1.0 + torch.maximum(z0.abs().amax(1), z1.abs().amax(1))
    slack = (CONSISTENCY_RTOL * scale)[:, None]
    inside = ((z0 >= l0 - slack) & (z0 <= u0 + slack) & (z1 >= l1 - slack) & (z1 <= u1 + slack)).all(1)
    proven = inside & (low > BOUND_RTOL * scale)
    low = torch.where(proven, low, torch.where(inside, low.clamp(max=0), torch.full_like(low, math.nan)))
    return low, inside, _margins(z0, label).amin(1), _margins(z1, label).amin(1)


def certify_with_bounds(
    model: nn.Module,
    a: Tensor,
    b: Tensor,
    label: Tensor,
    *,
    bisect_depth: int = 10,
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

    ``pieces`` counts the pieces walked, ``bound_checks`` the intervals bounded (each about one
    forward of six times the batch). ``min_margin`` of a certified segment is a lower bound of its
    smallest margin (the proven bounds), exact where the walk ran.
    """
    affine, containers = tuple(affine), tuple(containers)
    problems = piecewise_linear_problems(model, affine, containers)
    if problems:  # the walk explains it
        return certify_segments(model, a, b, label, max_pieces=max_pieces, batch_size=batch_size, affine=affine, containers=containers)
    _check_segments(model, a, b, label)
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
    tracker = _BoundTracker(exact)

    def plain_at(who: Tensor, t: Tensor) -> Tensor:
        """The plain logits at ``a + t (b - a)`` of segments ``who``, in batches."""
        logits = []
        for i in range(0, len(who), batch_size):
            rows = who[i : i + batch_size]
            logits.append(_plain_logits(exact, tracker, a64[rows] + t[i : i + batch_size].view(view) * direction[rows]))
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
                    slope = (t1[part] - t0[part]).view(view) * direction[who]
                    low, consistent, m0, m1 = (
                        v.cpu() for v in _margin_lower_bounds(exact, tracker, x0, slope, label[who], (z_start[part], z_end[part]))
                    )
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
        tracker.close()

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
