"""``model=import``: any architecture, named by where it is defined.

    model=import model.target=package.module:callable 'model.kwargs={width: 64}' [model.weights=FILE]

``target`` names a callable (a class or a function; ``module:Outer.attr`` reaches into a class or
object) that returns a ``torch.nn.Module`` mapping images to one row of logits each. The module is
imported as Python would import it, so ``package`` must be installed or on ``PYTHONPATH``.

The callable is called with ``kwargs``, and with two facts of the dataset when its signature has a
parameter of that name and ``kwargs`` does not set it:

- ``num_classes``: the dataset's number of classes;
- ``in_channels``: the images' number of channels.

Only named parameters receive them: a ``**kwargs`` catch-all gets neither, since it may hand them
on to something that refuses them.

``Normalize(mean, std)`` goes in front of the network (null: the dataset's statistics), so like
every model here it takes pixels in [0, 1]; a network that takes [0, 1] pixels as they are gets
``mean: [0, 0, 0]`` and ``std: [1, 1, 1]`` (one value per channel).

``weights``: optional, a state_dict of the network the callable returns
(``torch.save(net.state_dict(), FILE)``; DataParallel's ``module.`` prefix and a ``{"state_dict":
...}`` wrapper are undone), loaded with ``torch.load(weights_only=True)`` and checked like the
store's own weights: every key with its shape, no NaN or infinite value (a file that holds
pickled objects loads only with ``allow_unpickling=true``). Relative paths are taken inside
``paths.models_dir``. Without weights the network starts from its own
initialisation, drawn after the run's seed.

Such a model trains with every regularizer, like our own (its fingerprint holds the target, the
kwargs and, through :func:`robustness.models.identity_of`, the weights file's SHA-256), and with
weights it can be probed as it is, beside trained variants:
``'+external_variants.mine={name: import, target: package.module:Net, weights: mine.pt}'``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import traceback
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from omegaconf import DictConfig
from torch import nn

from robustness.data.base import DatasetInfo, content_digest
from robustness.errors import ConfigError, StoreError
from robustness.models.normalize import Normalize, PixelClassifier
from robustness.models.zoo import _normalisation, check_finite, check_fits, find_state_dict, read_checkpoint
from robustness.registry import register, split_name
from robustness.store import fit_state

# Facts of the dataset handed to a callable whose signature names them.
DATASET_ARGUMENTS = ("num_classes", "in_channels")
_EXAMPLE = "model.target=my_package.my_module:MyNet"


def parse_target(target: Any) -> tuple[str, list[str]]:
    """``'package.module:Name.attr'`` as ``('package.module', ['Name', 'attr'])``; a ConfigError
    saying what a target looks like for anything else."""
    if not target:
        raise ConfigError("model=import needs model.target, the callable that builds the network",
                          f"e.g. {_EXAMPLE} (a class or function returning a torch.nn.Module)")
    text = str(target).strip()
    module, colon, attribute = text.partition(":")
    parts = attribute.split(".") if colon else []
    if not colon or not module or not all(p.isidentifier() for p in parts) or not all(p.isidentifier() for p in module.split(".")):
        raise ConfigError(f"model.target '{text}' is not of the form package.module:callable",
                          f"name the module, a colon, then the callable in it: {_EXAMPLE} (or module:Outer.inner)")
    return module, parts


def resolve_target(target: Any) -> Callable[..., Any]:
    """The callable ``target`` names, imported; a ConfigError naming what is missing otherwise."""
    module_name, parts = parse_target(target)
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(
                f"model.target '{target}': no module named '{exc.name}' can be imported",
                f"install the package that holds it, or put the folder above '{module_name.split('.')[0]}' on PYTHONPATH "
                f"(this run searches: the working directory {Path.cwd()}, PYTHONPATH and the installed packages)",
            ) from None
        raise ConfigError(
            f"model.target '{target}': importing '{module_name}' needs the module '{exc.name}', which is not installed",
            f"install it (pip install {str(exc.name).split('.')[0]}), or remove that import from {module_name}",
        ) from None
    except Exception as exc:  # noqa: BLE001 - the user's module may fail on import in any way
        raise ConfigError(f"model.target '{target}': importing '{module_name}' failed: {_what_failed(exc)}",
                          f"fix the module; `python -c 'import {module_name}'` shows the whole traceback") from None
    reached = module_name
    for part in parts:
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.6)
            raise ConfigError(
                f"model.target '{target}': '{reached}' has no attribute '{part}'",
                f"did you mean {', '.join(f'{reached}:{c}' if reached == module_name else f'{reached}.{c}' for c in close)}?"
                if close else f"it defines: {', '.join(names[:20]) or '(nothing public)'}",
            )
        obj = getattr(obj, part)
        reached = f"{reached}:{part}" if reached == module_name else f"{reached}.{part}"
    if not callable(obj):
        raise ConfigError(f"model.target '{target}' is a {type(obj).__name__}, not a class or function", "name the class or function that builds the network")
    return obj


def _what_failed(exc: BaseException) -> str:
    """``Type: message (file:line)`` of an exception raised in a user's code, at its deepest frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" ({frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    message = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {message}{where}"


def call_arguments(factory: Callable[..., Any], kwargs: Mapping[str, Any], info: DatasetInfo) -> dict[str, Any]:
    """``kwargs`` plus the dataset facts (:data:`DATASET_ARGUMENTS`) the factory names and ``kwargs`` lacks."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no signature to read: pass kwargs alone
        return dict(kwargs)
    named = {p for p, spec in parameters.items() if spec.kind in (spec.POSITIONAL_OR_KEYWORD, spec.KEYWORD_ONLY)}
    facts = {"num_classes": info.num_classes, "in_channels": info.in_channels}
    return {**{k: v for k, v in facts.items() if k in named and k not in kwargs}, **kwargs}


def build_network(target: Any, kwargs: Mapping[str, Any], info: DatasetInfo) -> nn.Module:
    """Call ``target`` (checked to accept the arguments, and to return a module) for ``info``."""
    factory = resolve_target(target)
    arguments = call_arguments(factory, kwargs, info)
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        try:
            signature.bind(**arguments)
        except TypeError as exc:
            raise ConfigError(
                f"model.target '{target}' cannot be called with {_shown(arguments)}: {exc}",
                f"its parameters are {signature}; set the others in 'model.kwargs={{name: value, ...}}'",
            ) from None
    try:
        net = factory(**arguments)
    except Exception as exc:  # noqa: BLE001 - the user's constructor may fail in any way
        raise ConfigError(
            f"model.target '{target}' raised {_what_failed(exc)} when called with {_shown(arguments)}",
            "fix the arguments in model.kwargs, or the constructor; calling it in Python shows the whole traceback",
        ) from None
    if not isinstance(net, nn.Module):
        raise ConfigError(f"model.target '{target}' returned a {type(net).__module__}.{type(net).__qualname__}, not a torch.nn.Module",
                          "name a class derived from torch.nn.Module, or a function that returns an instance of one")
    return net


def _shown(arguments: Mapping[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={v!r}" for k, v in arguments.items()) + ")" if arguments else "no arguments"


def weights_path(weights: str | Path, models_dir: str | Path) -> Path:
    """A weights file's absolute path: relative paths are taken inside ``models_dir``; it must exist."""
    path = Path(str(weights)).expanduser()
    path = (path if path.is_absolute() else Path(str(models_dir)).expanduser() / path).resolve()
    if not path.is_file():
        raise StoreError(f"the weights file {path} does not exist", "fix model.weights (relative paths are taken inside paths.models_dir)")
    return path


@register("model", "import")
def imported_model(
    info: DatasetInfo,
    target: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
    weights: str | Path | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    models_dir: str | Path = "models",
    allow_unpickling: bool = False,
) -> PixelClassifier:
    """The network ``target(**kwargs)`` builds, behind ``Normalize(mean, std)``, with ``weights`` loaded (see the module docstring)."""
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ConfigError(f"model.kwargs must be a mapping of argument names to values, got {kwargs!r}", "e.g. 'model.kwargs={width: 64}'")
    mean, std = _normalisation(info, mean, std)
    net = build_network(target, dict(kwargs or {}), info)
    label = f"the network of model.target '{target}'"
    check_fits(net, info, label)
    model = PixelClassifier(Normalize(mean, std), net)
    if weights:
        path = weights_path(weights, models_dir)
        what = f"the weights {path}"
        checkpoint, digest = read_checkpoint(path, what, allow_unpickling)
        state = find_state_dict(checkpoint, net.state_dict(), what)
        check_finite(state, what)
        try:
            fit_state(net, state, what)
        except StoreError as exc:
            raise ConfigError(exc.message, f"use weights saved from {target} with these kwargs: torch.save(net.state_dict(), FILE)") from None
        model.loaded_weights = {"weights": str(path), "weights_sha256": digest}
    return model


def imported_source(options: Mapping[str, Any], info: DatasetInfo) -> dict[str, Any]:
    """What the store records for a model=import variant it did not train."""
    if not options.get("weights"):
        raise ConfigError(f"a model=import variant ({options.get('target')}) is probed as it is, so it needs its weights file",
                          "set weights: FILE in its external_variants entry, or list a trained variant instead")
    path = weights_path(options["weights"], options.get("models_dir", "models"))
    mean, std = _normalisation(info, options.get("mean"), options.get("std"))
    return {
        "kind": "import",
        "source": f"{options.get('target')} with weights {path}",
        "target": str(options.get("target")),
        "kwargs": dict(options.get("kwargs") or {}),
        "mean": list(mean),
        "std": list(std),
        "weights": str(path),
        "weights_sha256": content_digest(path),
    }


def identity_of(model_node: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """What a store identity must add for a model beyond its config node: the SHA-256 of the
    weights file a model=import or model=torchvision network starts from (``{"weights_sha256": ...}``),
    so that another file at the same path never passes for the same model; ``{}`` for a model its
    config alone determines (and for model=robustbench, whose zoo file's digest the store's
    record of the variant holds)."""
    name, options = split_name(model_node, "model")
    if name in ("import", "torchvision") and options.get("weights"):
        return {"weights_sha256": content_digest(weights_path(options["weights"], options.get("models_dir", "models")))}
    return {}


def check_node(node: DictConfig | Mapping[str, Any]) -> None:
    """Before any work: a model=import node names a callable that can be imported, and a weights
    file that exists. Whether the callable returns a module that fits the data, and whether the
    weights fit it, is known only with the dataset's shape; the builder checks those when it
    first builds the model, before training or probing."""
    name, options = split_name(node, "model")
    if name != "import":
        return
    resolve_target(options.get("target"))
    if options.get("weights"):
        weights_path(options["weights"], options.get("models_dir", "models"))
