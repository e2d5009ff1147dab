"""The exact walk: certify that a straight segment stays inside one class of a piecewise-linear
network by visiting every linear piece of the network along it.

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

Walking costs one forward per piece, and a segment between two digits crosses some two
thousand: :mod:`robustness.geometry.certify` walks only what the interval bounds of
:mod:`robustness.geometry.bounds` leave undecided.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Iterable

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
        windows = max_pool_windows(module, inputs[0], -math.inf)
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


def max_pool_windows(module: nn.MaxPool2d, x: Tensor, pad_value: float) -> Tensor:
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


def class_margins(z: Tensor, label: Tensor) -> Tensor:
    """(S, classes) z_c - z_j, with +inf for j = c so that a row's minimum is the class margin."""
    gap = z.gather(1, label[:, None]) - z
    return gap.scatter(1, label[:, None], math.inf)


def check_segments(model: nn.Module, a: Tensor, b: Tensor, label: Tensor) -> None:
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
    check_segments(model, a, b, label)
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

            start_gap = class_margins(z, y)
            start_margin = start_gap.amin(1)
            end_margin = class_margins(end_z, y).amin(1)
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

