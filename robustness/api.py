"""The Python API: the framework as a library, for your own models and images.

Every name here is re-exported from ``robustness`` (``robustness.hessian_norm(model, x, y)``) and
listed, with an example, in ``docs/API.md``. The probe functions are the ones the command line's
stages call, so both compute the same numbers; their defaults are the YAML files of ``conf/``, the
same the command line starts from (an experiment in ``experiments/`` sets its own values on top,
for the command line only).

Bad input (tensors of the wrong shape, pixels outside [0, 1], a model in training mode, an
unknown option) raises :class:`~robustness.errors.InputError` or
:class:`~robustness.errors.ConfigError`, whose text says what to change.
"""

from __future__ import annotations

import datetime as _datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from robustness.data.base import DatasetInfo
from robustness.errors import ConfigError, InputError, StoreError
from robustness.probes.base import ProbeResult, TrainingRecord, text_table
from robustness.probes.boundary_plane import boundary_plane
from robustness.probes.curvature_profile import curvature_profile
from robustness.probes.defaults import default_seed, group_defaults
from robustness.probes.hessian_norm import hessian_norm
from robustness.probes.min_perturbation import min_perturbation
from robustness.probes.path_connectivity import path_search
from robustness.probes.perceptual import hue_sweep
from robustness.probes.random_plane import random_plane
from robustness.probes.robust_accuracy import robust_accuracy
from robustness.probes.table1 import table1
from robustness.probes.training_shift import training_shift
from robustness.registry import build
from robustness.store import ALIASES_FILE, ModelStore

__all__ = [
    "ProbeResult",
    "StoredVariant",
    "TrainingRecord",
    "boundary_plane",
    "curvature_profile",
    "defaults",
    "hessian_norm",
    "hue_sweep",
    "list_variants",
    "load_data",
    "load_model",
    "min_perturbation",
    "path_search",
    "random_plane",
    "robust_accuracy",
    "table1",
    "training_shift",
]


def defaults(group: str, name: str) -> dict[str, Any]:
    """The defaults of a config group option: ``conf/<group>/<name>.yaml`` as a dict.

    ``defaults("probe", "hessian_norm")`` are the options ``robustness.hessian_norm`` starts from.
    """
    return group_defaults(group, name)


# ---------------------------------------------------------------- the model store


@dataclass(frozen=True)
class StoredVariant:
    """One model in the store, as :func:`list_variants` lists it."""

    alias: str
    fingerprint: str
    dataset: str
    model: str
    clean_accuracy: float
    date: str

    def __str__(self) -> str:
        return text_table([self.row()])

    def row(self) -> dict[str, Any]:
        return {"alias": self.alias, "fingerprint": self.fingerprint[:12], "dataset": self.dataset, "model": self.model,
                "clean_accuracy": self.clean_accuracy, "date": self.date}


class VariantList(list):
    """The stored variants: a list of :class:`StoredVariant` that prints as a table."""

    def __str__(self) -> str:
        return text_table([variant.row() for variant in self], limit=len(self) or 1)

    def __repr__(self) -> str:
        return str(self)


def _store_root(store: str | Path) -> Path:
    if not isinstance(store, (str, Path)):
        raise InputError(f"store must be a folder path, got {type(store).__name__}", "e.g. store='artifacts' (the CLI's paths.artifacts_dir)")
    return Path(store).expanduser().resolve()


def _saved_at(version: Path | None) -> str:
    """When a version folder was saved: its name carries the time (``v-YYYYmmdd-HHMMSS-...``)."""
    if version is None:
        return ""
    parts = version.name.split("-")
    try:
        return _datetime.datetime.strptime(f"{parts[1]}{parts[2]}", "%Y%m%d%H%M%S").strftime("%Y-%m-%d %H:%M:%S")
    except (IndexError, ValueError):
        return _datetime.datetime.fromtimestamp(version.stat().st_mtime).strftime("%Y-%m-%d %H:%M:%S")


def list_variants(store: str | Path = "artifacts") -> VariantList:
    """Every model the store holds under an alias: alias, fingerprint, dataset, model, clean (test)
    accuracy and the date it was saved; printed, a table.

    store: the store's folder (the command line's ``paths.artifacts_dir``, ``artifacts`` by default).
    """
    root = _store_root(store)
    found = VariantList()
    for aliases_file in sorted(root.glob(f"*/*/{ALIASES_FILE}")):
        dataset, model = aliases_file.parent.parent.name, aliases_file.parent.name
        entries = ModelStore(root, dataset, model)
        for alias, key in sorted(entries.aliases().items()):
            version = entries.version_dir(key)
            if version is None:  # a published model the store only records, or a damaged entry
                continue
            accuracy = entries.metrics(key).get("test/acc")
            found.append(StoredVariant(alias, key, dataset, model, float("nan") if accuracy is None else float(accuracy), _saved_at(version)))
    return found


def _model_folders(root: Path, dataset: str, variant: str) -> list[str]:
    """The model folders of ``dataset`` whose aliases name ``variant``."""
    return [folder.name for folder in sorted((root / dataset).iterdir()) if folder.is_dir() and variant in ModelStore(root, dataset, folder.name).aliases()]


def load_model(variant: str, *, dataset: str, model: str | None = None, store: str | Path = "artifacts") -> nn.Module:
    """The stored model a variant name stands for, built and loaded, in eval mode.

    variant: an alias of the store (``base``, ``cure@regularizer.lam=8``; :func:`list_variants` lists them)
    dataset: the dataset it was trained on (``digits``)
    model:   the model config's name (``smallcnn``); None finds the one folder that holds the alias
    store:   the store's folder (the command line's ``paths.artifacts_dir``)
    """
    root = _store_root(store)
    if not (root / dataset).is_dir():
        held = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise StoreError(f"the store {root} holds no models for dataset '{dataset}'" + (f" (it has: {', '.join(held)})" if held else " (it is empty or missing)"),
                         "train one with: python -m robustness experiment=train ..., or pass store= the folder your runs used (paths.artifacts_dir)")
    if model is None:
        candidates = _model_folders(root, dataset, variant)
        if len(candidates) > 1:
            raise ConfigError(f"variant '{variant}' of {dataset} is stored for several models: {', '.join(candidates)}", f"pick one with model='{candidates[0]}'")
        model = candidates[0] if candidates else None
    entries = ModelStore(root, dataset, model) if model is not None else None
    aliases = entries.aliases() if entries is not None else {}
    if variant not in aliases:
        stored = sorted({v.alias for v in list_variants(root) if v.dataset == dataset and (model is None or v.model == model)})
        raise StoreError(f"the store {root} has no variant '{variant}' for {dataset}" + (f"/{model}" if model else ""),
                         f"stored variants: {', '.join(stored)}" if stored else "train it first (python -m robustness experiment=train ...)")
    key = aliases[variant]
    if not entries.has(key):
        raise StoreError(f"variant '{variant}' of {dataset}/{model} names no saved weights (a published model the store only records, or an interrupted save)",
                         "load a published model with its own loader; train a missing one again")
    meta = entries.meta(key)
    saved = meta["dataset"]
    info = DatasetInfo(name=str(saved["name"]), num_classes=int(saved["num_classes"]), image_shape=tuple(saved["image_shape"]),
                       class_names=tuple(saved["class_names"]), mean=tuple(saved["mean"]), std=tuple(saved["std"]))
    network = build("model", meta["model"], info=info)
    entries.load_into(key, network, info, meta["model"], what=f"the '{variant}' weights")
    return network.eval()


# ---------------------------------------------------------------- data


def load_data(dataset: str, *, split: str = "test", n: int | None = None, data_dir: str | Path | None = None,
              seed: int | None = None, **options: Any) -> tuple[Tensor, Tensor]:
    """The first ``n`` images of a dataset's split (all for None), pixels in [0, 1], and their labels.

    dataset:  a dataset config's name (``digits``, ``colour_digits``, ``cifar10``, ...)
    split:    ``train``, ``val`` or ``test``
    data_dir: where its files are (default: the command line's ``paths.data_dir``, ``data``)
    seed:     the seed that splits the data (default: ``conf/config.yaml``'s, as the models were trained)
    options:  the dataset's own options (``conf/dataset/<name>.yaml`` holds the defaults)
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"n must be a positive integer or None (every image), got {n!r}", "e.g. n=100")
    if split not in ("train", "val", "test"):
        raise ConfigError(f"split must be train, val or test, got {split!r}", "e.g. split='test'")
    node = {**group_defaults("dataset", dataset), **options}
    folder = group_defaults("paths", "default")["data_dir"] if data_dir is None else data_dir
    datamodule = build("dataset", node, data_dir=str(Path(str(folder)).expanduser().absolute()), seed=default_seed() if seed is None else int(seed))
    return datamodule.split_tensors(split, limit=n)
