"""The one source of defaults: the YAML file of each config group option, ``conf/<group>/<name>.yaml``.

The command line composes these files with Hydra; the Python API reads the same files here, so
both start from the same values. An experiment (``experiments/<name>.yaml``) sets its own values
on top for the command line only: ``experiment=table1_curvature`` probes 100 images because
that experiment says so, and ``robustness.table1(...)`` takes ``conf/probe/table1.yaml``.

Only what the groups' own files use is understood: plain values, interpolations that resolve by
themselves (``${oc.env:...}``), and a ``defaults:`` list naming other options of the same group
(``conf/probe/table1.yaml`` starts from ``hessian_norm`` and ``min_perturbation``), merged in
order and overlaid by the file's own keys, as Hydra merges them.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from robustness.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def choices(group: str) -> list[str]:
    """The options of a config group: the YAML files in ``conf/<group>/``."""
    return sorted(path.stem for path in (CONF_DIR / group).glob("*.yaml"))


def group_defaults(group: str, name: str) -> dict[str, Any]:
    """``conf/<group>/<name>.yaml`` as plain Python values (a fresh copy each call)."""
    return OmegaConf.to_container(_composed(group, name), resolve=True)  # type: ignore[return-value]


@lru_cache(maxsize=None)
def _composed(group: str, name: str) -> DictConfig:
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown {group} '{name}'", f"choose one of: {', '.join(choices(group))} (files in {CONF_DIR / group})")
    own = OmegaConf.load(path)
    if not isinstance(own, DictConfig):
        raise ConfigError(f"{path} does not hold a mapping of options", "restore the file from the repository")
    entries = own.pop("defaults", [])
    merged = OmegaConf.create()
    placed_self = False
    for entry in entries if isinstance(entries, ListConfig) else []:
        if entry == "_self_":
            merged = OmegaConf.merge(merged, own)
            placed_self = True
        elif isinstance(entry, str):
            merged = OmegaConf.merge(merged, _composed(group, entry))
        else:
            raise ConfigError(f"{path}: defaults entry {entry!r} is not an option of the same group", "list other files of conf/<group>/ by name")
    # Hydra places a config's own keys last when its defaults list does not say where.
    return OmegaConf.merge(merged, own) if not placed_self else merged


def root_defaults() -> dict[str, Any]:
    """``conf/config.yaml``'s own keys (seed, optim, ...) and the option each group defaults to."""
    root = OmegaConf.load(CONF_DIR / "config.yaml")
    chosen = {}
    for entry in root.get("defaults", []):
        if isinstance(entry, DictConfig):
            chosen.update({str(k): v for k, v in entry.items()})
    values = {key: root[key] for key in ("seed",)}
    return {"choices": chosen, **values}


def default_choice(group: str) -> str:
    """The option ``conf/config.yaml`` picks for ``group`` when no experiment says otherwise."""
    choice = root_defaults()["choices"].get(group)
    if not isinstance(choice, str):
        raise ConfigError(f"conf/config.yaml picks no default {group}", f"name one, e.g. {group}={choices(group)[0]}")
    return choice


def default_seed() -> int:
    """The run seed of ``conf/config.yaml``."""
    return int(root_defaults()["seed"])
