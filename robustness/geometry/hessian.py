"""Second-order geometry of the loss with respect to the input image.

Everything here is batched over images and knows nothing of Lightning or plotting.

``l(x) = cross_entropy(model(x), y)`` is the per-example loss and ``H = d^2 l / dx^2`` its
Hessian with respect to the input pixels. Two ways to multiply ``H`` by a vector:

* ``exact``: double backward through the network. For a ReLU network the logits are piecewise
  linear, so the *logit* Hessian is zero almost everywhere and this computes the Gauss-Newton
  part only, ``H = J^T (diag(p) - p p^T) J`` (``J`` the logit Jacobian, ``p`` the softmax),
  which is positive semi-definite with rank at most ``num_classes - 1``. Smooth activations add
  the curvature of the logits themselves. Where that holds (checked, see :class:`InputHessian`)
  the products come from ``J`` itself, built once from ``num_classes`` backward passes: the same
  numbers to round-off, without a double backward per product.
* ``finite_difference``: ``H v ~ |v| (grad l(x + h v/|v|) - grad l(x)) / h``, a forward
  difference whose step has Euclidean length ``h`` in pixel space, as in CURE's regulariser.
  Across ReLU kinks this also sees how the linear regions change within distance ``h``: it
  measures curvature at scale ``h`` rather than at a point.

Randomness (probe directions, Lanczos starts) is drawn per image from ``(seed, image id)``, so a
result for an image does not depend on which other images share its batch; chunked, resumed
and batched runs agree exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustness.geometry.gradients import input_gradient
from robustness.tensors import check_images
from robustness.errors import InputError

ESTIMATORS = ("exact", "finite_difference")
# Factored exact products (InputHessian, factor=True): beyond these the Jacobian is not held
# (its backward passes would outnumber the products, or N x classes x d entries pass 128 Mi,
# half a GiB in float32).
_FACTOR_MAX_CLASSES = 64
_FACTOR_MAX_ENTRIES = 2**27


class InputHessian:
    """The input Hessian of the loss at a batch of images, as a batched linear operator.

    ``hessian(v)`` returns ``H_i v_i`` for every image ``i``, with ``v`` shaped like the images.
    The gradient at the images is computed once on construction and reused by every product.

    estimator: ``"exact"`` (double backward) or ``"finite_difference"`` (step length ``h``); see
               the module docstring for what each one measures on ReLU networks.
    factor:    with ``exact``, take the products as ``J^T (diag p - p p^T) (J v)`` from the logit
               Jacobian ``J`` (``num_classes`` backward passes, once) where that is the Hessian:
               where the logits' own Hessian is exactly zero at every image, as for networks of
               ReLU, max-pool and affine layers (checked with a random probe, see
               :func:`_logits_are_locally_linear`), and ``J`` is small enough to hold (at most
               ``_FACTOR_MAX_CLASSES`` classes and ``_FACTOR_MAX_ENTRIES`` entries). The products
               are then those of the double backward to round-off, for a fraction of the cost;
               ``factored`` says which way they are taken.
    """

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, estimator: str = "exact", h: float = 1e-2, *, factor: bool = True) -> None:
        check_images(model, x, y)
        if estimator not in ESTIMATORS:
            raise InputError(f"unknown Hessian estimator '{estimator}'", f"choose one of: {', '.join(ESTIMATORS)}")
        if estimator == "finite_difference" and not (math.isfinite(h) and h > 0):
            raise InputError(f"the finite-difference step h must be a positive number, got {h}", "e.g. h=0.01 for images in [0, 1]")
        _check_grad_mode()
        self.model = model
        self.y = y
        self.estimator = estimator
        self.h = float(h)
        #: (N, classes, d) logit Jacobian and (N, classes) softmax where the products are factored
        self._jacobian: Tensor | None = None
        self._softmax: Tensor | None = None
        if estimator == "exact":
            with torch.enable_grad():
                self._x = x.detach().clone().requires_grad_(True)
                logits = model(self._x)
                loss = F.cross_entropy(logits, y, reduction="none").sum()
                (self.gradient,) = torch.autograd.grad(loss, self._x, create_graph=True)
                if factor:
                    self._factor(logits)
        else:
            self._x = x.detach()
            self.gradient = input_gradient(model, self._x, y)

    @property
    def factored(self) -> bool:
        """Whether products come from the logit Jacobian (see ``factor``) rather than a double backward."""
        return self._jacobian is not None

    def _factor(self, logits: Tensor) -> None:
        n, classes = logits.shape
        d = self._x[0].numel()
        if not (logits.requires_grad and self.gradient.requires_grad) or classes > _FACTOR_MAX_CLASSES or n * classes * d > _FACTOR_MAX_ENTRIES:
            return
        if not _logits_are_locally_linear(logits, self._x):
            return
        # Row k of every image's Jacobian at once: an eval-mode model treats images independently.
        rows = [torch.autograd.grad(logits[:, k].sum(), self._x, retain_graph=True, allow_unused=True)[0] for k in range(classes)]
        if any(row is None for row in rows):
            return
        self._jacobian = torch.stack([row.detach().flatten(1) for row in rows], dim=1)
        self._softmax = logits.detach().double().softmax(1)
        # The graph is no longer needed: every product comes from J.
        self.gradient = self.gradient.detach()

    @property
    def shape(self) -> torch.Size:
        return self._x.shape

    def __call__(self, v: Tensor) -> Tensor:
        if v.shape != self._x.shape:
            raise InputError(f"vectors must be shaped like the images {tuple(self._x.shape)}, got {tuple(v.shape)}")
        if self.estimator == "exact":
            return self._exact(v)
        return self._finite_difference(v)

    def _exact(self, v: Tensor) -> Tensor:
        if self._jacobian is not None:
            return _gauss_newton_product(self._jacobian, self._softmax, v.flatten(1)).view_as(v)
        return self._double_backward(v)

    def _double_backward(self, v: Tensor) -> Tensor:
        if not self.gradient.requires_grad:
            # The gradient does not depend on the input at all (e.g. a constant model).
            return torch.zeros_like(v)
        with torch.enable_grad():
            # H is symmetric, so the vector-Jacobian product of the gradient is H v.
            (hv,) = torch.autograd.grad(self.gradient, self._x, grad_outputs=v, retain_graph=True, allow_unused=True)
        return torch.zeros_like(v) if hv is None else hv.detach()

    def _finite_difference(self, v: Tensor) -> Tensor:
        norms = v.flatten(1).norm(dim=1)
        safe = torch.where(norms > 0, norms, torch.ones_like(norms))
        view = (-1,) + (1,) * (v.dim() - 1)
        step = v * (self.h / safe).view(view)
        shifted = input_gradient(self.model, self._x + step, self.y)
        hv = (shifted - self.gradient) * (safe / self.h).view(view)
        return torch.where((norms > 0).view(view), hv, torch.zeros_like(hv))


def _gauss_newton_product(jacobian: Tensor, softmax: Tensor, v: Tensor) -> Tensor:
    """``J_i^T (diag p_i - p_i p_i^T) J_i v_i`` for every image: J (N, classes, d), p (N, classes) float64, v (N, d)."""
    jv = torch.einsum("nkd,nd->nk", jacobian, v.to(jacobian.dtype)).double()
    # (diag p - p p^T) w = p * (w - <p, w>), in float64: for a confident image the two terms
    # nearly cancel, and float32 would keep little of their difference.
    weighted = softmax * (jv - (softmax * jv).sum(1, keepdim=True))
    return torch.einsum("nkd,nk->nd", jacobian, weighted.to(jacobian.dtype))


def _logits_are_locally_linear(logits: Tensor, x: Tensor) -> bool:
    """Whether the Hessian of a random combination of the logits times a random vector is exactly
    zero at every image: true of networks built from ReLU, max-pool and affine layers (their
    second derivatives vanish almost everywhere), false of smooth activations with probability one."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(logits.shape, generator=generator, dtype=torch.float64).to(logits)
    probe = torch.randn(x.shape, generator=generator, dtype=torch.float64).to(x)
    (gradient,) = torch.autograd.grad((weights * logits).sum(), x, create_graph=True, retain_graph=True)
    if not gradient.requires_grad:
        return True
    (curvature,) = torch.autograd.grad(gradient, x, grad_outputs=probe, retain_graph=True, allow_unused=True)
    return curvature is None or not bool(curvature.any())


def per_image_normal(image_ids: Sequence[int] | Tensor, shape: Sequence[int], seed: int, stream: int = 0, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """Standard normal tensor of shape (N, *shape), row ``i`` drawn from ``(seed, stream, image_ids[i])`` alone."""
    ids = [int(i) for i in (image_ids.tolist() if torch.is_tensor(image_ids) else image_ids)]
    rows = []
    for image_id in ids:
        # A fixed odd multiplier spreads (seed, stream, id) triples over distinct generator seeds.
        key = (int(seed) * 1_000_003 + int(stream) * 7_919 + image_id * 2_654_435_761) % (2**63 - 1)
        generator = torch.Generator().manual_seed(key)
        rows.append(torch.randn(tuple(shape), generator=generator, dtype=torch.float64))
    out = torch.stack(rows) if rows else torch.empty((0, *shape), dtype=torch.float64)
    return out.to(dtype=dtype, device=device)


@dataclass(frozen=True)
class FrobeniusEstimate:
    """Monte-Carlo estimate of ``||H||_F^2`` per image.

    mean:    the estimate, mean over samples of ``||H v||^2`` with ``v ~ N(0, I)`` (N,)
    stderr:  its standard error, sample standard deviation / sqrt(num_samples) (N,)
    squares: the individual ``||H v||^2`` values, shape (num_samples, N)
    """

    mean: Tensor
    stderr: Tensor
    squares: Tensor

    @property
    def num_samples(self) -> int:
        return int(self.squares.shape[0])


def frobenius_norm_sq(hessian: InputHessian, num_samples: int, seed: int = 0, image_ids: Sequence[int] | Tensor | None = None) -> FrobeniusEstimate:
    """Estimate ``||H||_F^2 = E ||H v||^2`` (``v`` standard normal) at each image of ``hessian``.

    ``E[v^T H^T H v] = trace(H^2)``, which is the squared Frobenius norm of the symmetric ``H``.
    ``image_ids`` name the images for the random stream (default ``0..N-1``).
    """
    if int(num_samples) < 2:
        raise InputError(f"num_samples must be at least 2 to give a standard error, got {num_samples}", "use e.g. num_samples=256")
    n = hessian.shape[0]
    ids = list(range(n)) if image_ids is None else image_ids
    _check_ids(ids, n)
    squares = torch.empty(int(num_samples), n, dtype=torch.float64)
    image_shape = tuple(hessian.shape[1:])
    x_ref = hessian.gradient
    for s in range(int(num_samples)):
        v = per_image_normal(ids, image_shape, seed, stream=s, dtype=x_ref.dtype, device=x_ref.device)
        squares[s] = hessian(v).flatten(1).double().pow(2).sum(1).cpu()
    mean = squares.mean(0)
    stderr = squares.std(0, unbiased=True) / math.sqrt(num_samples)
    return FrobeniusEstimate(mean, stderr, squares)


def top_eigenvalues(hessian: InputHessian, k: int, num_iter: int | None = None, seed: int = 0, image_ids: Sequence[int] | Tensor | None = None) -> Tensor:
    """The ``k`` eigenvalues of largest magnitude of each image's Hessian, by Lanczos: float64, shape (N, k).

    Signs are kept; each row is sorted by decreasing magnitude. Lanczos runs ``num_iter``
    (default ``min(d, 2k + 20)``) Hessian-vector products per image with full
    re-orthogonalisation. When the Krylov space of an image is exhausted (the Hessian of a ReLU
    network has rank at most ``num_classes - 1``) a fresh random direction orthogonal to the
    basis continues the iteration, so the remaining Ritz values come from the rest of the space.
    Lanczos assumes a symmetric operator: with ``finite_difference`` products (symmetric only up
    to O(h)) the values are those of the operator's symmetric part, approximately.
    """
    n = hessian.shape[0]
    d = math.prod(hessian.shape[1:])
    m = min(d, 2 * int(k) + 20) if num_iter is None else int(num_iter)
    if not 1 <= int(k) <= m:
        raise InputError(f"need 1 <= k <= num_iter, got k={k}, num_iter={m}", "ask for fewer eigenvalues or more Lanczos iterations")
    if m > d:
        raise InputError(f"num_iter={m} exceeds the input dimension {d}", f"use num_iter <= {d}")
    ids = list(range(n)) if image_ids is None else image_ids
    _check_ids(ids, n)
    ref = hessian.gradient
    image_shape = tuple(hessian.shape[1:])
    # The recurrence runs in float64 whatever the model's precision, so that the Ritz values do
    # not depend on round-off beyond that of the products themselves.
    work = torch.float64

    def fresh(stream: int) -> Tensor:
        return per_image_normal(ids, (d,), seed, stream=stream, dtype=work, device=ref.device)

    basis = torch.zeros(m, n, d, dtype=work, device=ref.device)
    alpha = torch.zeros(n, m, dtype=torch.float64)
    beta = torch.zeros(n, max(m - 1, 0), dtype=torch.float64)
    q = fresh(0)
    basis[0] = q / q.norm(dim=1, keepdim=True)
    scale = torch.zeros(n, dtype=work, device=ref.device)
    # Products carry the model's round-off: a residual below this fraction of the largest entry
    # of the tridiagonal matrix so far is numerically zero.
    tiny = torch.finfo(ref.dtype).eps * 1e3
    for j in range(m):
        w = hessian(basis[j].view(n, *image_shape).to(ref.dtype)).reshape(n, d).to(work)
        a = (w * basis[j]).sum(1)
        alpha[:, j] = a.double().cpu()
        w = w - a[:, None] * basis[j]
        if j > 0:
            w = w - beta[:, j - 1].to(w.device)[:, None] * basis[j - 1]
        w = _orthogonalise(w, basis[: j + 1])
        scale = torch.maximum(scale, a.abs())
        if j == m - 1:
            break
        b = w.norm(dim=1)
        # Breakdown: the Krylov space of this image is invariant; restart orthogonally with b = 0.
        broken = b <= tiny * torch.clamp(scale, min=torch.finfo(work).tiny)
        if broken.any():
            restart = _orthogonalise(fresh(j + 1), basis[: j + 1])
            restart = restart / restart.norm(dim=1, keepdim=True)
            w = torch.where(broken[:, None], restart, w)
            b = torch.where(broken, torch.zeros_like(b), b)
        beta[:, j] = b.double().cpu()
        norm_w = torch.where(broken, torch.ones_like(b), b)
        basis[j + 1] = w / norm_w[:, None]
        scale = torch.maximum(scale, b)
    tridiagonal = torch.diag_embed(alpha) + torch.diag_embed(beta, 1) + torch.diag_embed(beta, -1)
    ritz = torch.linalg.eigvalsh(tridiagonal)
    order = ritz.abs().argsort(dim=1, descending=True)[:, : int(k)]
    return ritz.gather(1, order)


def _orthogonalise(w: Tensor, basis: Tensor) -> Tensor:
    """Remove from each row of ``w`` (N, d) its components along ``basis`` (j, N, d); twice, for round-off."""
    for _ in range(2):
        w = w - torch.einsum("jn,jnd->nd", torch.einsum("jnd,nd->jn", basis, w), basis)
    return w


def _check_ids(ids: Sequence[int] | Tensor, n: int) -> None:
    if len(ids) != n:
        raise InputError(f"got {len(ids)} image ids for {n} images", "pass one id per image (its index in the split)")


def _check_grad_mode() -> None:
    if torch.is_inference_mode_enabled():
        raise InputError(
            "Hessian-vector products need autograd, but inference mode is on",
            "run the probe outside the Lightning Trainer, or pass inference_mode=False to it",
        )
