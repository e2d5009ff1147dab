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
closed form (``training/second_order.py``) needs no more (it recovers what it needs of its incoming gradient from
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
* the forwards whose gradient is differentiated again run inside
  :func:`robustness.training.second_order.closed_form`: batch-norm with batch statistics and ReLU
  with closed-form second-order backwards, the same gradients as torch's generic double backward
  for less time and, for batch norm, no tensor beyond the memory count above.

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
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch import Tensor, nn

from robustness.errors import ConfigError, InputError
from robustness.geometry.gradients import LossFn, input_gradient, loss_and_input_gradient, per_example_cross_entropy
from robustness.registry import register
from robustness.training.penalty import (
    BN_MODES,
    SUPPORTED_PRECISIONS,
    Forward,
    check_double_backward_precision,
    finite_on_every_rank,
    has_mode_dependent_layers,
    penalty_forward,
    refuse_compiled,
    training_forward,
)
from robustness.training.regularizer import Regularizer, StepOutput

__all__ = [
    "BN_MODES", "CURE", "PenaltyTerms", "SUPPORTED_PRECISIONS", "curvature_penalty", "has_mode_dependent_layers",
    "mean_curvature_penalty", "penalty_forward", "per_example_cross_entropy", "sign_direction",
]

#: ``timer(part)`` wraps one part of a step; the benchmark passes one that measures each part.
PhaseTimer = Callable[[str], ContextManager[Any]]


def _untimed(part: str) -> ContextManager[Any]:
    return nullcontext()


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
        with timer("forward and input gradient at x"):
            clean_grad = input_gradient(forward, x, y, create_graph, loss_fn=loss_fn)
    elif clean_grad.shape != x.shape:
        raise InputError(f"clean_grad has shape {tuple(clean_grad.shape)}, the images {tuple(x.shape)}")
    with timer("direction z"):
        direction = sign_direction(clean_grad.detach())
        shifted = x.detach() + h * direction
    with timer("forward and input gradient at x + h z"):
        shifted_grad = input_gradient(forward, shifted, y, create_graph, loss_fn=loss_fn)
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
        check_double_backward_precision("cure", precision)

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
        refuse_compiled(model, "cure")
        h = self.h_at(epoch)
        # Without a penalty weight the penalty is only logged: no graph for its gradient.
        keep_graph = self.lam > 0 and torch.is_grad_enabled()
        forward = penalty_forward(model, self.bn_mode)
        n_penalty = self.penalty_size(len(x))

        timer = self.phase_timer
        if self.shares_clean_forward(model, len(x)):
            with timer("training forward and input gradient at x"):
                # retain_graph: the cross-entropy's own backward still has to run through this graph.
                logits, ce_each, clean_grad = loss_and_input_gradient(training_forward(model), x, y, create_graph=keep_graph, retain_graph=True)
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
        loss = finite_on_every_rank(ce + self.lam * penalty)
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
