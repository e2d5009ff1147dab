"""Published models as variants: models this project did not train, loaded read-only.

- ``model=robustbench``: an entry of RobustBench's model zoo (the optional ``robustbench``
  package), named by entry, dataset and threat model. Its weights are read from
  ``<models_dir>/<dataset>/<threat_model>/<entry>.pt`` (RobustBench's own layout, so a folder
  that ``robustbench.utils.load_model`` filled serves as it is) and fetched only with
  ``download=true``. RobustBench models take [0, 1] pixels and carry whatever normalisation
  they were trained with inside the architecture (``ImageNormalizer`` layers, ``mu``/``sigma``
  buffers; the plain ``Standard`` WideResNet was trained on raw [0, 1] pixels and has none), so
  the zoo model is used as it is: wrapping it in our ``Normalize`` would normalise twice.
- ``model=torchvision``: any torchvision classification architecture by name, with a user's
  state_dict of that network; normalisation goes in front of it, as for our own models.

A variant of such a model is not trained: its config node comes from ``model.variants`` (see
:func:`variant_node`) or from the run's ``external_variants`` table, which may also name a
``model=import`` network with its weights (:mod:`robustness.models.imported`), and
:func:`external_source` describes its weights file for the store, with the SHA-256 of the bytes
the builder loaded (each builder reads the file once and keeps that digest on the model as
``loaded_weights``).

Weights load with ``torch.load(weights_only=True)``; a file that needs unpickling loads only
with ``allow_unpickling=true``, because unpickling can run arbitrary code. They pass the checks
the store's own weights pass: every parameter and statistic with its shape, and no NaN or
infinite value (named by its tensor).
"""

from __future__ import annotations

import difflib
import io
import logging
import os
import pickle
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torchvision
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from robustness import fingerprint
from robustness.data.base import DatasetInfo
from robustness.errors import ConfigError, StoreError
from robustness.models.normalize import Normalize, PixelClassifier
from robustness.registry import register, split_name
from robustness.store import check_finite_state, load_weights

log = logging.getLogger(__name__)

# Published models: probed as they are, never trained here.
EXTERNAL_MODELS = ("robustbench", "torchvision")
# Models an ``external_variants`` entry may name: the published ones, and model=import with a
# weights file (a researcher's own architecture and weights, probed as they are).
VARIANT_MODELS = (*EXTERNAL_MODELS, "import")

# What to install when importing robustbench fails on one of its modules. robustbench 1.1.1 from
# PyPI imports AutoAttack as ``autoattack`` (PyPI's pyautoattack installs it as ``pyautoattack``)
# and reads its data files through ``pkg_resources`` (gone from setuptools 81 on).
_ROBUSTBENCH_IMPORT_FIXES = {
    "robustbench": "pip install robustbench",
    "autoattack": "pip install git+https://github.com/fra31/auto-attack (robustbench imports it as 'autoattack')",
    "pkg_resources": "pip install 'setuptools<81' (robustbench's data loaders import pkg_resources)",
}

# Containers that zoo checkpoints wrap their state_dict in, searched in this order.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "last", "state")
# Key prefixes that training wrappers add (DataParallel's ``module.``, ``model.`` of a
# normalising Sequential or a Lightning module) and the architecture may lack, or the reverse.
_KEY_PREFIXES = ("module.", "model.")


# --------------------------------------------------------------------------------------
# variants of external models


def is_external(model_cfg: DictConfig | Mapping[str, Any]) -> bool:
    """Whether the model config names a published model (loaded, never trained here)."""
    return str(model_cfg.get("name")) in EXTERNAL_MODELS


def external_source(model_cfg: DictConfig | Mapping[str, Any], info: DatasetInfo, model: nn.Module | None = None) -> dict[str, Any]:
    """Where an external variant's weights come from, with the weights file's sha256: what the
    store records for a variant it did not train.

    model: the module built from ``model_cfg``; the digest is then that of the bytes its builder
           loaded (``model.loaded_weights``), not of the file as it is now, which could have changed since.
    """
    name, options = split_name(model_cfg, "model")
    options.pop("variants", None)
    source = _source(name, options, info)
    loaded = getattr(model, "loaded_weights", None)
    if loaded is not None:
        source.update(weights=loaded["weights"], weights_sha256=loaded["weights_sha256"])
    return source


def _source(name: str, options: dict[str, Any], info: DatasetInfo) -> dict[str, Any]:
    if name == "import":
        from robustness.models.imported import imported_source

        return imported_source(options, info)
    if name == "robustbench":
        spec = _robustbench_spec(info, **_only(options, ("entry", "threat_model", "dataset", "models_dir")))
        return {
            "kind": "robustbench",
            "source": f"RobustBench {spec.dataset}/{spec.threat_model}/{spec.entry}",
            "entry": spec.entry,
            "dataset": spec.dataset,
            "threat_model": spec.threat_model,
            "package_version": _version("robustbench"),
            "weights": str(spec.path),
            "weights_sha256": _digest(spec.path),
        }
    if name == "torchvision":
        path = _torchvision_weights_path(options.get("weights"), options.get("models_dir", "models"))
        mean, std = _normalisation(info, options.get("mean"), options.get("std"))
        return {
            "kind": "torchvision",
            "source": f"torchvision {options.get('arch', 'resnet18')} with weights {path}",
            "arch": options.get("arch", "resnet18"),
            "options": dict(options.get("options") or {}),
            "mean": list(mean),
            "std": list(std),
            "package_version": _version("torchvision"),
            "weights": str(path),
            "weights_sha256": _digest(path),
        }
    raise ConfigError(f"model '{name}' is not an external model", f"external models are: {', '.join(EXTERNAL_MODELS)}")


def _only(options: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {k: options[k] for k in keys if k in options}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _digest(path: Path) -> str:
    if not path.is_file():
        raise StoreError(f"the weights file {path} does not exist", "build the model first (with download=true for a zoo model), or fix the path")
    return fingerprint.of_file(path)


# --------------------------------------------------------------------------------------
# RobustBench


def robustbench_catalogue() -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """RobustBench's model zoo as ``{dataset: {threat_model: {entry: {'model': factory, 'gdrive_id': ...}}}}``."""
    try:
        from robustbench.model_zoo import model_dicts
    except ImportError as exc:
        missing = (exc.name or "robustbench").split(".")[0]
        fix = _ROBUSTBENCH_IMPORT_FIXES.get(missing, f"pip install {missing}")
        what = "is not installed" if missing == "robustbench" else f"cannot be imported: it needs the module '{missing}', which is missing"
        raise ConfigError(f"model=robustbench needs the robustbench package, which {what}", fix) from None
    return {
        dataset.value: {threat.value: dict(entries) for threat, entries in by_threat.items()}
        for dataset, by_threat in model_dicts.items()
    }


@dataclass(frozen=True)
class _RobustBenchSpec:
    dataset: str
    threat_model: str
    entry: str
    path: Path
    factory: Callable[[], nn.Module]
    gdrive_id: Any

    @property
    def label(self) -> str:
        return f"RobustBench model '{self.entry}' ({self.dataset}, {self.threat_model})"


def _robustbench_spec(info: DatasetInfo, entry: str = "Standard", threat_model: str = "L2", dataset: str | None = None, models_dir: str | Path = "models") -> _RobustBenchSpec:
    """Check the names against the zoo and say where the entry's weights live."""
    catalogue = robustbench_catalogue()
    dataset = str(dataset or info.name)
    if dataset not in catalogue:
        raise ConfigError(
            f"RobustBench has no models for dataset '{dataset}' (it has: {', '.join(catalogue)})",
            "use model=robustbench with dataset=cifar10 (or set model.dataset to the zoo's dataset the model was trained on)",
        )
    threats = catalogue[dataset]
    canonical = {t.lower(): t for t in threats}
    threat = canonical.get(str(threat_model).lower())
    if threat is None:
        raise ConfigError(f"RobustBench has no threat model '{threat_model}' for {dataset}", f"set model.threat_model to one of: {', '.join(threats)}")
    entries = threats[threat]
    if entry not in entries:
        close = difflib.get_close_matches(str(entry), list(entries), n=5, cutoff=0.5)
        elsewhere = [t for t, models in threats.items() if entry in models]
        hint = f"it is listed under threat model {', '.join(elsewhere)}: set model.threat_model" if elsewhere else (
            f"close names: {', '.join(close)}" if close else f"the {dataset}/{threat} entries are: {', '.join(entries)}"
        )
        raise ConfigError(f"RobustBench's zoo has no model '{entry}' for {dataset}/{threat}", hint)
    record = entries[entry]
    gdrive_id = record.get("gdrive_id")
    if gdrive_id is None or isinstance(gdrive_id, (list, tuple)):
        kind = "hosted by timm, not as a zoo file" if gdrive_id is None else f"an ensemble of {len(gdrive_id)} files"
        raise ConfigError(
            f"RobustBench model '{entry}' ({dataset}, {threat}) is {kind}, which model=robustbench does not load",
            "pick a single-file entry of the zoo (most are, e.g. 'Standard')",
        )
    path = Path(models_dir).expanduser().resolve() / dataset / threat / f"{entry}.pt"
    return _RobustBenchSpec(dataset, threat, entry, path, record["model"], gdrive_id)


@register("model", "robustbench")
def robustbench_model(
    info: DatasetInfo,
    entry: str = "Standard",
    threat_model: str = "L2",
    dataset: str | None = None,
    models_dir: str | Path = "models",
    download: bool = False,
    allow_unpickling: bool = False,
) -> nn.Module:
    """A RobustBench zoo model with its published weights; it takes [0, 1] pixels as it is."""
    spec = _robustbench_spec(info, entry, threat_model, dataset, models_dir)
    if not spec.path.is_file():
        if not download:
            raise StoreError(
                f"the weights of {spec.label} are not at {spec.path}",
                f"put the zoo file there (RobustBench's layout: <models_dir>/{spec.dataset}/{spec.threat_model}/{spec.entry}.pt), "
                "point paths.models_dir at the folder that holds it, or allow fetching it with model.download=true",
            )
        _download_robustbench(spec)
    net = spec.factory()
    check_fits(net, info, spec.label)
    state, digest = read_checkpoint(spec.path, f"the weights of {spec.label}", allow_unpickling)
    load_matching(net, state, f"the weights of {spec.label} at {spec.path}", info)
    net.loaded_weights = {"weights": str(spec.path), "weights_sha256": digest}
    return net


def _download_robustbench(spec: _RobustBenchSpec) -> None:
    from robustbench.utils import download_gdrive_new

    spec.path.parent.mkdir(parents=True, exist_ok=True)
    # Into a side file first: an interrupted download must not leave a truncated file at the
    # path a later run would trust.
    partial = spec.path.with_name(spec.path.name + ".partial")
    log.info("downloading %s to %s", spec.label, spec.path)
    try:
        download_gdrive_new(spec.gdrive_id, str(partial))
    except Exception as exc:  # the downloader's network errors have no common base class
        partial.unlink(missing_ok=True)
        raise StoreError(
            f"downloading {spec.label} failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
            f"check the network, or fetch the file by hand and put it at {spec.path}",
        ) from None
    if not partial.is_file():
        raise StoreError(f"downloading {spec.label} produced no file", f"fetch the file by hand and put it at {spec.path}")
    os.replace(partial, spec.path)


# --------------------------------------------------------------------------------------
# torchvision


def _torchvision_weights_path(weights: str | Path | None, models_dir: str | Path) -> Path:
    if not weights:
        raise ConfigError(
            "model=torchvision needs a weights file (a state_dict of the torchvision network)",
            "set model.weights=PATH (relative paths are taken inside paths.models_dir)",
        )
    path = Path(weights).expanduser()
    return (path if path.is_absolute() else Path(models_dir).expanduser() / path).resolve()


def _normalisation(info: DatasetInfo, mean: Sequence[float] | None, std: Sequence[float] | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = tuple(float(m) for m in (info.mean if mean is None else mean))
    std = tuple(float(s) for s in (info.std if std is None else std))
    if len(mean) != info.in_channels or len(std) != info.in_channels:
        raise ConfigError(
            f"model.mean and model.std need {info.in_channels} values for {info.name}'s {info.in_channels}-channel images, got {len(mean)} and {len(std)}",
            "give one value per channel, or null for the dataset's own statistics",
        )
    if any(s <= 0 for s in std):
        raise ConfigError(f"model.std must be positive, got {list(std)}", "give the per-channel standard deviations the weights were trained with")
    return mean, std


@register("model", "torchvision")
def torchvision_model(
    info: DatasetInfo,
    arch: str = "resnet18",
    weights: str | Path | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    options: Mapping[str, Any] | None = None,
    models_dir: str | Path = "models",
    allow_unpickling: bool = False,
) -> PixelClassifier:
    """A torchvision classification network with a user's weights, behind ``Normalize(mean, std)``
    (the statistics the weights were trained with; null takes the dataset's)."""
    architectures = torchvision.models.list_models(module=torchvision.models)
    if arch not in architectures:
        close = difflib.get_close_matches(str(arch), architectures, n=5, cutoff=0.6)
        raise ConfigError(
            f"torchvision has no classification architecture '{arch}'",
            f"close names: {', '.join(close)}" if close else f"choose one of: {', '.join(architectures)}",
        )
    path = _torchvision_weights_path(weights, models_dir)
    if not path.is_file():
        raise StoreError(f"the weights file {path} for torchvision {arch} does not exist", "fix model.weights (relative paths are taken inside paths.models_dir)")
    mean, std = _normalisation(info, mean, std)
    try:
        net = torchvision.models.get_model(arch, weights=None, num_classes=info.num_classes, **dict(options or {}))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"torchvision {arch} rejects model.options {dict(options or {})} ({exc})", f"set only options that torchvision.models.{arch} accepts") from None
    label = f"torchvision {arch}"
    check_fits(net, info, label)
    state, digest = read_checkpoint(path, f"the weights of {label}", allow_unpickling)
    load_matching(net, state, f"the weights of {label} at {path}", info)
    model = PixelClassifier(Normalize(mean, std), net)
    model.loaded_weights = {"weights": str(path), "weights_sha256": digest}
    return model


# --------------------------------------------------------------------------------------
# shared: fit to the dataset, read and match checkpoints


def check_fits(net: nn.Module, info: DatasetInfo, label: str) -> None:
    """Raise a ConfigError naming both sides unless ``net`` maps one of the dataset's images to
    ``info.num_classes`` logits."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(1, *info.image_shape))
    except (RuntimeError, ValueError, AssertionError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(
            f"{label} does not take {info.name}'s images of shape {tuple(info.image_shape)} ({first})",
            "pick a model made for this dataset's image size and channels",
        ) from None
    finally:
        net.train(was_training)
    if not torch.is_tensor(out) or out.dim() != 2:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ConfigError(f"{label} returns {shape} for one image, not a row of logits", "pick a classifier whose forward returns (batch, classes) logits")
    if tuple(out.shape) != (1, info.num_classes):
        raise ConfigError(
            f"{label} has {out.shape[1]} classes, the dataset {info.name} has {info.num_classes}",
            f"pick a model trained on {info.name}, or the dataset the model was trained on",
        )


def read_checkpoint(path: Path, what: str, allow_unpickling: bool) -> tuple[Any, str]:
    """A weights file's contents (tensors only, unless the user allowed unpickling) and the SHA-256
    of the very bytes they were read from: the file is read once, so the digest the store records
    is that of the weights in use even if the file is replaced meanwhile."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise StoreError(f"{what} not found at {path}", "fix the path (relative paths are taken inside paths.models_dir)") from None
    except OSError as exc:
        raise StoreError(f"cannot read {what} at {path}: {exc.strerror or exc}", "check the file's permissions") from None
    digest = fingerprint.of_bytes(data)
    if allow_unpickling:
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False), digest
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, AttributeError, ImportError) as exc:
            raise StoreError(
                f"{what} at {path} cannot be unpickled ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                "a missing module names code the file needs; otherwise the file is corrupted: delete it and fetch it again",
            ) from None
    try:
        return load_weights(io.BytesIO(data), f"{what} at {path}"), digest
    except StoreError as exc:
        refused = exc.__context__
        if not (isinstance(refused, pickle.UnpicklingError) and "weights only load failed" in str(refused).lower()):
            raise
        needs = _unpickled_globals(path)
        raise StoreError(
            f"{what} at {path} contains pickled Python objects{f' ({needs})' if needs else ''}, not just tensors; "
            "refusing to unpickle it because unpickling can run arbitrary code",
            "if you trust where the file came from, allow it with model.allow_unpickling=true; or re-save it as a plain state_dict",
        ) from None


def check_finite(state: Mapping[str, Tensor], what: str) -> None:
    """Published weights holding NaN or infinite values are refused as the store refuses its own,
    naming the first such tensor."""
    try:
        check_finite_state(state, what)
    except StoreError as exc:
        raise StoreError(exc.message, "the file is damaged, or the training that wrote it diverged: use a sound copy of the weights") from None


def _unpickled_globals(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError, OSError, zipfile.BadZipFile):  # the legacy format cannot be listed
        return ""
    return "it needs " + ", ".join(names) if names else ""


def load_matching(net: nn.Module, checkpoint: Any, what: str, info: DatasetInfo) -> None:
    """Load ``checkpoint`` into ``net``: find the state_dict in its wrapper and undo the key
    prefixes that training wrappers add. Every parameter and statistic must be there with its
    shape; only constants of parameter-free layers (a normalising layer's mean and std) may be
    missing, and keep the values the architecture defines."""
    expected = net.state_dict()
    state = find_state_dict(checkpoint, expected, what)
    check_finite(state, what)
    constants = _constant_buffers(net)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    required = [k for k in missing if k not in constants]
    if required or unexpected:
        parts = []
        if required:
            parts.append(f"{len(required)} missing (e.g. {', '.join(required[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
        raise StoreError(f"{what} do not fit the architecture: keys " + "; ".join(parts), "use the weights file made for this architecture and entry")
    wrong = [k for k in state if tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        classes = [k for k in wrong if expected[k].dim() >= 1 and expected[k].shape[0] == info.num_classes and state[k].dim() == expected[k].dim() and state[k].shape[1:] == expected[k].shape[1:]]
        if classes:
            raise ConfigError(
                f"{what} have {state[classes[0]].shape[0]} classes (key '{classes[0]}'), the dataset {info.name} has {info.num_classes}",
                f"use weights trained on {info.name}, or the dataset they were trained on",
            )
        listed = ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}" for k in wrong[:3])
        raise StoreError(f"{what} do not fit the architecture: shapes differ ({listed})", "use the weights file made for this architecture and its options")
    if missing:
        log.info("%s: keeping the architecture's own %s", what, ", ".join(missing))
    net.load_state_dict(state, strict=False)


def find_state_dict(checkpoint: Any, expected: Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    """The state_dict in a checkpoint (itself, or under a wrapper key such as ``state_dict``), its
    keys' wrapper prefixes (``module.``, ``model.``) undone where that makes them meet ``expected``'s."""
    candidates = [_rekeyed(state, expected) for state in _tensor_mappings(checkpoint)]
    if not candidates:
        raise StoreError(f"{what} holds no state_dict of tensors", "save the network's state_dict() (a mapping of names to tensors)")
    return max(candidates, key=lambda s: len(expected.keys() & s.keys()))


def _tensor_mappings(checkpoint: Any, depth: int = 2) -> list[dict[str, Tensor]]:
    """The mappings of names to tensors in a checkpoint: itself, or inside its wrapper keys."""
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        return []
    if all(isinstance(k, str) and torch.is_tensor(v) for k, v in checkpoint.items()):
        return [dict(checkpoint)]
    if depth == 0:
        return []
    found: list[dict[str, Tensor]] = []
    for key in (*_WRAPPER_KEYS, *(k for k in checkpoint if k not in _WRAPPER_KEYS)):
        if key in checkpoint:
            found += _tensor_mappings(checkpoint[key], depth - 1)
    return found


def _rekeyed(state: dict[str, Tensor], expected: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with wrapper prefixes stripped or added so that its keys meet ``expected``'s."""
    best = state
    for prefix in _KEY_PREFIXES:
        stripped = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in best.items()}
        if len(expected.keys() & stripped.keys()) > len(expected.keys() & best.keys()):
            best = stripped
    for prefix in _KEY_PREFIXES:
        added = {prefix + k: v for k, v in best.items()}
        if len(expected.keys() & added.keys()) > len(expected.keys() & best.keys()):
            best = added
    return best


def _constant_buffers(net: nn.Module) -> set[str]:
    """Buffers of layers without parameters (other than normalisation statistics): constants
    such as a normalising layer's mean and std, which the architecture itself defines."""
    constants = set()
    for prefix, module in net.named_modules():
        if isinstance(module, _NormBase) or next(module.parameters(recurse=False), None) is not None:
            continue
        for name, _ in module.named_buffers(recurse=False):
            constants.add(f"{prefix}.{name}" if prefix else name)
    return constants
