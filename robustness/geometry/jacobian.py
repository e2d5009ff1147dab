"""Input gradients of many logit combinations at once: vector-Jacobian products of a batch.

DeepFool needs, at each iterate, the input gradients of ``k - 1`` logit differences per image.
Autograd gives them as ``k - 1`` backward calls through one forward graph, each a full pass of
small kernels over the batch; a vmap'ed backward (``is_grads_batched``) batches them but pays
for its batching rules. Both cost more per image than the arithmetic once the batch is small,
which it becomes as DeepFool's fooled images leave the working set.

For a network made of affine layers (convolutions, linear layers, evaluation-mode batch norm,
constant shifts and scales), ReLU, max-pooling, global average pooling, flattening and residual
sums, the logits are piecewise linear in the input: at a given input ``x`` the Jacobian is the
chain of the layers' matrices with the ReLU and max-pool selections that ``x`` makes.
:func:`linearize` runs the forward once, keeps those selections for the ``B`` images, and
:meth:`Linearization.vjp` sends ``K`` cotangents per image back through the chain as one batch of
``K * B`` rows: one kernel call per layer, whatever ``K`` is. The products are autograd's to
float round-off: the same ReLU and max-pool selections (zero gradient where a ReLU output is 0,
the max-pool index autograd keeps), and each convolution's input gradient from
``convolution_backward`` or, at stride 1, as the convolution with the flipped kernel.

A model is swept this way when it is a torch.fx graph of exactly these operations: the folded
copies of :func:`robustness.tensors.inference_copy`, which every probe attacks, of the report's
models are. Any other model gets the same interface from autograd, one backward per cotangent.
"""

from __future__ import annotations

import operator
import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

#: A backward rule: (incoming gradient of K*B rows, K, row selection or None, whether the rule may
#: overwrite the incoming gradient) -> gradients of the node's inputs.
_Rule = Callable[[Tensor, int, "Tensor | None", bool], list[tuple[fx.Node, Tensor]]]


class Unsupported(Exception):
    """The traced graph holds an operation the sweep has no rule for."""


class Linearization:
    """The logits of a batch and vector-Jacobian products of them at that batch.

    ``vjp(cotangents)`` takes ``(K, B, num_classes)`` and returns ``(K, B, *x.shape[1:])``: row
    ``[j, i]`` is the input gradient of ``<cotangents[j, i], logits[i]>`` at image ``i``.
    ``restricted(rows)`` is the same for a subset of the images, without another forward.
    ``swept`` says whether products come from one backward sweep of all cotangents (True) or
    from autograd, one backward call per cotangent (False).
    """

    swept: bool = False
    logits: Tensor
    input_shape: tuple[int, ...]
    #: rows of the forward batch this view answers for (None: all of them)
    rows: Tensor | None = None

    def vjp(self, cotangents: Tensor) -> Tensor:
        raise NotImplementedError

    def restricted(self, rows: Tensor) -> "Linearization":
        """A view for the images ``rows`` (a mask or indices into this view's images)."""
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.rows = _index(rows) if self.rows is None else self.rows[rows]
        view.logits = self.logits[rows]
        return view


def linearize(model: nn.Module, x: Tensor) -> Linearization:
    """The forward of ``model`` at ``x`` (evaluation mode), ready for vector-Jacobian products.

    Swept where the model is an fx graph of supported operations, from autograd otherwise; both
    give the same products to float round-off.
    """
    graph = _traced(model)
    if graph is not None:
        try:
            return _SweptLinearization(graph, x)
        except Unsupported:
            _UNSUPPORTED.add(model)  # an operation seen only at run time (e.g. a shape it cannot pool)
    return _AutogradLinearization(model, x)


# ---------------------------------------------------------------------------------------------
# Autograd: one backward call per cotangent, through one forward graph


class _AutogradLinearization(Linearization):
    def __init__(self, model: nn.Module, x: Tensor) -> None:
        self.model = model
        self.input_shape = tuple(x.shape[1:])
        with torch.enable_grad():
            self.x = x.detach().requires_grad_(True)
            self.graph_logits = model(self.x)
        self.logits = self.graph_logits.detach()
        self.rows = None

    def vjp(self, cotangents: Tensor) -> Tensor:
        _check_cotangents(cotangents, self.logits)
        k = cotangents.shape[0]
        graph = self
        if self.rows is not None:
            dropped = len(self.graph_logits) - len(self.rows)
            # A dropped row still costs its share of every backward call: once the dropped rows
            # outnumber a forward's share of the k backward calls, a fresh forward of the kept
            # rows is cheaper.
            if dropped * k >= len(self.rows):
                graph = _AutogradLinearization(self.model, self.x.detach()[self.rows])
            else:
                full = cotangents.new_zeros(k, *self.graph_logits.shape)
                full[:, self.rows] = cotangents
                cotangents = full
        with torch.enable_grad():
            grads = torch.stack(
                [torch.autograd.grad(graph.graph_logits, graph.x, cotangents[j], retain_graph=True)[0] for j in range(k)]
            )
        return grads[:, self.rows] if graph is self and self.rows is not None else grads


def _index(rows: Tensor) -> Tensor:
    return rows.nonzero().squeeze(1) if rows.dtype == torch.bool else rows


# ---------------------------------------------------------------------------------------------
# One sweep of all cotangents through the traced graph


class _SweptLinearization(Linearization):
    swept = True

    def __init__(self, graph: fx.GraphModule, x: Tensor) -> None:
        self.input_shape = tuple(x.shape[1:])
        self.rules: list[tuple[fx.Node, _Rule]] = []
        self.placeholder: fx.Node | None = None
        self.output: fx.Node | None = None
        with torch.no_grad():
            self.logits = self._forward(graph, x.detach())
        self.rows = None

    def vjp(self, cotangents: Tensor) -> Tensor:
        _check_cotangents(cotangents, self.logits)
        k, b = cotangents.shape[:2]
        grads: dict[fx.Node, Tensor] = {self.output: cotangents.reshape(k * b, *cotangents.shape[2:])}
        # A rule may overwrite its incoming gradient only where that memory was made during this
        # sweep, is held by one node (views included, hence storages) and is dense (an expanded
        # view repeats its elements). The caller's cotangents are never overwritten.
        shared = {_storage(cotangents)}
        for node, rule in reversed(self.rules):
            incoming = grads.pop(node, None)
            if incoming is None:
                continue  # no path from the logits through this node
            writable = _storage(incoming) not in shared and _dense(incoming)
            outputs = rule(incoming, k, self.rows, writable)
            storages = [_storage(grad) for _, grad in outputs]
            if len(set(storages)) < len(storages):
                shared.update(storages)  # one gradient handed to two inputs (a residual sum)
            for source, grad in outputs:
                grads[source] = grads[source] + grad if source in grads else grad
        result = grads.get(self.placeholder)
        if result is None:  # logits that do not depend on the input
            return cotangents.new_zeros(k, b, *self.input_shape)
        return result.reshape(k, b, *self.input_shape)

    def _forward(self, graph: fx.GraphModule, x: Tensor) -> Tensor:
        values: dict[fx.Node, Any] = {}
        varying: set[fx.Node] = set()  # nodes whose value depends on the input
        modules = dict(graph.named_modules())
        for node in graph.graph.nodes:
            if node.op == "placeholder":
                if self.placeholder is not None:
                    raise Unsupported("more than one input")
                self.placeholder = node
                values[node], _ = x, varying.add(node)
            elif node.op == "get_attr":
                values[node] = _attribute(graph, node.target)
            elif node.op == "output":
                (result,) = node.args
                if not isinstance(result, fx.Node) or result not in varying:
                    raise Unsupported("the output is not one tensor computed from the input")
                self.output = result
                return values[result]
            else:
                args = [values[a] if isinstance(a, fx.Node) else a for a in node.args]
                kwargs = {key: values[v] if isinstance(v, fx.Node) else v for key, v in node.kwargs.items()}
                inputs = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node) and a in varying]
                if not inputs:
                    values[node] = _call(node, modules, args, kwargs)  # a constant computed from constants
                    continue
                target = modules[node.target] if node.op == "call_module" else node.target
                values[node], rule = _RULES.get(node.op, _no_rule)(node, target, args, kwargs, varying)
                varying.add(node)
                self.rules.append((node, rule))
        raise Unsupported("the graph has no output")


def _no_rule(node: fx.Node, *_: Any) -> tuple[Tensor, _Rule]:
    raise Unsupported(f"no rule for {node.op} {node.target}")


def _attribute(graph: fx.GraphModule, target: str) -> Any:
    value: Any = graph
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _call(node: fx.Node, modules: dict[str, nn.Module], args: list, kwargs: dict) -> Any:
    if node.op == "call_module":
        return modules[node.target](*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def _check_cotangents(cotangents: Tensor, logits: Tensor) -> None:
    if cotangents.dim() != 3 or cotangents.shape[1:] != logits.shape:
        raise ValueError(f"cotangents must have shape (K, {len(logits)}, {logits.shape[1]}), got {tuple(cotangents.shape)}")


def _storage(t: Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _dense(t: Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _rows(t: Tensor, rows: Tensor | None) -> Tensor:
    return t if rows is None else t[rows]


def _masked(mask: Tensor, source: fx.Node) -> _Rule:
    """The rule of an elementwise selection: each image's gradient times its own 0/1 mask."""

    def rule(g: Tensor, k: int, rows: Tensor | None, writable: bool) -> list[tuple[fx.Node, Tensor]]:
        m = _rows(mask, rows)
        per_image = g.view(k, *m.shape)
        return [(source, (per_image.mul_(m) if writable else per_image * m).view(g.shape))]

    return rule


def _relu(x: Tensor, source: fx.Node) -> tuple[Tensor, _Rule]:
    out = torch.relu(x)
    # relu's output is >= 0, so its sign is the 0/1 mask of where the gradient passes (autograd's too).
    return out, _masked(out.sign(), source)


def _module_rule(node: fx.Node, module: nn.Module, args: list, kwargs: dict, varying: set[fx.Node]) -> tuple[Tensor, _Rule]:
    source = node.args[0]
    if kwargs or len(args) != 1 or not isinstance(source, fx.Node):
        raise Unsupported(f"module {node.target} called with other arguments than one tensor")
    (x,) = args
    kind = type(module)
    if kind in (nn.Identity, nn.Dropout) and not (kind is nn.Dropout and module.training):
        return x, lambda g, k, rows, writable: [(source, g)]
    if kind is nn.ReLU:
        if module.inplace and len(source.users) > 1:
            raise Unsupported("an in-place ReLU whose input is used elsewhere")
        return _relu(x, source)
    if kind is nn.Conv2d and module.padding_mode == "zeros" and isinstance(module.padding, tuple):
        return module(x), _conv_input_gradient(module, tuple(x.shape[1:]), source)
    if kind is nn.Linear:
        return module(x), lambda g, k, rows, writable: [(source, g @ module.weight)]
    if kind in (nn.BatchNorm1d, nn.BatchNorm2d) and not module.training and module.running_var is not None:
        scale = torch.rsqrt(module.running_var + module.eps)
        if module.weight is not None:
            scale = scale * module.weight
        view = scale.view(1, -1, *([1] * (x.dim() - 2)))
        return module(x), lambda g, k, rows, writable: [(source, g * view)]
    if kind is nn.MaxPool2d and not module.return_indices:
        return _max_pool(x, source, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode)
    if kind is nn.AdaptiveAvgPool2d:
        return _global_average(module(x), x, source, module.output_size)
    if kind is nn.Flatten and module.start_dim == 1 and module.end_dim == -1:
        return _flatten(x, source)
    raise Unsupported(f"no rule for module {kind.__name__}")


def _conv_input_gradient(conv: nn.Conv2d, in_shape: tuple[int, ...], source: fx.Node) -> _Rule:
    (kh, kw), (ph, pw), (dh, dw) = conv.kernel_size, conv.padding, conv.dilation
    reach_h, reach_w = dh * (kh - 1) - ph, dw * (kw - 1) - pw
    if conv.stride == (1, 1) and conv.groups == 1 and reach_h >= 0 and reach_w >= 0:
        # With stride 1 the input gradient is the convolution of the gradient with the flipped,
        # transposed kernel: the same products, and oneDNN's forward kernel runs the thin first
        # layers (16 -> 1 channels) 1.6x faster than its backward-data kernel.
        flipped: list[Tensor] = []

        def flipped_rule(g: Tensor, k: int, rows: Tensor | None, writable: bool) -> list[tuple[fx.Node, Tensor]]:
            if not flipped:
                flipped.append(conv.weight.flip(2, 3).transpose(0, 1).contiguous(memory_format=torch.channels_last))
            return [(source, F.conv2d(g, flipped[0], None, 1, (reach_h, reach_w), conv.dilation))]

        return flipped_rule

    def rule(g: Tensor, k: int, rows: Tensor | None, writable: bool) -> list[tuple[fx.Node, Tensor]]:
        size = (g.shape[0], *in_shape)
        return [(source, torch.nn.grad.conv2d_input(size, conv.weight, g, conv.stride, conv.padding, conv.dilation, conv.groups))]

    return rule


def _max_pool(x: Tensor, source: fx.Node, kernel_size: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: bool) -> tuple[Tensor, _Rule]:
    if x.dim() != 4:
        raise Unsupported("max-pooling of other than 4-d tensors")
    out, indices = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True)
    n, c, h, w = x.shape
    # The element each pooled value came from (the index autograd keeps too), as a 0/1 mask.
    chosen = x.new_zeros(n, c, h * w).scatter_(2, indices.flatten(2), 1.0).view(n, c, h, w)
    pairs = [(v, v) if isinstance(v, int) else tuple(v) for v in (kernel_size, stride if stride else kernel_size, padding, dilation)]
    (kh, kw), (sh, sw), padding_pair, dilation_pair = pairs
    tiled = (kh, kw) == (sh, sw) and padding_pair == (0, 0) and dilation_pair == (1, 1) and h % kh == 0 and w % kw == 0
    if tiled:
        # Windows tile the input: the gradient is each pooled value spread over its window, times
        # the mask, one pass in channels-last order (pixel-major, channels fastest).
        oh, ow = h // kh, w // kw
        mask = chosen.permute(0, 2, 3, 1).contiguous().view(n, oh, kh, ow, kw, c)

        def tiled_rule(g: Tensor, k: int, rows: Tensor | None, writable: bool) -> list[tuple[fx.Node, Tensor]]:
            m = _rows(mask, rows)
            spread = g.permute(0, 2, 3, 1).reshape(k, len(m), oh, 1, ow, 1, c) * m
            return [(source, spread.view(g.shape[0], h, w, c).permute(0, 3, 1, 2))]

        return out, tiled_rule
    flat_indices = indices.flatten(2)

    def rule(g: Tensor, k: int, rows: Tensor | None, writable: bool) -> list[tuple[fx.Node, Tensor]]:
        # Overlapping windows may send several pooled values to one element, hence a sum.
        index = _rows(flat_indices, rows).repeat(k, 1, 1)
        grad = g.new_zeros(g.shape[0], c, h * w)
        grad.scatter_add_(2, index, g.reshape(g.shape[0], c, -1))
        return [(source, grad.view(g.shape[0], c, h, w))]

    return out, rule


def _global_average(out: Tensor, x: Tensor, source: fx.Node, output_size: Any) -> tuple[Tensor, _Rule]:
    if x.dim() != 4 or output_size not in (1, (1, 1), [1, 1]):
        raise Unsupported("average pooling to other than one value per channel")
    in_shape = tuple(x.shape[1:])
    count = in_shape[1] * in_shape[2]
    return out, lambda g, k, rows, writable: [(source, (g / count).expand(g.shape[0], *in_shape))]


def _flatten(x: Tensor, source: fx.Node) -> tuple[Tensor, _Rule]:
    in_shape = tuple(x.shape[1:])
    return x.flatten(1), lambda g, k, rows, writable: [(source, g.reshape(g.shape[0], *in_shape))]


def _function_rule(node: fx.Node, function: Any, args: list, kwargs: dict, varying: set[fx.Node]) -> tuple[Tensor, _Rule]:
    arg_nodes = list(node.args)
    is_varying = [isinstance(a, fx.Node) and a in varying for a in arg_nodes]
    if function in (torch.relu, F.relu) and kwargs in ({}, {"inplace": False}) and len(args) == 1:
        return _relu(args[0], arg_nodes[0])
    if function is torch.flatten and not kwargs and args[1:] == [1]:
        return _flatten(args[0], arg_nodes[0])
    if function is F.adaptive_avg_pool2d and not kwargs and len(args) == 2:
        return _global_average(F.adaptive_avg_pool2d(*args), args[0], arg_nodes[0], args[1])
    if function in (operator.add, operator.sub, torch.add) and not kwargs and len(args) == 2:
        a, b = args
        out = function(a, b)
        for value, var in zip(args, is_varying):
            # A varying summand must have the output's shape (no broadcasting over its images),
            # a constant one must not add a batch dimension the input does not have.
            if var and value.shape != out.shape:
                raise Unsupported("a broadcasting sum of varying tensors")
        def sum_rule(g: Tensor, k: int, rows: Tensor | None, writable: bool) -> list[tuple[fx.Node, Tensor]]:
            grads = []
            if is_varying[0]:
                grads.append((arg_nodes[0], g))
            if is_varying[1]:
                grads.append((arg_nodes[1], -g if function is operator.sub else g))
            return grads

        return out, sum_rule
    if function in (operator.truediv, operator.mul, torch.mul) and not kwargs and len(args) == 2 and sum(is_varying) == 1:
        varying_index = is_varying.index(True)
        if function is operator.truediv and varying_index != 0:
            raise Unsupported("division by a varying tensor")
        a, b = args
        out = function(a, b)
        factor = args[1 - varying_index]
        if out.shape != args[varying_index].shape:
            raise Unsupported("a product that broadcasts the varying tensor")
        if torch.is_tensor(factor) and factor.dim() == out.dim() and factor.shape[0] != 1:
            raise Unsupported("a per-image factor")
        if function is operator.truediv:
            return out, lambda g, k, rows, writable: [(arg_nodes[0], g / factor)]
        return out, lambda g, k, rows, writable: [(arg_nodes[varying_index], g * factor)]
    raise Unsupported(f"no rule for function {getattr(function, '__name__', function)}")


def _method_rule(node: fx.Node, method: str, args: list, kwargs: dict, varying: set[fx.Node]) -> tuple[Tensor, _Rule]:
    source = node.args[0]
    if method == "relu" and len(args) == 1 and not kwargs:
        return _function_rule(node, torch.relu, args, kwargs, varying)
    if method == "flatten" and not kwargs and args[1:] == [1]:
        return _flatten(args[0], source)
    raise Unsupported(f"no rule for method {method}")


_RULES: dict[str, Callable[..., tuple[Tensor, _Rule]]] = {"call_module": _module_rule, "call_function": _function_rule, "call_method": _method_rule}


# ---------------------------------------------------------------------------------------------
# Which models are swept

#: Graphs that turned out to hold an operation without a rule, so that they are not tried again.
_UNSUPPORTED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _traced(model: nn.Module) -> fx.GraphModule | None:
    """``model`` when it is an fx graph whose operations all have rules, else None.

    Only graphs are swept, never a model traced here: tracing keeps the tensor operations of a
    forward and drops everything else it does (counters, logging, hooks), which a caller of the
    model itself may rely on. The folded copies every probe attacks are graphs already.
    """
    if isinstance(model, fx.GraphModule) and model not in _UNSUPPORTED and not model.training:
        return model
    return None
