"""One registry for every config group: a component registers itself next to its definition.

    @register("attack", "deepfool")
    class DeepFool: ...

A config node names its component with ``name:``; the other keys are its keyword arguments, and
:func:`build` is the one way to turn a node into an object. Registration happens when the
component's module is imported; each group's package imports its modules explicitly in its
``__init__`` (as torchvision's ``models/__init__.py`` does), so the first look-up in a group
imports that package and finds every component of it.

A component whose options are a dataclass names it when it registers
(``@register("probe", "table1", options=Table1Options)``): :func:`options_of` returns it, so the
config checks build and validate a probe's options without knowing its module.

Probes and reporters are functions rather than classes: ``lookup("probe", name)`` returns the
probe's ``compute(ctx)``, ``lookup("reporter", name)`` the reporter's ``draw(result, out_dir)``.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Mapping, TypeVar

from omegaconf import DictConfig, OmegaConf

from robustness.errors import ConfigError

T = TypeVar("T")

# The package whose modules hold each group's components.
GROUP_PACKAGES = {
    "dataset": "robustness.data",
    "model": "robustness.models",
    "regularizer": "robustness.training",
    "attack": "robustness.attacks",
    "probe": "robustness.probes",
    "reporter": "robustness.reporting",
}

# Keys of a component's config node that are about the component, not options of it:
# `display` (how reports name and draw a regularizer's variant: {title, colour}) and `rehearsal`
# (the values debug=rehearsal sets on the node, beside the shared ones in conf/debug/rehearsal.yaml).
METADATA_KEYS = ("display", "rehearsal")

_TABLES: dict[str, dict[str, Any]] = {group: {} for group in GROUP_PACKAGES}
_OPTIONS: dict[str, dict[str, type]] = {group: {} for group in GROUP_PACKAGES}


def register(group: str, name: str, *, options: type | None = None) -> Callable[[T], T]:
    """Class or function decorator: make ``obj`` the ``name`` option of ``group``.

    options: the dataclass of the component's options, where it has one (probes do).
    """
    if group not in _TABLES:
        raise ValueError(f"unknown config group '{group}' (known: {', '.join(_TABLES)})")

    def decorate(obj: T) -> T:
        table = _TABLES[group]
        if name in table and table[name] is not obj and _qualified(table[name]) != _qualified(obj):
            raise ValueError(f"{group} '{name}' is registered twice: {_qualified(table[name])} and {_qualified(obj)}")
        table[name] = obj
        if options is not None:
            _OPTIONS[group][name] = options
        return obj

    return decorate


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def _discover(group: str) -> None:
    # The package's __init__ imports each of its modules, and so registers its components.
    importlib.import_module(GROUP_PACKAGES[group])


def choices(group: str) -> list[str]:
    """The registered option names of ``group``, sorted."""
    _discover(group)
    return sorted(_TABLES[group])


def lookup(group: str, name: str) -> Any:
    """The object registered as ``name`` in ``group``; an unknown name lists the valid ones."""
    _discover(group)
    table = _TABLES[group]
    if name not in table:
        raise ConfigError(f"unknown {group} '{name}'", f"choose one of: {', '.join(sorted(table))}")
    return table[name]


def options_of(group: str, name: str) -> type | None:
    """The options dataclass ``name`` registered with in ``group``, or None if it named none."""
    lookup(group, name)
    return _OPTIONS[group].get(name)


def split_name(node: DictConfig | Mapping[str, Any], group: str) -> tuple[str, dict[str, Any]]:
    """``(name, the other keys as plain keyword arguments)`` of a group's config node."""
    if isinstance(node, DictConfig):
        data = OmegaConf.to_container(node, resolve=True)
    elif isinstance(node, Mapping):
        data = dict(node)
    else:
        raise ConfigError(f"the {group} config must be a mapping with a 'name' key, got {type(node).__name__}", f"e.g. {group}=<one of the {group} options>")
    if "name" not in data:
        raise ConfigError(f"the {group} config has no 'name' key", f"add 'name: <one of the {group} options>'")
    name = data.pop("name")
    for key in METADATA_KEYS:
        data.pop(key, None)
    return str(name), data  # type: ignore[return-value]


def accepted_options(factory: Any) -> tuple[list[str], bool]:
    """The keyword arguments ``factory`` accepts, and whether it accepts any others too.

    A class whose ``__init__`` passes ``**kwargs`` on to its base accepts the base's parameters
    as well, so the walk continues up the method resolution order until an ``__init__`` without
    ``**kwargs``.
    """
    callables = [cls.__init__ for cls in factory.__mro__ if "__init__" in vars(cls)] if inspect.isclass(factory) else [factory]
    names: list[str] = []
    for function in callables:
        try:
            parameters = inspect.signature(function).parameters
        except (TypeError, ValueError):
            return names, True
        names += [p for p, spec in parameters.items() if p != "self" and spec.kind in (spec.POSITIONAL_OR_KEYWORD, spec.KEYWORD_ONLY) and p not in names]
        if not any(spec.kind is spec.VAR_KEYWORD for spec in parameters.values()):
            return names, False
    return names, True


def build(group: str, node: DictConfig | Mapping[str, Any], /, **context: Any) -> Any:
    """Build the component a config node names: ``factory(**context, **options)``.

    ``context`` holds what the run supplies rather than the config (a dataset's ``info`` for a
    model, the data folder for a dataset). Options are checked against the factory's signature
    before it is called, so an unknown or missing key is a ConfigError naming the valid ones and
    a TypeError raised inside the factory stays the bug it is.
    """
    name, options = split_name(node, group)
    factory = lookup(group, name)
    accepted, open_ended = accepted_options(factory)
    own = [p for p in accepted if p not in context]
    unknown = sorted(set(options) - set(accepted)) if not open_ended else []
    problem = f"unknown option(s) {', '.join(unknown)}" if unknown else None
    if problem is None:
        try:
            inspect.signature(factory).bind(**context, **options)
        except TypeError as exc:
            problem = str(exc)
        except ValueError:  # no signature to check against: let the call decide
            pass
    if problem:
        raise ConfigError(f"bad option for {group} '{name}': {problem}", f"its options are: {', '.join(own) or '(none)'} (see conf/{group}/{name}.yaml)")
    return factory(**context, **options)
