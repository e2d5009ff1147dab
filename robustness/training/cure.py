"""CURE: curvature regularisation (report section 2.1.2, after Moosavi-Dezfooli et al. 2019).

Cross-entropy plus ``lam`` times the finite-difference curvature penalty

    L_r(x) = || grad l(x + h z) - grad l(x) ||^2,    z = sign grad l(x) / || sign grad l(x) ||,

with ``l`` the per-example cross-entropy and every gradient taken w.r.t. the [0, 1] input pixels.
``squared=False`` uses the plain norm instead, as the public CURE code does.

The step is written so that it costs as little as the maths allows:

* the gradient at ``x`` that gives the direction ``z`` is the same one the penalty needs, so
  there is no separate forward/backward for ``z``;
* when the penalty's forward at ``x`` is the same function as the training forward (batch-norm
  with batch statistics over the whole batch, or a model without batch-norm or dropout), that
  gradient comes from the training forward that also gives the cross-entropy;
* the penalty's parameter gradient comes from ``autograd.grad(..., create_graph=True)`` followed
  by one ordinary backward of the total loss, which is what DDP needs: gradients reach the
  parameters in exactly one backward, so every rank all-reduces them once.

With ``bn_mode='batch'`` a loss depends on every image of its batch through the batch-norm
statistics; ``grad l(x)`` is then the gradient of the batch's summed loss w.r.t. each image, which
is what the training forward differentiates too.

Because ``z`` is piecewise constant in the parameters, it is treated as a constant (its derivative
is zero almost everywhere). ``x + h z`` is not clipped to [0, 1]: the penalty measures how the
loss bends along ``z``, and clipping would change the direction per pixel.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from robustness.errors import ConfigError, InputError
from robustness.training.regularizer import Regularizer, StepOutput
from robustness.registry import register

LossFn = Callable[[Tensor, Tensor], Tensor]
Forward = Callable[[Tensor], Tensor]

BN_MODES = ("batch", "running")

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


def _input_gradient(forward: Forward, x: Tensor, y: Tensor, loss_fn: LossFn, create_graph: bool) -> Tensor:
    """The gradient of the summed per-example losses at ``x`` w.r.t. the pixels.

    Unlike :func:`robustness.geometry.hessian.input_gradient` this takes any forward (a model run
    in a chosen batch-norm mode) and any per-example loss, and keeps the graph on request.

    For a forward that treats examples independently the gradient's row ``i`` is
    ``grad l_i(x_i)``; with batch statistics it also carries the terms through the statistics.
    """
    with torch.enable_grad():
        x_leaf = x.detach().requires_grad_(True)
        losses = loss_fn(forward(x_leaf), y)
        if losses.shape != (len(x),):
            raise InputError(
                f"the loss function must return one loss per example, shape ({len(x)},), got {tuple(losses.shape)}",
                "use a per-example loss (reduction='none')",
            )
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
) -> PenaltyTerms:
    """The CURE penalty of each example of a batch.

    ``forward`` maps pixels to the loss function's input (a model, or a model run in a chosen
    mode). ``clean_grad`` is ``grad l(x)`` when the caller already has it (with its graph when
    ``create_graph``); otherwise it is computed here. ``create_graph=True`` keeps the graph so
    that the penalty can be differentiated w.r.t. the parameters.
    """
    if not torch.is_tensor(x) or not x.is_floating_point() or x.dim() < 2:
        raise InputError(f"images must be a batched floating-point tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if len(y) != len(x):
        raise InputError(f"got {len(x)} images but {len(y)} labels")
    if not (math.isfinite(h) and h > 0):
        raise InputError(f"the finite-difference step h must be a positive number, got {h}", "e.g. h=1.0")
    if clean_grad is None:
        clean_grad = _input_gradient(forward, x, y, loss_fn, create_graph)
    elif clean_grad.shape != x.shape:
        raise InputError(f"clean_grad has shape {tuple(clean_grad.shape)}, the images {tuple(x.shape)}")
    direction = sign_direction(clean_grad.detach())
    shifted_grad = _input_gradient(forward, x.detach() + h * direction, y, loss_fn, create_graph)
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


def has_mode_dependent_layers(model: nn.Module) -> bool:
    """Whether the model computes a different function in training and evaluation mode."""
    return any(isinstance(module, _MODE_DEPENDENT) for module in model.modules())


@contextmanager
def _evaluation_mode(model: nn.Module) -> Iterator[None]:
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def penalty_forward(model: nn.Module, bn_mode: str) -> Forward:
    """The forward the penalty uses.

    ``running``: evaluation mode (batch-norm with its running statistics, dropout off), as the
    public CURE code does. ``batch``: training mode, batch-norm normalising with the statistics of
    the penalty's own batch.

    Either way the forward runs on copies of the model's buffers. In 'batch' mode that leaves
    the running statistics alone, so that each step updates them once, from the clean batch. In
    'running' mode it keeps the statistics the penalty's graph saved for its backward intact when
    the training forward later updates the real ones in place (autograd does not notice that
    change, and the penalty's gradient would silently use the new statistics).
    """
    if bn_mode not in BN_MODES:
        raise ConfigError(f"unknown bn_mode '{bn_mode}'", f"choose one of: {', '.join(BN_MODES)}")

    def forward(x: Tensor) -> Tensor:
        buffer_copies = {name: buffer.clone() for name, buffer in model.named_buffers()}
        if bn_mode == "batch":
            return functional_call(model, buffer_copies, (x,), strict=False)
        with _evaluation_mode(model):
            return functional_call(model, buffer_copies, (x,), strict=False)

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

        if self.shares_clean_forward(model, len(x)):
            x_leaf = x.detach().requires_grad_(True)
            logits = model(x_leaf)
            ce_each = per_example_cross_entropy(logits, y)
            # retain_graph: the cross-entropy's own backward still has to run through this graph.
            (clean_grad,) = torch.autograd.grad(ce_each.sum(), x_leaf, create_graph=keep_graph, retain_graph=True)
            terms = curvature_penalty(forward, x, y, h, squared=self.squared, create_graph=keep_graph, clean_grad=clean_grad)
        else:
            # Penalty first: with bn_mode='running' it then uses the running statistics as they
            # were at the start of the step (constants), not ones the training forward has just
            # moved as a function of the current weights.
            terms = curvature_penalty(forward, x[:n_penalty], y[:n_penalty], h, squared=self.squared, create_graph=keep_graph)
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
