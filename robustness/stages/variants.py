"""Variants: from a name a run asks for (``base``, ``cure@regularizer.lam=8``) to a model in the store.

A variant name is an alias. Its model is found by the fingerprint of the training config that
produces it: experiment ``train`` with the overrides the run's recipe lists for the variant
(``recipe.variants``, conf/recipe/), composed for this run's dataset, model and seed, plus the
overrides after ``@``. So a probe never loads weights that
were trained with other options, and two trainings with different configs never share an entry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig, open_dict

from robustness import fingerprint
from robustness.data.base import ImageDataModule
from robustness.errors import ConfigError, StoreError
from robustness.models import check_node, identity_of, zoo
from robustness.registry import build, choices, split_name
from robustness.stages.common import apply_debug, compose_experiment, inherited, make_datamodule, resolve_path, store_for, to_python
from robustness.store import ModelStore

log = logging.getLogger("robustness")

# Nodes of the run a variant's training config takes over as they are: where things go and how
# they are logged never change what is trained (``seed`` does, and is taken on purpose).
_TAKEN_FROM_RUN = ("paths", "logger", "store", "debug")


@dataclass
class Variant:
    """A variant resolved for one run."""

    alias: str         # as asked for, e.g. 'cure@regularizer.lam=8'
    variant: str       # the regularizer's variant, e.g. 'cure'
    config: DictConfig  # the composed config that trains it
    identity: dict[str, Any]
    key: str           # the fingerprint of ``identity``: its entry in the store
    parent: "Variant | None"


def recipe_settings(cfg: DictConfig, variant: str) -> list[str]:
    """The overrides that train ``variant`` in the run's recipe (``recipe.variants``); a variant the
    recipe does not list trains with ``regularizer=<variant>`` and that regularizer's defaults."""
    recipe = cfg.get("recipe") or {}
    listed = recipe.get("variants") or {}
    if variant in listed:
        return [str(o) for o in listed[variant]]
    if variant in choices("regularizer"):
        return [f"regularizer={variant}"]
    raise ConfigError(
        f"no recipe trains variant '{variant}': recipe {recipe.get('name')} lists {', '.join(listed) or 'none'}, "
        f"and there is no regularizer={variant}",
        f"pick variants among those, or add `{variant}: [regularizer=..., ...]` under recipe.variants (conf/recipe/{recipe.get('name')}.yaml)",
    )


def training_config(cfg: DictConfig, name: str, overrides: Sequence[str] = (), own_overrides: Sequence[str] | None = None) -> DictConfig:
    """The composed training config of variant ``name`` for the run ``cfg``: experiment ``train``
    with the run's recipe, dataset and model, the recipe's overrides for the variant, then

    - ``own_overrides`` (a ``task=train`` run's whole command line), or else
    - the overrides of ``overrides`` a variant inherits, ``store.train_overrides`` and the
      overrides after ``@`` in ``name`` (a variant another run needs).
    """
    variant, _, extra = name.partition("@")
    choice = [f"recipe={cfg.recipe.name}", f"dataset={cfg.dataset.name}", f"model={cfg.model.name}"]
    after = list(own_overrides) if own_overrides is not None else \
        [*inherited(overrides), *cfg.store.train_overrides, *(extra.split(",") if extra else [])]
    child = compose_experiment("train", [*choice, *recipe_settings(cfg, variant), *after])
    with open_dict(child):
        for key in _TAKEN_FROM_RUN:
            if key in cfg:
                child[key] = cfg[key]
        child.seed = cfg.seed
        child.trainer.accelerator = cfg.trainer.accelerator
    apply_debug(child)
    if child.regularizer.variant != variant:
        raise ConfigError(
            f"recipe {cfg.recipe.name} trains variant '{variant}' with regularizer={child.regularizer.name}, which trains variant '{child.regularizer.variant}'",
            f"make recipe.variants.{variant} start with a regularizer that trains '{variant}'",
        )
    return child


def resolve(cfg: DictConfig, name: str, overrides: Sequence[str] = (), _seen: tuple[str, ...] = (),
            own_overrides: Sequence[str] | None = None) -> Variant:
    """Variant ``name`` for run ``cfg``: its training config, identity and fingerprint (parents first)."""
    if name in _seen:
        raise ConfigError(f"variants start from each other in a circle: {' -> '.join([*_seen, name])}", "fix the regularizers' init_from")
    child = training_config(cfg, name, overrides, own_overrides)
    return of_training_config(child, overrides, name, _seen)


def of_training_config(child: DictConfig, overrides: Sequence[str] = (), name: str | None = None, _seen: tuple[str, ...] = ()) -> Variant:
    """The variant a composed training config trains (its parent resolved from ``init_from``)."""
    variant = str(child.regularizer.variant)
    parent = None
    init_from = child.regularizer.get("init_from")
    if init_from:
        parent = resolve(child, str(init_from), overrides, (*_seen, name or variant))
    identity = fingerprint.training_identity(
        {key: to_python(child[key]) for key in ("dataset", "model", "regularizer", "optim", "trainer", "seed")},
        parent.key if parent else None,
        data=data_identity(child),
        model_files=identity_of(child.model),
    )
    return Variant(name or variant, variant, child, identity, fingerprint.of_config(identity), parent)


def variant_style(v: Variant) -> dict[str, str]:
    """How reports name and draw ``v``: its regularizer's ``display`` title and colour, the
    overrides after ``@`` added to the title (and no fixed colour, so that siblings differ); a
    published model by its own name."""
    if "external" in v.identity:
        return {"title": v.alias}
    display = to_python(v.config.regularizer.get("display")) or {}
    title = str(display.get("title") or v.variant)
    extra = v.alias.partition("@")[2]
    if extra:
        return {"title": f"{title} ({extra})"}
    return {"title": title, **({"colour": str(display["colour"])} if display.get("colour") else {})}


# ---- published models (external variants) -----------------------------------------------


def variant_node(model_cfg: DictConfig | Mapping[str, Any], variant: str) -> dict[str, Any]:
    """The model node of one variant of an external model: ``model_cfg`` without its
    ``variants`` table, updated with that variant's entry of the table."""
    name, options = split_name(model_cfg, "model")
    table = options.pop("variants", None) or {}
    if variant not in table:
        known = ", ".join(table) or "(none)"
        raise ConfigError(
            f"variant '{variant}' is not one of model={name}'s variants ({known})",
            f"list one of those in variants=[...], or define it: '+model.variants.{variant}={{{_example_override(name)}}}'",
        )
    override = dict(table[variant] or {})
    if override.get("name", name) != name:
        raise ConfigError(f"variant '{variant}' of model={name} sets name '{override['name']}'", f"drop 'name' from model.variants.{variant}")
    override.pop("name", None)
    return {"name": name, **options, **override}


def external_variant(cfg: DictConfig | Mapping[str, Any], variant: str) -> dict[str, Any] | None:
    """The model node of ``variant`` when it is a published model, None when the store trains it.

    A variant is external when the run's model is external (its ``model.variants`` table names
    it; see :func:`variant_node`) or when a top-level ``external_variants`` table holds a full
    model node for it (``{name: robustbench, entry: ...}``), which lets one probe compare
    variants trained here with published ones. A node without ``models_dir`` gets
    ``paths.models_dir``.
    """
    table = cfg.get("external_variants") or {}
    if variant in table:
        name, options = split_name(table[variant], "model")
        if name not in zoo.VARIANT_MODELS:
            raise ConfigError(
                f"external_variants.{variant} names model '{name}', which is not a published model",
                f"set its name to one of: {', '.join(zoo.VARIANT_MODELS)}",
            )
        node = {"name": name, **options}
    elif zoo.is_external(cfg["model"]):
        node = variant_node(cfg["model"], variant)
    else:
        return None
    models_dir = (cfg.get("paths") or {}).get("models_dir")
    if "models_dir" not in node and models_dir is not None:
        node["models_dir"] = str(models_dir)
    return node


def _example_override(name: str) -> str:
    return "entry:Standard,threat_model:L2" if name == "robustbench" else "arch:resnet18,weights:my_weights.pt"


def check_imported_models(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Before any work: every model=import node the run uses (its model, and the external
    variants a probe lists) names a callable that can be imported and a weights file that exists."""
    table = cfg.get("external_variants") or {}
    listed = [str(v) for v in cfg.get("variants") or []] if cfg.get("task") == "probe" else []
    for node in [cfg["model"], *(external_variant(cfg, v) for v in listed if v in table)]:
        check_node(node)


# Data identities of this process, by dataset config and folder: a report resolves the same
# variants once per section, and a folder's listing costs a second per 100,000 images.
_DATA_IDENTITIES: dict[str, dict[str, Any]] = {}


def data_identity(cfg: DictConfig) -> dict[str, Any]:
    """The content identity of the data ``cfg``'s dataset serves (see ``ImageDataModule.data_identity``)."""
    key = fingerprint.of_config({"dataset": to_python(cfg.dataset), "data_dir": str(resolve_path(cfg.paths.data_dir))})
    if key not in _DATA_IDENTITIES:
        _DATA_IDENTITIES[key] = make_datamodule(cfg, setup=False).data_identity()
    return dict(_DATA_IDENTITIES[key])


def missing_model_error(store: ModelStore, wanted: Variant, train_command: str) -> StoreError:
    """The store lacks ``wanted``: say which options differ from the model its alias points at."""
    aliased = store.aliases().get(wanted.alias) or store.aliases().get(wanted.variant)
    detail = ""
    if aliased and store.has(aliased):
        try:
            saved = store.meta(aliased).get("identity") or {}
        except StoreError:
            saved = {}
        differences = fingerprint.identity_differences(saved, wanted.identity)
        if differences:
            shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
            detail = f". The store's '{wanted.variant}' was trained with other options: {shown}"
    return StoreError(
        f"the store has no '{wanted.alias}' model trained with this config for {store.dataset}/{store.model} "
        f"(fingerprint {wanted.key[:16]}..., looked in {store.entry_dir(wanted.key)}){detail}",
        f"train it with: {train_command}, or allow it here with store.train_missing=true",
    )


def train_command(v: Variant) -> str:
    cfg = v.config
    extra = v.alias.partition("@")[2]
    return " ".join(filter(None, [
        "python -m robustness", "experiment=train", f"recipe={cfg.recipe.name}", f"regularizer={cfg.regularizer.name}",
        f"dataset={cfg.dataset.name}", f"model={cfg.model.name}",
        f"seed={cfg.seed}", f"paths.artifacts_dir={cfg.paths.artifacts_dir}", " ".join(extra.split(",")) if extra else "",
    ]))


def ensure_trained(v: Variant, output_dir: Path, overrides: Sequence[str] = ()) -> None:
    """Make sure the store holds ``v``: train it (under the entry's lock) where allowed, else explain."""
    from robustness.stages.train import train_variant

    cfg = v.config
    store = store_for(cfg, str(cfg.dataset.name))
    if store.has(v.key):
        return
    if not cfg.store.train_missing:
        raise missing_model_error(store, v, train_command(v))
    log.info("variant '%s' is not in the store for this config: training it with experiment=%s", v.alias, cfg.experiment_name)
    train_variant(v, output_dir / f"train_{v.alias.replace('/', '_')}", overrides)


def weights_digest(v: Variant, store: ModelStore) -> str:
    """The sha256 of the weights a variant's model was loaded from."""
    if "external" in v.identity:
        return str(v.identity["external"]["weights_sha256"])
    return str(store.meta(v.key)["weights_sha256"])


def split_problem(v: Variant, probe_cfg: DictConfig, store: ModelStore) -> str | None:
    """Why the images a probe reads are not from the split ``v`` was trained with, or None."""
    meta = store.meta(v.key)
    trained = (meta.get("identity") or {}).get("dataset")
    wanted = fingerprint.dataset_identity(to_python(probe_cfg.dataset), int(probe_cfg.seed))
    if trained is None:
        return None
    a, b = fingerprint.split_identity(trained), fingerprint.split_identity(wanted)
    if a == b:
        return None
    differences = fingerprint.identity_differences(a, b)
    return "; ".join(d.replace("in the store", "when trained").replace("asked for", "for this probe") for d in differences[:3])


def resolve_variants(cfg: DictConfig, datamodule: ImageDataModule, output_dir: Path, device: torch.device,
                     overrides: Sequence[str] = ()) -> tuple[dict[str, Variant], dict[str, torch.nn.Module]]:
    """Every variant ``cfg.variants`` asks for, trained first where missing and allowed; and the
    published ones' models, in eval mode (a published model is known by its weights, so it is loaded
    here). A stored variant's weights are loaded by :func:`load_resolved` only where needed: a probe
    whose result is kept needs none."""
    names = [str(v) for v in cfg.variants]
    if not names:
        raise ConfigError("no model variants to probe", "set variants=[base,adversarial,cure] (or a subset)")
    published: dict[str, torch.nn.Module] = {}
    resolved: dict[str, Variant] = {}
    store = store_for(cfg, datamodule.info.name)
    for name in names:
        node = external_variant(cfg, name)
        if node is not None:  # a published model: loaded from its own file, never trained here
            model = build("model", node, info=datamodule.info)
            source = zoo.external_source(node, datamodule.info, model)
            identity = {"external": source, "model": node}
            v = Variant(name, name, cfg, identity, fingerprint.of_config(identity), None)
            store.record_external(v.key, name, source)
            published[name] = model.to(device).eval()
            resolved[name] = v
            continue
        v = resolve(cfg, name, overrides)
        ensure_trained(v, output_dir, overrides)
        problem = split_problem(v, cfg, store)
        if problem:
            raise ConfigError(
                f"variant '{name}' was trained on another split of {datamodule.info.name} than this probe reads ({problem}), "
                "so its 'test' images could be training images",
                "probe with the seed and dataset options the variant was trained with",
            )
        resolved[name] = v
    return resolved, published


def load_resolved(variants: dict[str, Variant], published: dict[str, torch.nn.Module], datamodule: ImageDataModule,
                  store: ModelStore, device: torch.device) -> dict[str, torch.nn.Module]:
    """The models of :func:`resolve_variants`' variants (stored ones from ``store``), in its order and in eval mode."""
    models: dict[str, torch.nn.Module] = {}
    for name, v in variants.items():
        if name in published:
            models[name] = published[name]
            continue
        # Built as it was trained: a variant's experiment may set options of its own.
        model = build("model", v.config.model, info=datamodule.info)
        store.load_into(v.key, model, datamodule.info, to_python(v.config.model), what=f"the '{name}' weights")
        models[name] = model.to(device).eval()
    return models
