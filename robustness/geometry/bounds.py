"""Interval bounds: a lower bound of a piecewise-linear network's class margin over a whole
interval of a segment, from one forward.

Along a sub-interval ``x(s) = x0 + s (x1 - x0)``, s in [0, 1], of a segment, every hidden value is
bounded by two linear functions of s, kept as a centre ``c(s)`` and a radius ``r(s) >= 0`` given
by their values at both ends: the batch ``[c0; c1; r0; r1]`` (4 S rows for S intervals). Affine
layers map the centres at both ends exactly (an affine map of a linear function of s is linear)
and the radii through ``|A|``; a ReLU or max-pool whose state is fixed on the interval passes its
bounds on, and one that switches there is relaxed by chords (the maximum of linear functions is
convex, so the chord through its end values lies above it). The class margin's lower bound is
linear in s, so it is positive on the whole interval when it is at both ends.
:mod:`robustness.geometry.certify` halves the intervals these bounds do not prove and walks
(:mod:`robustness.geometry.walk`) those still undecided.

Two precisions of the same maths, chosen by ``outward`` (one ``if`` at each operation that rounds):

- **float64, rounding ignored** (``outward=False``, the default): the plain version. Its
  rounding is some 1e-15 of the logits' scale, so a margin within ``BOUND_RTOL`` of that scale is
  left undecided.
- **float32, rounded outwards** (``outward=True``), as neural-network verifiers do: every
  operation that rounds widens the radius by a bound of its rounding error, so the bounds hold
  for the network computed in exact arithmetic. A sum of ``n`` products (a convolution or matrix
  product, bias included) is off by at most ``gamma(n) * (|A| |c| + |b|)``, ``gamma(n) = n u /
  (1 - n u)``, ``u = 2**-24``, in any order of summation and with or without fused multiply-adds
  (Higham, *Accuracy and Stability of Numerical Algorithms*, section 3.1): that term joins the
  radius before it goes through ``|A|`` (``|A| (r + gamma |c|) + gamma |b|``, one product for both),
  and a sum of non-negative terms is scaled up by ``1 + 2 gamma`` to stay above its exact value.
  Where ends become centre and radius or back (a ReLU's or max-pool's relaxation), the radius
  grows by eight roundings of the values' size, more than those steps round. This holds for products computed as sums of products: oneDNN's direct
  convolutions and BLAS on the CPU. :class:`IntervalBounds` switches off what would break it
  (TF32 and reduced-precision float32 products, cuDNN's Winograd and FFT convolutions).

The float32 bounds cost about half as much per interval (8x8 or 28x28 images, one thread), but
the rounding they carry grows through every layer's ``|A|`` to some 1e-3 of the logits' scale,
so near the boundary they prove less: :func:`robustness.geometry.certify.certify_with_bounds`
bounds such intervals in float64 as well, and on the path search's segments the pair ends up no
faster than float64 alone, which is why float64 is the default (``make bench``'s ``bounds:``
rows measure both).

The plain logits at both ends (a forward of the walk's float64 model) are the guard: they must
lie inside their bounds, else the model computes something the bounds do not model, such as a
functional non-linearity inside a container.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from robustness.geometry.walk import CONSISTENCY_RTOL, SWITCHING_LEAVES

# A proved margin must clear this share of the logits' scale: the last step (the margins from the
# last layer's input bounds) is float64 in both precisions, whose rounding is some 1e-15 of it.
BOUND_RTOL = 1e-9
# float32's unit round-off, and an absolute floor for every widened radius: below it, the
# relative bounds would not cover an underflow to a subnormal number.
_UNIT = 2.0**-24
_FLOOR = 2.0**-100
# The midpoint's logits, computed in the bounds' precision, against the bounds there: a guard
# against gross errors (a hidden non-linearity), not rounding, so its tolerance is loose.
MIDPOINT_RTOL = 1e-4

# Leaves whose output is a positive linear map of their input without offset, exact in floating
# point: the radius goes through them as the centre does.
_EXACT_LEAVES: tuple[type[nn.Module], ...] = (nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout)
# Averages: positive linear maps without offset that round (a sum and a division).
_AVERAGES: tuple[type[nn.Module], ...] = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AvgPool1d, nn.AvgPool2d)


def _gamma(terms: int) -> float:
    """Higham's gamma_n for float32: the relative error bound of a sum of ``terms`` rounded operations."""
    return terms * _UNIT / (1.0 - terms * _UNIT)


def _up(value: Tensor, roundings: int) -> Tensor:
    """``value`` (non-negative, computed with at most ``roundings`` relative roundings of
    non-negative terms, each possibly down) scaled to lie above its exact value."""
    return value * (1.0 + 2.0 * _gamma(roundings + 1)) + _FLOOR


def _widened(centre: Tensor, radius: Tensor) -> Tensor:
    """``radius`` grown by ``(|centre| + radius) 2**-21``, eight float32 roundings of values that
    size, and by ``_FLOOR`` (what covers an underflow, and keeps radii off subnormal numbers, with
    which the next convolutions run some 50x slower on the CPU)."""
    return radius + (centre.abs() + radius) * 2.0**-21 + _FLOOR


def _ends(centre: Tensor, radius: Tensor, outward: bool) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds ``centre -+ radius``; rounded outwards, the radius is widened first
    by more than the two subtractions' rounding."""
    if outward:
        radius = _widened(centre, radius)
    return centre - radius, centre + radius


def _centre_radius(low: Tensor, high: Tensor, outward: bool) -> tuple[Tensor, Tensor]:
    """Centre and radius of [low, high]; rounded outwards, the radius is widened to reach both
    ends whatever the rounding of the centre and of the half-width."""
    centre, radius = (low + high) / 2, (high - low) / 2
    return centre, _widened(centre, radius) if outward else radius


class _AffineRule:
    """What the bounds need of an affine leaf ``x -> A x + b``: ``absolute(r) = |A| r``, and for
    its rounding, ``terms(x)`` (roundings per output, at most) and ``offset`` (per channel: what adds
    to ``|A| |x|`` in the size of the terms summed, ``|b|`` or a batch norm's ``|scale mean| + |bias|``)."""

    def __init__(self, absolute: Callable[[Tensor], Tensor], terms: int | Callable[[Tensor], int], offset: Tensor | None = None) -> None:
        self.absolute, self._terms, self.offset = absolute, terms, offset

    def terms(self, x: Tensor) -> int:
        return self._terms(x) if callable(self._terms) else self._terms


def _channel_view(values: Tensor, dims: int) -> Tensor:
    """A per-channel vector shaped to broadcast over (N, C, ...) batches of ``dims`` dimensions."""
    return values.reshape((1, -1) + (1,) * (dims - 2))


def _rounded_up(exact: Tensor, dtype: torch.dtype) -> Tensor:
    """Float64 ``exact`` in ``dtype``, rounded up where the cast rounded down."""
    cast = exact.to(dtype)
    return torch.where(cast.double() < exact, torch.nextafter(cast, torch.full_like(cast, math.inf)), cast)


def _affine_rule(module: nn.Module) -> _AffineRule | None:
    """The rule of an affine leaf, or None where it is unknown. Its factors are in the module's
    dtype, computed in float64 and rounded up."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.padding_mode == "zeros":
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[module.weight.dim() - 2]
        weight = module.weight.detach().abs()
        bias = None if module.bias is None else module.bias.detach().abs()
        # fan_in products and the bias, plus one for weights rounded to float32 from float64.
        terms = math.prod(module.weight.shape[1:]) + 2
        return _AffineRule(lambda r: conv(r, weight, None, module.stride, module.padding, module.dilation, module.groups), terms, bias)
    if isinstance(module, nn.Linear):
        weight = module.weight.detach().abs()
        return _AffineRule(lambda r: r @ weight.T, module.in_features + 2, None if module.bias is None else module.bias.detach().abs())
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not module.training and module.running_var is not None:
        # x -> (x - mean) / sqrt(var + eps) * weight + bias, which torch computes as a scale and a
        # shift, each a few roundings away from the exact ones: 16 roundings cover them with room.
        dtype = module.running_var.dtype
        scale = (module.running_var.detach().double() + module.eps).rsqrt()
        if module.weight is not None:
            scale = scale * module.weight.detach().double()
        shift = (scale * module.running_mean.detach().double()).abs()
        if module.bias is not None:
            shift = shift + module.bias.detach().double().abs()
        size = _rounded_up(scale.abs(), dtype)
        return _AffineRule(lambda r: r * _channel_view(size, r.dim()), 16, _rounded_up(shift, dtype))
    mean, std = getattr(module, "mean", None), getattr(module, "std", None)
    if torch.is_tensor(mean) and torch.is_tensor(std) and len(list(module.children())) == 0:  # the project's Normalize
        inverse = _rounded_up(1.0 / std.detach().double().abs(), std.dtype)
        shift = _rounded_up(mean.detach().double().abs() / std.detach().double().abs(), mean.dtype).flatten()
        return _AffineRule(lambda r: r * inverse, 4, shift)
    if isinstance(module, _AVERAGES):
        # Each output averages at most the whole input map: a sum of that many terms and a division.
        return _AffineRule(module.forward, lambda x: math.prod(x.shape[2:]) + 2)
    return None


def bound_problems(model: nn.Module) -> list[str]:
    """Leaves the interval bounds cannot propagate through (empty: bounds apply)."""
    problems = []
    for name, module in model.named_modules():
        if list(module.children()) or isinstance(module, SWITCHING_LEAVES + _EXACT_LEAVES):
            continue
        if _affine_rule(module) is None:
            problems.append(f"{name or '(the model)'}: no interval rule for {type(module).__name__}")
    return problems


def _fold_batch_norms(model: nn.Module) -> nn.Module:
    """``model`` (float64, eval mode) with each batch norm that follows a convolution in an
    ``nn.Sequential`` folded into that convolution, in place: the same affine map, and two fewer
    element-wise passes per layer for the bounds. Its rounding (float64's, then float32's for the
    folded weights) is within what ``_affine_rule`` allows a convolution's weights."""
    for module in model.modules():
        if not isinstance(module, nn.Sequential) or type(module).forward is not nn.Sequential.forward:
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and not norm.training and norm.running_var is not None:
                module._modules[first] = fuse_conv_bn_eval(conv, norm)
                module._modules[second] = nn.Identity()
    return model


def _runs_own_forward(model: nn.Module) -> bool:
    """Whether some container's own ``forward`` runs (a vouched one, such as a residual block):
    what it computes between its children (a sum, say) no hook sees."""
    return any(list(m.children()) and type(m).forward is not nn.Sequential.forward for m in model.modules())


class _BoundHooks:
    """Forward hooks that make a model propagate bounds instead of images: ``[c0; c1; r0; r1]``
    (4 S rows for S intervals), then, with ``midpoint``, the interval's midpoint (S rows more).

    Affine leaves compute the centres (and the midpoint) themselves; their hook adds the radii
    through ``|A|``. ReLUs and max-pools replace their output by their bounds' relaxation, and
    apply themselves to the midpoint.

    ``midpoint`` is for models where a container's own ``forward`` runs: a non-linearity hidden in
    it would act on the centres at both ends as on any image, so the bounds would still contain
    the logits there; at the midpoint they would not. There too (float32 only), each leaf widens
    what it receives by the rounding of one sum of two terms, the most a vouched container (a
    torchvision residual block) computes between two leaves."""

    def __init__(self, model: nn.Module, outward: bool, own_forward: bool) -> None:
        self.outward, self.midpoint = outward, own_forward
        self.unseen_sums = outward and own_forward
        self.rows = 0  # S, set before each forward
        self.final: tuple[nn.Linear, Tensor, Tensor, Tensor | None] | None = None  # the last Linear: (module, centres, radii, output)
        self._saved: list[Any] = []
        self.handles = []
        for module in model.modules():
            if list(module.children()) or isinstance(module, _EXACT_LEAVES):
                continue
            if isinstance(module, nn.ReLU):
                self.handles.append(module.register_forward_pre_hook(self._relu_in))
                self.handles.append(module.register_forward_hook(self._relu_out))
            elif isinstance(module, nn.MaxPool2d):
                self.handles.append(module.register_forward_pre_hook(self._pool_in))
                self.handles.append(module.register_forward_hook(self._pool_out))
            else:
                rule = _affine_rule(module)
                self.handles.append(module.register_forward_pre_hook(self._affine_in))
                self.handles.append(module.register_forward_hook(self._affine_out(rule)))

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()

    def received(self, parts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Centres (2 S rows), radii (2 S rows) and midpoints (S rows or none) of a leaf's input, the
        radii widened by one unseen sum's rounding where needed."""
        s = self.rows
        centre, radius, middle = parts[: 2 * s], parts[2 * s : 4 * s], parts[4 * s :]
        if self.unseen_sums:
            # fl(x + y) is within u |fl(x + y)| / (1 - u) of x + y; the radii's own sum rounds down by at most u.
            radius = _up(radius + 2 * _UNIT * centre.abs(), 3)
        return centre, radius, middle

    def _affine_in(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor]:
        centre, radius, middle = self.received(inputs[0])
        self._saved.append((centre, radius))
        if isinstance(module, nn.Linear):
            self.final = (module, centre, radius, None)
        return (torch.cat([centre, middle]),)

    def _affine_out(self, rule: _AffineRule) -> Any:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            centre, radius = self._saved.pop()
            if self.outward:
                # |A x - fl(A x)| <= gamma(n) (|A| |x| + |b|): added to the radius before |A|, in one product.
                terms = rule.terms(centre)
                gamma = _gamma(terms)
                spread = rule.absolute(radius + gamma * centre.abs())
                if rule.offset is not None:
                    spread = spread + gamma * _channel_view(rule.offset, spread.dim())
                radius = _up(spread, terms + 4)
            else:
                radius = rule.absolute(radius)
            s = self.rows
            out = torch.cat([output[: 2 * s], radius, output[2 * s :]])
            if self.final is not None and self.final[0] is module:
                self.final = (module, centre, self.final[2], out)
            return out

        return hook

    def _relu_in(self, module: nn.ReLU, inputs: tuple[Tensor, ...]) -> None:
        parts = self.received(inputs[0])
        # An in-place ReLU overwrites the bounds it relaxes: keep a copy.
        self._saved.append(tuple(part.clone() for part in parts) if module.inplace else parts)

    def _relu_out(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        centre, radius, middle = self._saved.pop()
        low, high = _ends(centre, radius, self.outward)
        l0, l1 = low.chunk(2)
        # Below by the lower bound itself or by 0, whichever is larger on average (both are below
        # max(0, x)); above by max(0, upper), the chord of a convex function where it switches.
        # An active unit keeps its bounds, a dead one gets 0.
        keep = (l0 + l1 > 0).repeat(2, *([1] * (l0.dim() - 1)))
        centre, radius = _centre_radius(torch.where(keep, low, 0.0), high.clamp(min=0), self.outward)
        return torch.cat([centre, radius, middle.clamp(min=0)])

    def _pool_in(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor]:
        self._saved.append(self.received(inputs[0]))
        return (inputs[0][:1],)  # the pool's own output is replaced: only its shape is read

    def _pool_out(self, module: nn.MaxPool2d, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        centre, radius, middle = self._saved.pop()
        low, high = _ends(centre, radius, self.outward)
        l0, l1 = low.chunk(2)
        pool = dict(kernel_size=module.kernel_size, stride=module.stride, padding=module.padding, dilation=module.dilation)
        # Below: the entry whose lower bound is highest on average, one linear function of s
        # (the maximum of the lower bounds is convex, so its chord would not stay below it).
        # Above: the chord of the largest upper bound. Where that entry wins the window on the
        # whole interval (its lower bound above every other entry's upper bound), the largest
        # upper bound is its own, so its bounds pass on as they are.
        _, best = F.max_pool2d(l0 + l1, return_indices=True, **pool)
        pick = best.flatten(2).repeat(2, 1, 1)
        best_low = low.flatten(2).gather(2, pick).view_as(best.repeat(2, 1, 1, 1))
        centre, radius = _centre_radius(best_low, F.max_pool2d(high, **pool), self.outward)
        middle = F.max_pool2d(middle, **pool) if self.midpoint else centre[:0]
        return torch.cat([centre, radius, middle])


@contextlib.contextmanager
def _products_as_sums() -> Iterator[None]:
    """Float32 products computed as sums of float32 products (the rounding the bounds assume):
    no TF32 or bfloat16 reduced precision, no cuDNN (whose Winograd and FFT convolutions round otherwise)."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.backends.cudnn.flags(enabled=False):
            yield
    finally:
        torch.set_float32_matmul_precision(precision)


class IntervalBounds:
    """The interval bounds of a copy of ``model`` (eval mode, no :func:`bound_problems`): float64
    with rounding ignored (``outward=False``, the plain version) or float32 rounded outwards
    (``outward=True``). Call it on intervals; :meth:`close` (or a ``with`` block) removes its hooks."""

    def __init__(self, model: nn.Module, *, outward: bool = False) -> None:
        self.outward = outward
        self.dtype = torch.float32 if outward else torch.float64
        self.model = _fold_batch_norms(copy.deepcopy(model).to(torch.float64).eval()).to(self.dtype)
        self.hooks = _BoundHooks(self.model, outward, _runs_own_forward(self.model))
        self._gaps: dict[int, Tensor] = {}  # per class c of the last layer, |W_c - W_j| for every j

    def close(self) -> None:
        self.hooks.close()

    def __enter__(self) -> IntervalBounds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self, x0: Tensor, x1: Tensor) -> Tensor:
        """The input bounds: the ends themselves (float32: rounded, with the rounding as radius),
        and the midpoints where the hooks carry them."""
        ends = torch.cat([x0, x1]).to(torch.float64)
        centre = ends.to(self.dtype)
        if self.outward:
            radius = _rounded_up((ends - centre.double()).abs(), self.dtype)
        else:
            radius = torch.zeros_like(ends)
        parts = [centre, radius]
        if self.hooks.midpoint:
            parts.append(((x0 + x1) / 2).to(self.dtype))
        return torch.cat(parts)

    @torch.no_grad()
    def __call__(self, x0: Tensor, x1: Tensor, label: Tensor, z0: Tensor, z1: Tensor) -> tuple[Tensor, Tensor]:
        """For each interval ``x0[i] + s (x1[i] - x0[i])``, s in [0, 1] (float64 ends): a lower
        bound of the class margin ``min_j z_c - z_j`` over the whole interval, and whether the
        bounds contain ``z0``, ``z1`` (the plain float64 logits at both ends; with a container's
        own forward, also the logits at the midpoint).

        The bound is positive only where it proves the margin (above ``BOUND_RTOL`` of the logits'
        scale), at most 0 where it does not, and NaN where the guard fails.
        """
        self.hooks.final, self.hooks.rows = None, len(x0)
        with _products_as_sums() if self.outward else contextlib.nullcontext():
            out = self.model(self._start(x0, x1))
        low, (l0, l1, u0, u1), middle = self._margin_bounds(out, label)
        scale = 1.0 + torch.maximum(z0.abs().amax(1), z1.abs().amax(1))
        slack = (CONSISTENCY_RTOL * scale)[:, None]
        inside = ((z0 >= l0 - slack) & (z0 <= u0 + slack) & (z1 >= l1 - slack) & (z1 <= u1 + slack)).all(1)
        if len(middle):
            slack = (MIDPOINT_RTOL * scale)[:, None]
            inside &= ((middle >= (l0 + l1) / 2 - slack) & (middle <= (u0 + u1) / 2 + slack)).all(1)
        proven = inside & (low > BOUND_RTOL * scale)
        low = torch.where(proven, low, torch.where(inside, low.clamp(max=0), torch.full_like(low, math.nan)))
        return low, inside

    def _margin_bounds(self, out: Tensor, label: Tensor) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
        """(S,) lower bounds of the class margin (float64), the logits' bounds at both ends, and
        the logits at the midpoints (none without them)."""
        n = len(label)
        centre, radius, middle = self.hooks.received(out)
        low, high = (v.double() for v in _ends(centre, radius, self.outward))
        (l0, l1), (u0, u1) = low.chunk(2), high.chunk(2)
        final = self.hooks.final
        if final is not None and final[3] is out:
            # The margins z_c - z_j are an affine map of the last layer's input: bound them as such,
            # not as the difference of two separately bounded logits; in float64, in both precisions.
            linear, h, r, _ = final
            weight = linear.weight.double()
            bias = linear.bias.double() if linear.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
            gaps = self._gaps.get(id(linear))
            if gaps is None:
                gaps = self._gaps[id(linear)] = (weight[:, None, :] - weight[None]).abs()  # (classes, classes, features)
            rows = torch.arange(n, device=label.device)
            ends = []
            for part in range(2):
                centre_logits = h[part * n : (part + 1) * n].double() @ weight.T + bias
                spread = torch.empty_like(centre_logits)
                radii = r[part * n : (part + 1) * n].double()
                for c in label.unique().tolist():
                    which = label == c
                    spread[which] = radii[which] @ gaps[c].T
                ends.append(centre_logits[rows, label][:, None] - centre_logits - spread)
            low0, low1 = ends
        else:
            rows = torch.arange(n, device=label.device)
            low0, low1 = l0[rows, label][:, None] - u0, l1[rows, label][:, None] - u1
        margin = torch.minimum(low0, low1).scatter(1, label[:, None], math.inf).amin(1)
        return margin, (l0, l1, u0, u1), middle.double()


def interval_margin_bounds(model: nn.Module, x0: Tensor, x1: Tensor, label: Tensor, *, outward: bool = False) -> tuple[Tensor, Tensor]:
    """For each interval ``x0[i] + s (x1[i] - x0[i])``, s in [0, 1]: a lower bound of the class
    margin over the whole interval (positive only where proven, NaN where the guard fails), and
    whether the bounds contain the plain float64 logits at both ends. ``model``: eval mode, no
    :func:`bound_problems`."""
    exact = copy.deepcopy(model).to(torch.float64).eval()
    x0, x1 = x0.detach().to(torch.float64), x1.detach().to(torch.float64)
    with torch.no_grad():
        z0, z1 = exact(torch.cat([x0, x1])).chunk(2)
    with IntervalBounds(model, outward=outward) as bounds:
        return bounds(x0, x1, label.to(x0.device), z0, z1)
