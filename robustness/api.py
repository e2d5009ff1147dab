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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from torch import Tensor, nn

from robustness.data.base import DatasetInfo
from robustness.errors import ConfigError, InputError, StoreError
from robustness.probes.base import ProbeResult, TrainingRecord, text_table
from robustness.probes.boundary_plane import boundary_plane
from robustness.probes.curvature_profile import curvature_profile
from robustness.probes.defaults import default_choice, default_seed, group_defaults
from robustness.probes.hessian_norm import hessian_norm
from robustness.probes.min_perturbation import min_perturbation
from robustness.probes.path_connectivity import path_search
from robustness.probes.perceptual import hue_sweep
from robustness.probes.random_plane import random_plane
from robustness.probes.robust_accuracy import robust_accuracy
from robustness.probes.table1 import table1
from robustness.probes.training_shift import training_shift
from robustness.registry import build
from robustness.stages.common import RunOutcome
from robustness.store import ALIASES_FILE, ModelStore

__all__ = [
    "ProbeResult",
    "RunOutcome",
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
    "report",
    "robust_accuracy",
    "run",
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


def _store_root(store: str | Path | None) -> Path:
    if store is None:  # the command line's paths.artifacts_dir: ``artifacts``, or $ROBUSTNESS_ARTIFACTS_DIR
        store = group_defaults("paths", "default")["artifacts_dir"]
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


def list_variants(store: str | Path | None = None) -> VariantList:
    """Every model the store holds under an alias: alias, fingerprint, dataset, model, clean (test)
    accuracy and the date it was saved; printed, a table.

    store: the store's folder (default: the command line's ``paths.artifacts_dir``: ``artifacts``, or
           ``$ROBUSTNESS_ARTIFACTS_DIR`` where that is set).
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


def load_model(variant: str, *, dataset: str, model: str | None = None, store: str | Path | None = None) -> nn.Module:
    """The stored model a variant name stands for, built and loaded, in eval mode.

    variant: an alias of the store (``base``, ``cure@regularizer.lam=8``; :func:`list_variants` lists them)
    dataset: the dataset it was trained on (``digits``)
    model:   the model config's name (``smallcnn``); None finds the one folder that holds the alias
    store:   the store's folder (default: the command line's ``paths.artifacts_dir``, ``artifacts``)
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


# ---------------------------------------------------------------- whole runs: any command, a report on your models


@contextmanager
def _hydra() -> Iterator[None]:
    """Hydra's config search path, as the command line sets it up (kept where a caller already has one)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from robustness.probes.defaults import CONF_DIR

    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield


def _quiet() -> None:
    """The libraries' advertising and deprecation notes stay out of the output, as on the command line."""
    from robustness.cli import quiet_third_party_noise

    quiet_third_party_noise()


def run(*overrides: str, output_dir: str | Path | None = None) -> RunOutcome:
    """Any command line, run in this process: ``run("experiment=train", "regularizer=cure")`` is
    ``python -m robustness experiment=train regularizer=cure``.

    Returns what it produced (:class:`RunOutcome`: ``metrics`` of a training, ``artefacts`` and
    ``results`` of a probe or a report, ``output_dir``). Bad input raises the error the command
    line prints (ConfigError, StoreError, DataError, ...), never exits.
    output_dir: where the run writes (default: ``<paths.output_dir>/<experiment>/<date>_<time>``, as the command line)
    """
    from robustness import tracking
    from robustness.stages import compose_experiment, run as run_stages
    from robustness.stages.common import resolve_path

    _quiet()
    arguments = [str(o) for o in overrides]
    flags = [a for a in arguments if a.startswith("-")]
    if flags:
        raise ConfigError(f"run() takes overrides only, not command-line flags: {' '.join(flags)}",
                          "for a sweep, call run() once per value (or use python -m robustness -m ...)")
    chosen = [a.split("=", 1)[1] for a in arguments if a.startswith("experiment=")]
    experiment = chosen[-1] if chosen else default_choice("experiment")
    rest = [a for a in arguments if not a.startswith("experiment=")]
    with _hydra():
        cfg = compose_experiment(experiment, rest)
        folder = Path(output_dir) if output_dir is not None else \
            resolve_path(cfg.paths.output_dir) / experiment / _datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
        # W&B runs of this call go into its folder, as the command line's do; the caller's setting is back afterwards.
        previous = getattr(tracking, "_RUN_ROOT", None)
        tracking.set_run_root(folder.absolute())
        try:
            return run_stages(cfg, folder.absolute(), overrides=rest)
        finally:
            tracking.set_run_root(previous)


class GivenData:
    """Images handed to :func:`report`, served to its sections as a dataset's test split."""

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int, class_names: Sequence[str] | None, dataset: str) -> None:
        if images.dim() != 4:
            raise InputError(f"a report needs images shaped (N, C, H, W), got {tuple(images.shape)}", "add the channel dimension, e.g. x.unsqueeze(1)")
        names = tuple(str(c) for c in class_names) if class_names is not None else tuple(str(i) for i in range(num_classes))
        if len(names) != num_classes:
            raise InputError(f"{len(names)} class names for models with {num_classes} classes", "give one name per class, in class order")
        self.images, self.labels = images.detach().cpu(), labels.detach().cpu()
        channels = self.images.transpose(0, 1).flatten(1).double()
        self.info = DatasetInfo(name=dataset, num_classes=num_classes, image_shape=tuple(self.images.shape[1:]), class_names=names,
                                mean=tuple(channels.mean(1).tolist()), std=tuple(channels.std(1).nan_to_num(0.0).tolist()))

    def setup(self, stage: str | None = None) -> None:
        """Nothing to read: the images are in memory."""

    def split_tensors(self, split: str = "test", limit: int | None = None, indices: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
        if split != "test":
            raise ConfigError(f"the report runs on the images it was given, a test set: there is no '{split}' split",
                              "leave the sections' probe.split at test")
        if indices is not None:
            bad = [i for i in indices if not 0 <= i < len(self.images)]
            if bad:
                raise ConfigError(f"image index {bad[0]} is outside the {len(self.images)} images given", f"pick an index in [0, {len(self.images) - 1}]")
            return self.images[list(indices)], self.labels[list(indices)]
        stop = len(self.images) if limit is None else min(int(limit), len(self.images))
        return self.images[:stop], self.labels[:stop]

    def fingerprint(self) -> str:
        from robustness import fingerprint

        return fingerprint.of_config({"images": fingerprint.of_tensors(self.images, self.labels), "info": self.info.__dict__})


def report(models: Any, data: tuple[Tensor, Tensor], out_dir: str | Path, *, sections: Sequence[str] | None = None,
           overrides: Sequence[str] = (), title: str | None = None, class_names: Sequence[str] | None = None,
           dataset: str = "images", seed: int | None = None) -> RunOutcome:
    """The seed report (``conf/report/seed.yaml``: report.md, report.html, the scorecard) on your
    models and test images, written to ``out_dir``. Nothing is trained and the store is not read;
    probe results are kept in ``out_dir/probe-cache``, so a second call reuses them.

    models:   an ``nn.Module`` in eval mode, or a dict of named ones. A section runs on those
              its experiment lists in ``variants`` (``fig4_cure``: ``cure``) where the dict has
              them, else on all of them.
    data:     ``(images, labels)``: images (N, C, H, W) in [0, 1], labels their class indices
    sections: the sections to run (keys of conf/report/seed.yaml, in its order); None: all. A
              section that does not apply (the hue sweep on grey images) says why in the report.
    overrides: command-line overrides for every section, e.g. ``["probe.num_images=20"]``
    class_names, dataset: how captions name the classes and the data
    """
    from omegaconf import open_dict

    from robustness.probes.base import prepare_inputs
    from robustness.stages import compose_experiment, run as run_stages
    from robustness.stages.probe import GivenModels, given_models

    _quiet()
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise InputError(f"data must be a pair (images, labels), got {type(data).__name__}", "e.g. report(models, (x, y), 'out')")
    named, images, labels, num_classes = prepare_inputs(models, data[0], data[1])
    given = GivenData(images, labels, num_classes, class_names, dataset)
    folder = Path(out_dir).expanduser().absolute()
    arguments = ["logger=none", "store.train_missing=false", *([f"seed={int(seed)}"] if seed is not None else [])]
    with _hydra():
        cfg = compose_experiment("report", arguments)
        with open_dict(cfg):
            # The sections' overrides, as report.overrides=[...] on the command line.
            cfg.report.overrides = [*(cfg.report.get("overrides") or []), *[str(o) for o in overrides]]
            if title is not None:
                cfg.report.title = str(title)
            if sections is not None:
                known = list(cfg.report.sections)
                unknown = [s for s in sections if s not in known]
                if unknown or not sections:
                    raise ConfigError(f"unknown report section(s) {unknown}" if unknown else "no report sections chosen",
                                      f"choose among: {', '.join(known)}")
                for key in known:
                    if key not in sections:
                        del cfg.report.sections[key]
        with given_models(GivenModels(named, given, folder / "probe-cache")):
            return run_stages(cfg, folder, overrides=arguments)
