"""Small tensor helpers every floor may use: predictions, norms and input checks.

This module sits at the bottom of the house beside ``errors``: geometry, attacks, probes and
training all import it, and it imports nothing of the project but ``errors``.
"""

from __future__ import annotations

from contextlib import contextmanager

import copy
import logging
import warnings
import weakref
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from robustness.errors import InputError

_log = logging.getLogger("robustness")
#: Marks a module :func:`inference_copy` folded, so that a copy of a copy is not folded again.
_FOLDED = "_robustness_folded_copy"


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """Predicted labels of ``x`` in batches, without gradients."""
    return torch.cat([model(chunk).argmax(1) for chunk in x.split(batch_size)]) if len(x) else torch.empty(0, dtype=torch.long, device=x.device)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (the CPU for a model without any)."""
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Evaluation mode inside the block; each submodule's own mode is restored afterwards
    (Lightning keeps whatever mode it finds, so training code must not leave a model in eval)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` in evaluation mode on ``x`` (NaN for no images); the model's
    mode is restored afterwards."""
    if len(y) == 0:
        return float("nan")
    with eval_mode(model):
        pred = predict(model, x.to(model_device(model)), batch_size)
    return float((pred.cpu() == y.cpu()).double().mean())


def inference_copy(model: nn.Module, example: Tensor, *, for_gradients: bool = False, reuse: bool = True) -> nn.Module:
    """A faster stand-in for an evaluation-mode ``model``: the same function, 1.5-2.5x faster on
    CPU for the report's convolutional models.

    The copy has each batch norm folded into the convolution before it and its weights in
    channels-last layout, with ``requires_grad`` off (input gradients still flow: attacks and
    Hessian products may run on it with ``for_gradients=True``). Without ``for_gradients``, for
    no-grad forwards only (grids, sweeps, bisections), a CPU copy is also frozen into a TorchScript
    graph whose convolutions run with pre-packed weights, another ~1.5x on CPU; such a copy has no
    autograd.

    Each stage is kept only if it runs on ``example`` (a batch of inputs) and on a batch of
    another size, and agrees there with ``model`` to float round-off; a model that torch.fx
    cannot trace is copied without folding, one that cannot be frozen stays unfrozen, and one
    whose forward needs the default layout (``.view`` on a feature map) is returned as it is.

    A copy is made once per model, kind and image shape, and handed out again (``reuse``) for as
    long as none of the model's parameters and buffers has been replaced or changed in place
    since: probes ask for one per chunk of images, and making one costs 10-100 forwards.
    """
    if model.training:
        raise InputError("the model is in training mode; a folded copy would freeze its batch statistics", "call model.eval() first")
    key = (for_gradients, example.device, example.dtype, tuple(example.shape[1:]))
    made = _COPIES.get(model, {})
    state = _state_signature(model)
    if reuse and key in made and made[key][0] == state:
        return made[key][1]
    copied = _make_inference_copy(model, example, for_gradients)
    if copied is not model:  # a model kept as it is is not cached: the cache would keep it alive
        _COPIES.setdefault(model, {})[key] = (state, copied)
    return copied


#: Copies made by :func:`inference_copy`, per model (dropped with it): kind and shape -> (state, copy).
_COPIES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _state_signature(model: nn.Module) -> tuple:
    """Changes when a parameter or buffer is replaced (its storage), written in place (its version
    counter) or written through ``.data``, which no counter sees (its sum)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    with torch.no_grad():
        sums = torch.stack([t.sum(dtype=torch.float64) for _, t in tensors]).tolist() if tensors else []
    return tuple((name, t.data_ptr(), t._version, total) for (name, t), total in zip(tensors, sums))


def _make_inference_copy(model: nn.Module, example: Tensor, for_gradients: bool) -> nn.Module:
    from torch.fx.experimental.optimization import fuse

    if for_gradients and getattr(model, _FOLDED, False):
        return model
    # A second batch of another size and other values: a copy specialised to the traced batch fails it.
    check = torch.cat([example, 0.5 * example])
    with torch.no_grad():
        expected = model(check)
    scale = 1.0 + float(expected.abs().max()) if expected.numel() else 1.0

    def agrees(candidate: nn.Module) -> bool:
        try:
            with torch.no_grad():
                got = candidate(check)
        except RuntimeError:
            return False
        return got.shape == expected.shape and bool(((got - expected).abs() <= 1e-4 * scale).all())

    if getattr(model, _FOLDED, False):
        fast = model  # already folded and checked: only the freezing is left to do
    else:
        fast = copy.deepcopy(model)
        try:
            fast = fuse(fast)
        except Exception as exc:  # noqa: BLE001 - a tracing failure only costs the fold
            _log.debug("no batch-norm folding for %s: %s", type(model).__name__, exc)
        fast = fast.to(memory_format=torch.channels_last).requires_grad_(False)
        if not agrees(fast):
            return model
        setattr(fast, _FOLDED, True)
    if for_gradients or example.device.type != "cpu":
        return fast
    frozen = _frozen(fast, example)
    return frozen if frozen is not None and agrees(frozen) else fast


# The (layer, batch norm) pairs torch.fx's fuse folds into the layer.
_FOLDED_PAIRS = {(nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d), (nn.Linear, nn.BatchNorm1d)}


class FoldedTwin:
    """The batch-norm-folded copy of a model *in training*, brought up to date with it on each call.

    For attacks inside a training step (PGD training), which see the model as it is in evaluation
    mode: ``twin()`` is :func:`inference_copy`'s folded copy (``for_gradients=True``) with every
    weight recomputed from the live model's current parameters and running statistics, 1.6x
    faster per attack step on the digits CNN than the model itself. ``twin()`` is None where the
    model cannot be folded (torch.fx cannot trace it, or a fold would not agree with it); then the
    caller attacks the model itself.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._copy: nn.Module | None = None
        self._folds: list[tuple[str, nn.Module, nn.Module]] = []  # (name in the copy, layer, its batch norm)
        self._tried = False

    @torch.no_grad()
    def __call__(self, example: Tensor) -> nn.Module | None:
        if not self._tried:
            self._tried = True
            self._build(example)
        if self._copy is None:
            return None
        state = self._copy.state_dict()
        live = dict(self.model.state_dict())
        folded = set()
        for name, layer, norm in self._folds:
            fuse = torch.nn.utils.fusion.fuse_linear_bn_weights if isinstance(layer, nn.Linear) else torch.nn.utils.fusion.fuse_conv_bn_weights
            weight, bias = fuse(layer.weight, layer.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias)
            state[f"{name}.weight"].copy_(weight)
            state[f"{name}.bias"].copy_(bias)
            folded.update((f"{name}.weight", f"{name}.bias"))
        for key, value in state.items():
            if key not in folded:
                value.copy_(live[key])
        return self._copy

    def _build(self, example: Tensor) -> None:
        from torch.fx import symbolic_trace

        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            copied = inference_copy(self.model, example[:1], for_gradients=True, reuse=False)
            if copied is self.model:
                return
            traced = symbolic_trace(self.model)
        except Exception as exc:  # noqa: BLE001 - a model fx cannot trace is attacked as it is
            _log.debug("no folded twin for %s: %s", type(self.model).__name__, exc)
            return
        finally:
            for module, mode in modes:
                module.training = mode
        modules = dict(self.model.named_modules())
        live = self.model.state_dict()
        folds = []
        # The pairs torch.fx's fuse folds: a batch norm whose input is a layer used nowhere else.
        for node in traced.graph.nodes:
            source = node.args[0] if node.args else None
            if node.op != "call_module" or not isinstance(source, torch.fx.Node) or source.op != "call_module" or len(source.users) != 1:
                continue
            pair = (type(modules.get(source.target)), type(modules.get(node.target)))
            if pair in _FOLDED_PAIRS:
                folds.append((str(source.target), modules[source.target], modules[node.target]))
        state = copied.state_dict()
        names = {f"{name}.{part}" for name, _, _ in folds for part in ("weight", "bias")}
        kept = dict(copied.named_modules())
        norms = [name for name, m in modules.items() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        folded_norms = {id(norm) for _, _, norm in folds}
        # Each batch norm is folded here or kept in the copy as it is (none folded unseen), and
        # every other tensor of the copy is one of the model's, under its own name.
        if (any(id(modules[n]) not in folded_norms and not isinstance(kept.get(n), nn.modules.batchnorm._BatchNorm) for n in norms)
                or not names <= set(state)
                or any(k not in live or live[k].shape != v.shape for k, v in state.items() if k not in names)):
            return
        self._copy, self._folds = copied, folds


class _FrozenGraph(nn.Module):
    """A frozen TorchScript graph as an evaluation-mode module (a frozen graph keeps no ``training`` flag)."""

    def __init__(self, graph: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.graph = graph
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.graph(x)


def _frozen(model: nn.Module, example: Tensor) -> nn.Module | None:
    """``model`` traced, frozen and optimised for inference by TorchScript; None where that fails.

    TorchScript is deprecated in recent torch (a FutureWarning per call), but it is still the one
    way short of ``torch.compile`` (tens of seconds per model on a 2-core CPU) to run a graph with
    pre-packed convolution weights and fused activations; when it is gone the copy stays unfrozen.
    """
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, example, check_trace=False)
            return _FrozenGraph(torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval())))
    except Exception as exc:  # noqa: BLE001 - a model TorchScript cannot trace is only not frozen
        _log.debug("no frozen graph for %s: %s", type(model).__name__, exc)
        return None


def l2_norm(delta: Tensor) -> Tensor:
    """Per-sample l2 norm of a batch of perturbations."""
    return delta.flatten(1).norm(dim=1)


def check_images(model: nn.Module, x: Tensor, y: Tensor | None = None, num_classes: int | None = None) -> None:
    """Raise an :class:`InputError` naming the problem when images (and labels) cannot be fed to ``model``
    for an attack or a geometric probe: a model in training mode, non-float or unbatched
    images, non-finite pixels, pixels outside [0, 1], or labels that do not fit."""
    if model.training:
        raise InputError(
            "the model is in training mode; attacks need deterministic outputs (dropout, batch-norm statistics)",
            "call model.eval() before attacking it",
        )
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise InputError(f"images must be a floating-point tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    if x.dim() < 2:
        raise InputError(f"images must be batched (N, ...), got shape {tuple(x.shape)}", "add a batch dimension with x.unsqueeze(0)")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        raise InputError(f"{bad} of {len(x)} images contain NaN or infinite pixels", "clean or drop those images before attacking")
    lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 0.0)
    if lo < 0.0 or hi > 1.0:
        raise InputError(
            f"pixels must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]",
            "attacks work in pixel space: pass un-normalised images (normalisation lives inside the model)",
        )
    if y is not None:
        if y.shape[0] != x.shape[0]:
            raise InputError(f"got {x.shape[0]} images but {y.shape[0]} labels")
        if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise InputError(f"labels must be integer class indices, got dtype {y.dtype}")
        if num_classes is not None and len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise InputError(
                f"labels must lie in [0, {num_classes - 1}], got values in [{int(y.min())}, {int(y.max())}]",
                "check that the labels belong to the dataset the model was trained on",
            )


def relative_change(start: Sequence[Tensor], now: Sequence[Tensor]) -> float:
    """``||theta - theta_0|| / ||theta_0||`` over matching lists of tensors (a model's parameters
    before and after training), in float64 on the CPU."""
    if len(start) != len(now) or any(a.shape != b.shape for a, b in zip(start, now)):
        raise InputError("the two weight lists do not match tensor for tensor", "compare parameters of the same architecture")
    moved = sum(float((b.detach().cpu().double() - a.detach().cpu().double()).pow(2).sum()) for a, b in zip(start, now))
    size = sum(float(a.detach().cpu().double().pow(2).sum()) for a in start)
    return (moved / size) ** 0.5 if size > 0 else float("nan")
