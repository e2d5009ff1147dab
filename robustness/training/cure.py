"""CURE: curvature regularisation (report section 2.1.2, after Moosavi-Dezfooli et al. 2019).

Cross-entropy plus ``lam`` times the finite-difference curvature penalty

    L_r(x) = || grad l(x + h z) - grad l(x) ||^2,    z = sign grad l(x) / || sign grad l(x) ||,

with ``l`` the per-example cross-entropy and every gradient taken w.r.t. the [0, 1] input pixels.
``squared=False`` uses the plain norm instead, as the public CURE code does.

The floor of an exact (double-backprop) step, fraction 1, counted in passes over the batch:

* forwards: 2, at ``x`` (shared with the cross-entropy) and at ``x + h z``; 3 when the training
  forward is another function (``bn_mode='running'`` with batch-norm or dropout);
* input-gradient backwards, keeping their graphs: 2;
* one backward of the total, made of 2 second-order backwards (one through each input-gradient
  graph) and 2 first-order backwards through the forward graphs (3 with a separate training
  forward); a plain step is 1 forward and 1 first-order backward.

Per convolution or linear layer that is 1 + 1 + 2 + 2 = 6 matrix products per point (forward,
input gradient, the second-order backward's gradients of the incoming gradient and of the
weight, the forward graph's input and weight gradients), 12 a step (15 with a separate training
forward), against 3 for a plain step and 18 for the public code's structure (a separate
forward/backward for ``z`` and a recomputed forward at ``x``): at least 4x (5x) a plain step and
0.67x (0.83x) that structure's. ``robustness.bench.cure`` measures each part against this.

The count leaves out what the measured ratios also contain. Passes that are not products
(batch-norm, ReLU masks, pooling) run once forward and once backward per layer in a plain step,
here once forward and three times backward (input gradient, second-order, first-order) per layer
and point. Each kernel call has a fixed cost (smallcnn: 30 convolution calls a step against 6).
And products of one count cost unequally: torch's second-order convolution backward takes its
weight gradient as a convolution of transposed tensors with stride and dilation swapped, which
on a CPU makes it 5-15% dearer over resnet18's layers than a forward plus a weight-gradient
kernel (and no dearer on smallcnn's 8x8 images). On a CPU the measured step lands a few per
cent above 4x a plain step (``robustness.bench.cure``). A custom convolution double backward
could take the cheaper kernels, but a custom autograd function does not learn (short of a
private engine query) whether its weight gradient is wanted in a ``create_graph`` pass, as
torch's own node does, and would compute one weight gradient too many per layer in each
input-gradient pass.

Memory, counted in activation-sized tensors that the backward of the total needs (its peak is at
its start, when all of them are alive): a plain step keeps 2 per convolution/batch-norm/ReLU
layer (the batch-norm's input and the ReLU's output, which is also the next convolution's
input); this step keeps those 2 and the batch-norm's input gradient ``dx`` (the convolution's
second-order backward needs it) per layer and point, 6 in all, 3x a plain step. Batch-norm's
closed form below needs no more (it recovers what it needs of its incoming gradient from
``dx``); torch's generic one also keeps the incoming gradient, 4x.

The step reaches the floor's counts:

* the gradient at ``x`` that gives the direction ``z`` is the same one the penalty needs, so
  there is no separate forward/backward for ``z``;
* when the penalty's forward at ``x`` is the same function as the training forward (batch-norm
  with batch statistics over the whole batch, or a model without batch-norm or dropout), that
  gradient comes from the training forward that also gives the cross-entropy;
* the penalty's parameter gradient comes from ``autograd.grad(..., create_graph=True)`` followed
  by one ordinary backward of the total loss, which is what DDP needs: gradients reach the
  parameters in exactly one backward, so every rank all-reduces them once;
* the forwards run on the model's own modules (no functional copy, no buffer copies in 'batch'
  mode; in 'running' mode one copy of the running statistics a step);
* in the forwards whose gradient is differentiated again, batch-norm with batch statistics runs
  through :class:`_BatchNormTrain`, whose second-order backward is a closed form (one native
  batch-norm backward, one fused per-channel dot product, three multiply-adds; with the forward
  and the input gradient 2.7-4.5x cheaper than torch's generic ones on a CPU, over three layer
  shapes) that keeps no tensor beyond the memory count below, and ReLU through :class:`_ReLU`,
  whose second-order backward sends no all-zero gradient back into the forward graph (torch's
  allocates and adds one per layer); in the backward of the total, where nothing is
  differentiated again, both call torch's first-order kernels directly.

The two evaluation points cannot share one forward over the concatenated batch: ``z`` is the
sign of the gradient at ``x``, which needs the backward at ``x`` first (and in 'batch' mode each
point's batch-norm statistics are its own batch's).

With ``bn_mode='batch'`` a loss depends on every image of its batch through the batch-norm
statistics; ``grad l(x)`` is then the gradient of the batch's summed loss w.r.t. each image, which
is what the training forward differentiates too.

Because ``z`` is piecewise constant in the parameters, it is treated as a constant (its derivative
is zero almost everywhere). ``x + h z`` is not clipped to [0, 1]: the penalty measures how the
loss bends along ``z``, and clipping would change the direction per pixel.
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from robustness.errors import ConfigError, InputError
from robustness.tensors import eval_mode
from robustness.training.regularizer import Regularizer, StepOutput
from robustness.registry import register

LossFn = Callable[[Tensor, Tensor], Tensor]
Forward = Callable[[Tensor], Tensor]
#: ``timer(part)`` wraps one part of a step; the benchmark passes one that measures each part.
PhaseTimer = Callable[[str], ContextManager[Any]]


def _untimed(part: str) -> ContextManager[Any]:
    return nullcontext()

BN_MODES = ("batch", "running")
#: Lightning precisions the CURE step is checked under (see :meth:`CURE.check_precision`).
SUPPORTED_PRECISIONS = frozenset({"64-true", "64", "32-true", "32", "bf16-mixed"})

# Layers that compute something else in training mode than in evaluation mode.
_MODE_DEPENDENT = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)


def per_example_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy of each example, shape (N,)."""
    return F.cross_entropy(logits, y, reduction="none")


@dataclass
class PenaltyTerms:
    """The pieces of the CURE penalty, one entry (or one image) per example."""

    penalty: Tensor  # ||grad l(x + h z) - grad l(x)||^2 (or its norm), shape (N,)
    clean_grad: Tensor  # grad l(x), shape of x
    direction: Tensor  # z: unit l2 norm per example (zero where grad l(x) is zero), shape of x


def sign_direction(grad: Tensor) -> Tensor:
    """``sign(g) / ||sign(g)||`` per example; zero for an example whose gradient is all zeros.

    The entries of ``sign(g)`` are 0 or +-1, so its norm is 0 or at least 1: clamping it at 1
    changes nothing except for an all-zero gradient, where it avoids 0/0.
    """
    signs = torch.sign(grad)
    norms = signs.flatten(1).norm(dim=1).clamp_min(1.0)
    return signs / norms.view(-1, *([1] * (grad.dim() - 1)))


def _input_gradient(
    forward: Forward, x: Tensor, y: Tensor, loss_fn: LossFn, create_graph: bool, timer: PhaseTimer = _untimed, point: str = "x"
) -> Tensor:
    """The gradient of the summed per-example losses at ``x`` w.r.t. the pixels.

    Unlike :func:`robustness.geometry.hessian.input_gradient` this takes any forward (a model run
    in a chosen batch-norm mode) and any per-example loss, and keeps the graph on request.

    For a forward that treats examples independently the gradient's row ``i`` is
    ``grad l_i(x_i)``; with batch statistics it also carries the terms through the statistics.
    """
    with torch.enable_grad():
        with timer(f"forward at {point}"):
            x_leaf = x.detach().requires_grad_(True)
            losses = loss_fn(forward(x_leaf), y)
        if losses.shape != (len(x),):
            raise InputError(
                f"the loss function must return one loss per example, shape ({len(x)},), got {tuple(losses.shape)}",
                "use a per-example loss (reduction='none')",
            )
        with timer(f"input gradient at {point}"):
            (grad,) = torch.autograd.grad(losses.sum(), x_leaf, create_graph=create_graph)
    return grad


def curvature_penalty(
    forward: Forward,
    x: Tensor,
    y: Tensor,
    h: float,
    *,
    squared: bool = True,
    loss_fn: LossFn = per_example_cross_entropy,
    create_graph: bool = False,
    clean_grad: Tensor | None = None,
    timer: PhaseTimer = _untimed,
) -> PenaltyTerms:
    """The CURE penalty of each example of a batch.

    ``forward`` maps pixels to the loss function's input (a model, or a model run in a chosen
    mode). ``clean_grad`` is ``grad l(x)`` when the caller already has it (with its graph when
    ``create_graph``); otherwise it is computed here. ``create_graph=True`` keeps the graph so
    that the penalty can be differentiated w.r.t. the parameters. ``timer`` wraps each part.
    """
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 2:
        raise InputError(f"images must be a batched floating-point tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if len(y) != len(x):
        raise InputError(f"got {len(x)} images but {len(y)} labels")
    if not (math.isfinite(h) and h > 0):
        raise InputError(f"the finite-difference step h must be a positive number, got {h}", "e.g. h=1.0")
    if clean_grad is None:
        clean_grad = _input_gradient(forward, x, y, loss_fn, create_graph, timer)
    elif clean_grad.shape != x.shape:
        raise InputError(f"clean_grad has shape {tuple(clean_grad.shape)}, the images {tuple(x.shape)}")
    with timer("direction z"):
        direction = sign_direction(clean_grad.detach())
        shifted = x.detach() + h * direction
    shifted_grad = _input_gradient(forward, shifted, y, loss_fn, create_graph, timer, point="x + h z")
    with timer("penalty from the gradients"):
        difference = (shifted_grad - clean_grad).flatten(1)
        # vector_norm has the zero subgradient at 0, where sqrt(sum of squares) would give NaN.
        penalty = difference.pow(2).sum(dim=1) if squared else torch.linalg.vector_norm(difference, dim=1)
    return PenaltyTerms(penalty=penalty, clean_grad=clean_grad, direction=direction)


def mean_curvature_penalty(
    model: nn.Module, x: Tensor, y: Tensor, h: float, *, squared: bool = True, batch_size: int = 256
) -> float:
    """Mean CURE penalty over a set of images with the model as it is (call ``model.eval()`` first)."""
    if len(x) == 0:
        raise InputError("no images to evaluate the curvature penalty on")
    total = 0.0
    for start in range(0, len(x), batch_size):
        terms = curvature_penalty(model, x[start : start + batch_size], y[start : start + batch_size], h, squared=squared)
        total += float(terms.penalty.sum())
    return total / len(x)


# ---------------------------------------------------------------------------------------------
# Batch-norm with batch statistics, with a closed-form second-order backward


def _per_channel(values: Tensor, like: Tensor) -> Tensor:
    return values.view(1, -1, *([1] * (like.dim() - 2)))


_native_batch_norm_backward = torch.ops.aten.native_batch_norm_backward


def _channel_dot(a: Tensor, b: Tensor, stats: Tensor) -> Tensor:
    """``sum a * b`` per channel (``stats``: a per-channel tensor of the statistics' dtype).

    Batch-norm's weight gradient with mean 0 and inverse deviation 1 is exactly that sum; the
    native kernel takes it in one pass over both tensors, without writing their product.
    """
    zeros, ones = stats.new_zeros(a.shape[1]), stats.new_ones(a.shape[1])
    return _native_batch_norm_backward(a, b, None, None, None, zeros, ones, True, 0.0, [False, True, False])[1]


class _BatchNormInputGradient(torch.autograd.Function):
    """Batch-norm's backward (batch statistics) as a function of its incoming gradient and input.

    With ``x_hat = (x - mean) r``, ``r = 1 / sqrt(var + eps)`` and per-channel means <.> over the
    ``m`` values of a channel, the backward of ``y = gamma x_hat + beta`` for an incoming
    gradient ``g`` is ``dx = gamma d`` with ``d = r (g - <g> - x_hat <g x_hat>)``,
    ``dgamma = S_gx = sum g x_hat`` and ``dbeta = sum g``. Its own backward, for gradients ``u``,
    ``u_gamma``, ``u_beta`` of those three, is

        w.r.t. g:     a + u_gamma x_hat + u_beta,  a = gamma r (u - <u> - x_hat <u x_hat>)
        w.r.t. x:     d (u_gamma - gamma r S_ux / m) - x_hat gamma r P / m - a r S_gx / m
        w.r.t. gamma: P = sum u d

    with ``S_ux = sum u x_hat`` (``a`` is batch-norm's own backward of ``u``: one native call
    gives it and ``S_ux``). The x-terms come from differentiating ``r`` and the centring, with
    ``g - <g>`` written as ``d / r + x_hat S_gx / m``.

    So the backward needs ``d`` and the per-channel ``S_gx``, not ``g``: it saves the output
    ``dx = gamma d``, which the layer before (a convolution's second-order backward needs its
    incoming gradient) saves anyway, instead of ``g``, one activation-sized tensor less per
    layer and evaluation point. Where ``gamma`` has an entry too close to zero for ``dx / gamma``
    to give ``d`` back (``keep_grad_out``), ``g`` is saved and ``d`` recomputed from it.
    """

    @staticmethod
    def forward(
        ctx: Any, grad_out: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, eps: float, keep_grad_out: bool
    ) -> tuple[Tensor, Tensor, Tensor]:
        # Unused outputs (the weight gradients, in an input-gradient pass) then reach the
        # backward as None instead of zero tensors that it would multiply through.
        ctx.set_materialize_grads(False)
        grad_x, grad_weight, grad_bias = _native_batch_norm_backward(grad_out, x, weight, None, None, mean, invstd, True, eps, [True, True, True])
        ctx.eps, ctx.keep_grad_out = eps, keep_grad_out
        ctx.save_for_backward(grad_out if keep_grad_out else grad_x, x, weight, mean, invstd, grad_weight)
        return grad_x, grad_weight, grad_bias

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, u: Tensor | None, u_weight: Tensor | None, u_bias: Tensor | None) -> tuple[Tensor | None, ...]:
        stored, x, weight, mean, invstd, sum_gx = ctx.saved_tensors
        r_over_m = invstd * (x.shape[1] / x.numel())
        # scaled_d = scale d and gamma = scale factor, per channel (None standing for 1), so that
        # no coefficient divides by gamma unless gamma was checked to be far from zero.
        if ctx.keep_grad_out:
            scaled_d = _native_batch_norm_backward(stored, x, None, None, None, mean, invstd, True, ctx.eps, [True, False, False])[0]
            scale, factor = None, weight
        else:
            scaled_d, scale, factor = stored, weight, None
        grad_g = grad_x = grad_weight = None
        coef_d = None if u_weight is None else (u_weight if scale is None else u_weight / scale)
        if u is not None:
            grad_g, sum_ux, _ = _native_batch_norm_backward(u, x, weight, None, None, mean, invstd, True, ctx.eps, [True, True, False])
            scaled_p = _channel_dot(u, scaled_d, mean)
            grad_weight = scaled_p if scale is None else scaled_p / scale
            # -x_hat gamma r P / m, as -(x - mean) coef_x.
            coef_x = r_over_m * invstd * scaled_p
            coef_x = coef_x if factor is None else coef_x * factor
            grad_x = torch.addcmul(_per_channel(mean * coef_x, x), x, _per_channel(coef_x, x), value=-1)
            grad_x.addcmul_(grad_g, _per_channel(r_over_m * sum_gx, x), value=-1)
            coef_u = r_over_m * sum_ux if factor is None else r_over_m * sum_ux * factor
            coef_d = -coef_u if coef_d is None else coef_d - coef_u
        if coef_d is not None:
            grad_x = scaled_d * _per_channel(coef_d, x) if grad_x is None else grad_x.addcmul_(scaled_d, _per_channel(coef_d, x))
        if u_weight is not None or u_bias is not None:
            # grad_g += u_gamma x_hat + u_beta, x_hat = x r - mean r.
            slope = torch.zeros_like(invstd) if u_weight is None else u_weight * invstd
            offset = -mean * slope if u_bias is None else u_bias - mean * slope
            extra = torch.addcmul(_per_channel(offset, x), x, _per_channel(slope, x))
            grad_g = extra if grad_g is None else grad_g.add_(extra)
        return grad_g, grad_x, grad_weight, None, None, None, None


class _BatchNormTrain(torch.autograd.Function):
    """``F.batch_norm`` with batch statistics (running ones updated as torch does), whose
    backward is :class:`_BatchNormInputGradient` when it is to be differentiated again."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        keep_grad_out: bool,
    ) -> Tensor:
        out, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps, ctx.keep_grad_out = eps, keep_grad_out
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: this backward is differentiated again
            grads = _BatchNormInputGradient.apply(grad_out, x, weight, mean, invstd, ctx.eps, ctx.keep_grad_out)
        else:
            grads = _native_batch_norm_backward(grad_out, x, weight, None, None, mean, invstd, True, ctx.eps, [True, True, True])
        return (*grads, None, None, None, None, None)


def _batch_norm_forward(module: nn.modules.batchnorm._BatchNorm, x: Tensor, keep_grad_out: bool = True) -> Tensor:
    """What ``_BatchNorm.forward`` does, with :class:`_BatchNormTrain` for batch statistics."""
    if not module.training:
        return type(module).forward(module, x)
    module._check_input_dim(x)
    momentum = 0.0 if module.momentum is None else module.momentum
    if module.track_running_stats and module.num_batches_tracked is not None:
        module.num_batches_tracked.add_(1)
        if module.momentum is None:
            momentum = 1.0 / float(module.num_batches_tracked)
    tracked = module.track_running_stats
    return _BatchNormTrain.apply(
        x,
        module.weight,
        module.bias,
        module.running_mean if tracked else None,
        module.running_var if tracked else None,
        momentum,
        module.eps,
        keep_grad_out,
    )


def _weights_near_zero(norms: Sequence[nn.modules.batchnorm._BatchNorm]) -> list[bool]:
    """Per layer, whether a ``gamma`` entry is too small for ``dx / gamma`` to return ``d`` to
    float round-off (see :class:`_BatchNormInputGradient`): exactly zero, as after a zero
    initialisation, or below the square root of the smallest normal number. One check for all
    layers, so that a GPU waits for it once per forward, not once per layer."""
    if not norms:
        return []
    flags = [module.weight.detach().abs().amin() < torch.finfo(module.weight.dtype).tiny ** 0.5 for module in norms]
    return torch.stack(flags).tolist()


class _ReLUInputGradient(torch.autograd.Function):
    """ReLU's backward ``g 1[out > 0]`` as a function of ``g``; its own backward is the same mask.

    torch's second-order ReLU backward also returns a gradient for the output the mask came
    from, which is zero almost everywhere: a zero tensor per layer that the backward then
    allocates and adds into the forward graph. This one returns none.
    """

    @staticmethod
    def forward(ctx: Any, grad_out: Tensor, out: Tensor) -> Tensor:
        ctx.save_for_backward(out)
        return torch.ops.aten.threshold_backward(grad_out, out, 0)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, u: Tensor) -> tuple[Tensor | None, ...]:
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(u, out, 0), None


class _ReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        out = torch.relu(x)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> Tensor:
        (out,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: this backward is differentiated again
            return _ReLUInputGradient.apply(grad_out, out)
        return torch.ops.aten.threshold_backward(grad_out, out, 0)


def _relu_forward(module: nn.ReLU, x: Tensor) -> Tensor:
    return _ReLU.apply(x)


# Exactly these types: subclasses such as SyncBatchNorm compute their statistics otherwise.
_PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@contextmanager
def _closed_form_second_order(model: nn.Module) -> Iterator[None]:
    """Inside, the model's affine batch-norm layers (in training mode; in evaluation mode they are
    affine maps, whose second-order backward is already cheap) and ReLU layers run through the
    functions above, whose second-order backwards are closed forms. A batch-norm layer with a
    weight entry near zero keeps its incoming gradient for that backward (:func:`_weights_near_zero`)."""
    patched = [
        module
        for module in model.modules()
        if (type(module) in _PLAIN_BATCH_NORMS or type(module) is nn.ReLU)
        and getattr(module, "affine", True)
        and "forward" not in vars(module)
    ]
    norms = [module for module in patched if type(module) in _PLAIN_BATCH_NORMS and module.training]
    keep_grad_out = dict(zip(norms, _weights_near_zero(norms)))
    for module in patched:
        if type(module) is nn.ReLU:
            module.forward = partial(_relu_forward, module)
        else:
            module.forward = partial(_batch_norm_forward, module, keep_grad_out=keep_grad_out.get(module, True))
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def has_mode_dependent_layers(model: nn.Module) -> bool:
    """Whether the model computes a different function in training and evaluation mode."""
    return any(isinstance(module, _MODE_DEPENDENT) for module in model.modules())


@contextmanager
def _running_statistics_untouched(norms: Sequence[nn.modules.batchnorm._NormBase]) -> Iterator[None]:
    """Normalisation layers in training mode use their batch's statistics without updating the
    running ones: a layer that does not track statistics passes none to ``batch_norm``."""
    flags = [(module, module.track_running_stats) for module in norms]
    for module in norms:
        module.track_running_stats = False
    try:
        yield
    finally:
        for module, tracking in flags:
            module.track_running_stats = tracking


@contextmanager
def _statistics_swapped(snapshots: Sequence[tuple[nn.Module, Tensor, Tensor]]) -> Iterator[None]:
    originals = [(module, module.running_mean, module.running_var) for module, _, _ in snapshots]
    for module, mean, var in snapshots:
        module.running_mean, module.running_var = mean, var
    try:
        yield
    finally:
        for module, mean, var in originals:
            module.running_mean, module.running_var = mean, var


def penalty_forward(model: nn.Module, bn_mode: str) -> Forward:
    """The forward the penalty uses.

    ``running``: evaluation mode (batch-norm with its running statistics, dropout off), as the
    public CURE code does. ``batch``: training mode, batch-norm normalising with the statistics of
    the penalty's own batch.

    Either way the running statistics stay as they are. In 'batch' mode the layers skip their
    update, so that each step updates them once, from the clean batch. In 'running' mode the
    forward uses copies of the statistics as they are when it is made, taken once for all its
    calls: the penalty's graph saves the statistics for its backward, and the training forward
    later updates the real ones in place (autograd does not notice that change, and the
    penalty's gradient would silently use the new statistics).
    """
    if bn_mode not in BN_MODES:
        raise ConfigError(f"unknown bn_mode '{bn_mode}'", f"choose one of: {', '.join(BN_MODES)}")
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._NormBase)]

    if bn_mode == "batch":

        def forward(x: Tensor) -> Tensor:
            with _running_statistics_untouched(norms), _closed_form_second_order(model):
                return model(x)

        return forward

    snapshots = [
        (module, module.running_mean.clone(), module.running_var.clone())
        for module in norms
        if module.running_mean is not None and module.running_var is not None
    ]

    def forward(x: Tensor) -> Tensor:
        with eval_mode(model), _statistics_swapped(snapshots), _closed_form_second_order(model):
            return model(x)

    return forward


def _finite_on_every_rank(loss: Tensor) -> Tensor:
    """``loss``, or NaN when any DDP rank's loss is not finite.

    The training module skips a step with a non-finite loss; under DDP every rank must skip
    the same steps, or the ranks that do run a backward wait forever for the others.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return loss
    bad = (~torch.isfinite(loss.detach())).to(torch.float32).reshape(1)
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return loss + float("nan") if bool(bad.item()) else loss


def _check_h(h: float | Sequence[float]) -> tuple[float, ...]:
    values = [h] if isinstance(h, (int, float)) and not isinstance(h, bool) else h
    try:
        schedule = tuple(float(v) for v in values)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ConfigError(f"regularizer.h must be a number or a list of numbers, got {h!r}", "e.g. regularizer.h=1.0 or regularizer.h=[0.1,0.4,0.8,1.8,3]") from None
    if not schedule or not all(math.isfinite(v) and v > 0 for v in schedule):
        raise ConfigError(f"regularizer.h must hold positive finite numbers, got {h!r}", "e.g. regularizer.h=1.0 or regularizer.h=[0.1,0.4,0.8,1.8,3]")
    return schedule


@register("regularizer", "cure")
class CURE(Regularizer):
    """Cross-entropy plus ``lam`` times the CURE curvature penalty (variant ``cure``).

    lam:      weight of the penalty (mean over the examples it is computed on)
    h:        finite-difference step in [0, 1] pixel units (the l2 norm of ``h z``); a list gives
              one value per epoch, its last value repeating
    squared:  true: the report's squared norm; false: the plain norm of the public CURE code
    bn_mode:  'batch' or 'running': see :func:`penalty_forward`
    fraction: share of each batch the penalty is computed on (the first examples of the
              shuffled batch); the cross-entropy always uses the whole batch
    """

    def __init__(
        self,
        variant: str = "cure",
        init_from: str | None = None,
        lam: float = 1.0,
        h: float | Sequence[float] = 0.5,
        squared: bool = True,
        bn_mode: str = "batch",
        fraction: float = 1.0,
    ) -> None:
        if isinstance(lam, bool) or not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
            raise ConfigError(f"regularizer.lam must be a finite number >= 0, got {lam!r}", "e.g. regularizer.lam=1.0")
        if not isinstance(squared, bool):
            raise ConfigError(f"regularizer.squared must be true or false, got {squared!r}", "regularizer.squared=true (the report's squared norm) or false (the plain norm)")
        if bn_mode not in BN_MODES:
            raise ConfigError(f"unknown regularizer.bn_mode '{bn_mode}'", f"choose one of: {', '.join(BN_MODES)}")
        if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            raise ConfigError(f"regularizer.fraction must lie in (0, 1], got {fraction!r}", "e.g. regularizer.fraction=0.5 to compute the penalty on half of each batch")
        self.variant = variant
        self.init_from = init_from
        self.lam = float(lam)
        self.h_schedule = _check_h(h)
        self.squared = squared
        self.bn_mode = bn_mode
        self.fraction = float(fraction)
        #: wraps each part of a step; the benchmark sets one that measures them
        self.phase_timer: PhaseTimer = _untimed

    def check_precision(self, precision: str | int) -> None:
        """Refuse a Lightning ``trainer.precision`` the CURE step has not been validated under.

        Under ``bf16-mixed`` (autocast; the double backward runs on the bfloat16 activations it
        saved) a digits model's penalty stays within 2% of float32 and its parameter gradient
        within about 10% (tests/test_cure_units.py); float16 and half-precision weights are not
        covered: float16's loss scaling scales only the outer loss, not the input gradients the
        penalty differences, and neither has been checked against float32.
        """
        name = str(precision)
        if name not in SUPPORTED_PRECISIONS:
            raise ConfigError(
                f"the cure regularizer does not support trainer.precision={name}: its penalty differentiates a difference "
                "of input gradients again, which has been checked only in full precision and under bf16-mixed",
                f"use trainer.precision=bf16-mixed or one of {', '.join(sorted(SUPPORTED_PRECISIONS - {'bf16-mixed'}))}",
            )

    def h_at(self, epoch: int) -> float:
        """The step ``h`` of an epoch (0-based); past the schedule its last value repeats."""
        return self.h_schedule[min(max(epoch, 0), len(self.h_schedule) - 1)]

    def penalty_size(self, batch_size: int) -> int:
        """How many examples of a batch the penalty is computed on (at least one)."""
        return min(batch_size, max(1, math.ceil(self.fraction * batch_size)))

    def shares_clean_forward(self, model: nn.Module, batch_size: int) -> bool:
        """Whether the training forward also gives the penalty's gradient at ``x``.

        It does when the penalty's forward at ``x`` is the same function of the same batch:
        batch statistics over the whole batch, or a model that is the same in both modes.
        """
        if self.penalty_size(batch_size) != batch_size:
            return False
        return self.bn_mode == "batch" or not has_mode_dependent_layers(model)

    def training_loss(self, model: nn.Module, x: Tensor, y: Tensor, epoch: int) -> StepOutput:
        if hasattr(model, "_orig_mod"):
            raise ConfigError(
                "CURE differentiates through a gradient (double backward), which torch.compile'd models do not support",
                "train the cure variant on the uncompiled model",
            )
        h = self.h_at(epoch)
        # Without a penalty weight the penalty is only logged: no graph for its gradient.
        keep_graph = self.lam > 0 and torch.is_grad_enabled()
        forward = penalty_forward(model, self.bn_mode)
        n_penalty = self.penalty_size(len(x))

        timer = self.phase_timer
        if self.shares_clean_forward(model, len(x)):
            with timer("forward at x"), _closed_form_second_order(model):
                x_leaf = x.detach().requires_grad_(True)
                logits = model(x_leaf)
                ce_each = per_example_cross_entropy(logits, y)
            with timer("input gradient at x"):
                # retain_graph: the cross-entropy's own backward still has to run through this graph.
                (clean_grad,) = torch.autograd.grad(ce_each.sum(), x_leaf, create_graph=keep_graph, retain_graph=True)
            terms = curvature_penalty(forward, x, y, h, squared=self.squared, create_graph=keep_graph, clean_grad=clean_grad, timer=timer)
        else:
            # Penalty first: with bn_mode='running' it then uses the running statistics as they
            # were at the start of the step (constants), not ones the training forward has just
            # moved as a function of the current weights.
            terms = curvature_penalty(forward, x[:n_penalty], y[:n_penalty], h, squared=self.squared, create_graph=keep_graph, timer=timer)
            with timer("training forward"):
                logits = model(x)
                ce_each = per_example_cross_entropy(logits, y)

        ce = ce_each.mean()
        penalty = terms.penalty.mean()
        # With lam = 0 the product still carries a non-finite penalty into the loss (0 * inf is
        # NaN), so such a step is skipped like any other bad one.
        loss = _finite_on_every_rank(ce + self.lam * penalty)
        logs: dict[str, Tensor | float] = {
            "ce": ce.detach(),
            "cure_penalty": penalty.detach(),
            "grad_norm": terms.clean_grad.detach().flatten(1).norm(dim=1).mean(),
            "cure_h": h,
        }
        return StepOutput(loss=loss, logits=logits, logs=logs)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "lam": self.lam,
            "h": list(self.h_schedule),
            "squared": self.squared,
            "bn_mode": self.bn_mode,
            "fraction": self.fraction,
        }
