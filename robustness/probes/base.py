"""What every probe shares: its options, its inputs, its result.

A probe is a plain function of ``(models, images, labels, **options)`` that returns a typed
result, a :class:`ProbeResult` subclass with its tables (lists of row dicts), arrays and
metadata (``robustness.hessian_norm(model, x, y)``). ``models`` is one ``nn.Module`` (named
``"model"`` in the result) or a dict of named ones, compared on the same images. Its stage
adapter ``compute(ctx)``, registered with ``@register("probe", NAME, options=...)``, picks the
images from the run's data module and calls the same function, so the command line and the
Python API compute the same numbers. A probe computes and never plots: the reporter of the same
name in ``robustness.reporting`` draws its result.

Options are a frozen dataclass per probe, made by :func:`probe_options`: every default is the
probe's YAML (``conf/probe/<name>.yaml``), the one source of defaults for the command line and the
API alike.
"""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from robustness.errors import ConfigError, InputError, StoreError
from robustness.io import atomic_torch_save, atomic_write_json, read_json
from robustness.probes.defaults import default_choice, default_seed, group_defaults
from robustness.probes.memory import MemoryNeed, activation_bytes, fit_batch, image_bytes
from robustness.registry import METADATA_KEYS
from robustness.tensors import check_images, model_device

Progress = Callable[[int, int, str], None]


def no_progress(done: int, total: int, what: str) -> None:
    """A progress callback that reports nothing."""


class ProbeOptions:
    """Base of a probe's options. A probe's own class is made by :func:`probe_options`.

    ``defaults_from`` names the probe whose YAML holds the defaults (set by :func:`probe_options`);
    messages name the probe and that file.
    """

    defaults_from: ClassVar[str] = ""

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> Any:
        """The options from a config node (``name`` is ignored); missing keys take the YAML's value.

        An unknown key, or a value of the wrong type or range, is a ConfigError naming the valid
        options and the probe's YAML. A null stays null: where an option accepts none it means
        what the YAML's comment says (``num_images: null`` is the whole split), elsewhere it is refused.
        """
        name = cls.defaults_from
        known = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(cfg) - set(known) - {"name", *METADATA_KEYS})
        if unknown:
            raise ConfigError(
                f"unknown option(s) for probe {name}: {', '.join(unknown)}",
                f"valid options: {', '.join(sorted(known))} (see conf/probe/{name}.yaml)",
            )
        try:
            options = cls(**cls.normalise({key: cfg[key] for key in known if key in cfg}))
            options.validate()
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"an option of probe {name} has the wrong type: {exc}", f"see conf/probe/{name}.yaml") from None
        return options

    @classmethod
    def normalise(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Convert raw config values (lists from YAML, ...) before construction."""
        return values

    def validate(self) -> None:
        """Check ranges; raise ConfigError with a hint."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def memory_need(self, image_shape: Sequence[int], num_classes: int, activation: int, num_images: int | None) -> MemoryNeed | None:
        """The probe's peak memory for images of ``image_shape`` (see :mod:`robustness.probes.memory`).

        activation: bytes of one image's forward through the model (0 where the model is not built yet)
        num_images: images the probe will hold (None: as many as its options ask for)
        None: nothing worth judging.
        """
        return None


def probe_options(name: str) -> Callable[[type], type]:
    """Class decorator: a frozen dataclass of the probe's options whose defaults are ``conf/probe/<name>.yaml``.

    Every annotated option (the class's own and its bases') must be set in the YAML, and every key
    of the YAML (but ``name``) must be an option: a mismatch fails at import, naming both.
    """

    def make(cls: type) -> type:
        values = cls.normalise(group_defaults("probe", name))  # type: ignore[attr-defined]
        for key in ("name", *METADATA_KEYS):  # about the probe, not options of it (registry.METADATA_KEYS)
            values.pop(key, None)
        annotations: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            for key, kind in inspect.get_annotations(klass).items():
                if not str(kind).startswith(("ClassVar", "typing.ClassVar")):
                    annotations[key] = kind
        missing, extra = sorted(set(annotations) - set(values)), sorted(set(values) - set(annotations))
        if missing or extra:
            raise TypeError(f"conf/probe/{name}.yaml and {cls.__qualname__} disagree: the YAML lacks {missing}, the class lacks {extra}")
        cls.__annotations__ = annotations
        for key, value in values.items():
            # A list or mapping default is copied for each instance, as a dataclass requires.
            setattr(cls, key, field(default_factory=lambda value=value: copy.deepcopy(value)) if isinstance(value, (list, dict)) else value)
        cls.defaults_from = name  # type: ignore[attr-defined]
        return dataclass(frozen=True)(cls)

    return make


@dataclass
class TrainingRecord:
    """How a variant came to be, as the store knows it.

    starts_from:     the variant its training started from, "random init", or "published"
    metrics:         what its training recorded (``metrics.json`` in the store; empty when published)
    start_model:     that starting variant's model in eval mode, when it is one of the store's
    adversarial_set: the adversarial set its training used (tensors ``x`` and ``y``), if any
    """

    starts_from: str = "published"
    metrics: dict[str, Any] = field(default_factory=dict)
    start_model: nn.Module | None = None
    adversarial_set: dict[str, Tensor] | None = None


@dataclass
class ProbeContext:
    """Everything a probe's stage adapter may use.

    options:  the probe's own config node (``cfg.probe``), as a plain dict
    models:   variant name -> model in eval mode on ``device``, in the order asked for
    data:     the data module (already set up); ``data.info`` has class names and shape
    attack:   the ``attack`` config node as a plain dict
    work_dir: a folder for partial results, so an interrupted probe resumes where it stopped
    progress: call ``progress(done, total, what)`` to report progress
    training: ``training(name)`` is the variant's :class:`TrainingRecord` (loaded when asked for)
    shared_dir: a folder for one model's partial results that runs of the same probe on other
              lists of variants reuse (Figure 4's planes reuse Figure 2's base and adversarial):
              whatever is kept there must be named by everything it depends on, the model's
              weights included; None: keep them in ``work_dir``
    """

    options: dict[str, Any]
    models: dict[str, nn.Module]
    data: Any
    attack: dict[str, Any]
    device: torch.device
    seed: int
    work_dir: Path
    progress: Progress = no_progress
    training: Callable[[str], TrainingRecord] = lambda name: TrainingRecord()
    shared_dir: Path | None = None

    def common(self) -> dict[str, Any]:
        """What every probe function takes from the run besides its options."""
        return {"seed": self.seed, "cache_dir": self.work_dir, "progress": self.progress}


@dataclass(repr=False)
class ProbeResult:
    """A probe's output: arrays, tables (lists of row dicts) and JSON-able metadata.

    Each probe function returns its own subclass, whose properties name the main table and
    arrays; a result saved and loaded again is a plain ProbeResult with the same contents.
    """

    probe: str
    arrays: dict[str, Tensor] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        arrays = {k: torch.as_tensor(np.asarray(v)) if not torch.is_tensor(v) else v.detach().cpu() for k, v in self.arrays.items()}
        atomic_torch_save(arrays, directory / "arrays.pt")
        atomic_write_json(directory / "result.json", {"probe": self.probe, "tables": self.tables, "meta": self.meta})
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "ProbeResult":
        directory = Path(directory)
        try:
            header = read_json(directory / "result.json")
            arrays = torch.load(directory / "arrays.pt", map_location="cpu", weights_only=True)
        except FileNotFoundError as exc:
            raise StoreError(f"no probe result in {directory}: {exc.filename} is missing", "run the probe's experiment first") from None
        except Exception as exc:  # noqa: BLE001 - truncated JSON, damaged arrays: the file is unusable either way
            raise StoreError(f"the probe result in {directory} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                             "it is recomputed when the probe runs again (or delete that folder)") from None
        shape_ok = (isinstance(header, dict) and isinstance(header.get("probe"), str) and isinstance(header.get("tables"), dict)
                    and isinstance(header.get("meta"), dict) and isinstance(arrays, dict))
        if not shape_ok:
            raise StoreError(f"the probe result in {directory} is not one this project wrote (missing or mistyped keys)",
                             "it is recomputed when the probe runs again (or delete that folder)")
        return cls(probe=header["probe"], arrays=arrays, tables=header["tables"], meta=header["meta"])

    def to_probe_result(self) -> "ProbeResult":
        """The plain result the store caches and the reporters draw."""
        return ProbeResult(self.probe, dict(self.arrays), {k: list(v) for k, v in self.tables.items()}, dict(self.meta))

    @property
    def models(self) -> list[str]:
        """The names of the models measured, in order."""
        return list(self.meta.get("variants", []))

    def __repr__(self) -> str:
        tables = ", ".join(f"{name} ({len(rows)} rows)" for name, rows in self.tables.items())
        return f"{type(self).__name__}(probe={self.probe!r}, models={self.models}, tables: {tables or 'none'}; {len(self.arrays)} arrays)"

    def __str__(self) -> str:
        """Every table as aligned text, the way a notebook or a terminal prints it."""
        parts = [repr(self)]
        for name, rows in self.tables.items():
            parts.append(f"\n{name}:\n{text_table(rows)}")
        return "\n".join(parts)


def text_table(rows: Sequence[Mapping[str, Any]], limit: int = 20) -> str:
    """Rows as aligned plain text (at most ``limit`` rows, then how many more)."""
    if not rows:
        return "(no rows)"
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    shown = [[cell(row.get(c, "")) for c in columns] for row in rows[:limit]]
    widths = [max(len(c), *(len(r[i]) for r in shown)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in shown]
    if len(rows) > limit:
        lines.append(f"... and {len(rows) - limit} more rows")
    return "\n".join(lines)


# ---------------------------------------------------------------- inputs of every probe function


def named_models(models: Any) -> dict[str, nn.Module]:
    """``{"model": models}`` for one module, else the mapping as a dict (in its order)."""
    if isinstance(models, nn.Module):
        return {"model": models}
    if isinstance(models, Mapping) and models:
        bad = [str(name) for name, model in models.items() if not isinstance(model, nn.Module) or not isinstance(name, str) or not name]
        if bad:
            raise InputError(f"models must map names to torch.nn.Module objects; {bad[0]!r} does not", "e.g. {'base': model_a, 'cure': model_b}")
        return dict(models)
    raise InputError(f"expected an nn.Module or a dict of named ones, got {type(models).__name__}", "e.g. probe(model, images, labels) or probe({'base': a, 'cure': b}, images, labels)")


def prepare_inputs(models: Any, images: Any, labels: Any, *, labels_required: bool = True,
                   labels_are_classes: bool = True) -> tuple[dict[str, nn.Module], Tensor, Tensor | None, int]:
    """Check what a probe function was handed, before any work.

    Returns the named models, the images and labels on the models' device, and the number of
    classes the models output. Every problem is an InputError saying what to change: models in
    training mode or on different devices, images that are not a float batch in [0, 1], labels
    that do not match the images or (``labels_are_classes``: where the probe scores the models
    on them) the models' classes, a model that cannot take the images or does not return one
    row of logits per image.
    """
    named = named_models(models)
    devices = {model_device(model) for model in named.values()}
    if len(devices) > 1:
        raise InputError(f"the models are on different devices ({', '.join(sorted(map(str, devices)))})", "move them to one with model.to(device)")
    device = devices.pop()
    if not torch.is_tensor(images):
        raise InputError(f"images must be a torch tensor (N, C, H, W) with pixels in [0, 1], got {type(images).__name__}",
                         "convert with torch.as_tensor(array).float() / 255 (and permute to channels first)")
    if images.dim() < 2 or len(images) == 0:
        raise InputError(f"images must be a non-empty batch (N, C, H, W), got shape {tuple(images.shape)}", "add a batch dimension with x.unsqueeze(0)")
    if labels is None and labels_required:
        raise InputError("this probe needs the images' labels", "pass labels as a tensor of class indices, one per image")
    if labels is not None:
        if not torch.is_tensor(labels):
            labels = torch.as_tensor(labels)
        if labels.dim() != 1:
            raise InputError(f"labels must be a 1-D tensor of class indices, got shape {tuple(labels.shape)}", "e.g. torch.tensor([3, 1, 4])")
        labels = labels.to(device)
    images = images.to(device)
    num_classes = -1
    for name, model in named.items():
        if model.training:
            raise InputError(f"model '{name}' is in training mode; probes need deterministic outputs (dropout, batch-norm statistics)",
                             "call model.eval() first")
        check_images(model, images, labels)
        try:
            with torch.no_grad():
                logits = model(images[:1])
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise InputError(f"model '{name}' cannot take images of shape {tuple(images.shape[1:])}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                             "pass images shaped as the model expects (N, C, H, W), pixels in [0, 1], normalisation inside the model") from None
        if not torch.is_tensor(logits) or logits.dim() != 2 or logits.shape[0] != 1 or logits.shape[1] < 2:
            shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
            raise InputError(f"model '{name}' must return logits of shape (N, classes) with at least 2 classes, got {shape} for one image",
                             "wrap it so that forward returns the class scores")
        if num_classes not in (-1, logits.shape[1]):
            raise InputError(f"the models output different numbers of classes ({num_classes} and {logits.shape[1]} for '{name}')", "compare models of one task")
        num_classes = int(logits.shape[1])
    if labels is not None and labels_are_classes:
        check_images(next(iter(named.values())), images, labels, num_classes)
    return named, images, labels, num_classes


def class_name(class_names: Sequence[str], index: int) -> str:
    """The name of class ``index``, or the index itself where the list has no such class."""
    return str(class_names[index]) if 0 <= index < len(class_names) else str(index)


def attack_node(attack: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """A complete ``attack`` config node: the group option's YAML (``conf/attack/<name>.yaml``)
    with the given keys on top. None is ``conf/config.yaml``'s default attack; a name takes its YAML as it is."""
    if attack is None:
        given: dict[str, Any] = {"name": default_choice("attack")}
    elif isinstance(attack, str):
        given = {"name": attack}
    elif isinstance(attack, Mapping):
        given = dict(attack)
    else:
        raise ConfigError(f"attack must be a name or a mapping with a 'name', got {type(attack).__name__}", "e.g. attack='deepfool' or attack={'name': 'pgd_linf', 'eps': 0.03}")
    if not isinstance(given.get("name"), str):
        raise ConfigError("the attack config has no 'name'", "e.g. attack={'name': 'deepfool', 'max_iter': 20}")
    return {**group_defaults("attack", given["name"]), **given}


def run_seed(seed: int | None) -> int:
    """The seed a probe function runs with: the given one, else ``conf/config.yaml``'s."""
    if seed is None:
        return default_seed()
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}", "e.g. seed=0")
    return int(seed)


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Torch's global random stream seeded inside the block (attacks with a random start draw from
    it), and the caller's stream as it was afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def fitted(options: Any, models: Mapping[str, nn.Module], images: Tensor, num_classes: int, **facts: Any) -> Any:
    """``options`` with its batch lowered where the configured one would not fit in memory;
    a ConfigError with the estimate and the fix where nothing would (:mod:`robustness.probes.memory`).
    ``facts``: what else a probe's ``memory_need`` takes (the attack's ``gradient_rows``)."""
    activation = max(activation_bytes(model, images[:1]) for model in models.values())
    need = options.memory_need(tuple(images.shape[1:]), num_classes, activation, len(images), **facts)
    if need is None:
        return options
    batch = fit_batch(need, options.defaults_from, images.device)
    return options if batch >= need.batch else replace(options, **{need.batch_key: batch})


def check_memory_before_loading(options: Any, image_shape: Sequence[int], num_classes: int, device: torch.device | str = "cpu") -> None:
    """The part of :func:`fitted` that needs no model: refuses grids and image sets that cannot fit."""
    need = options.memory_need(tuple(image_shape), num_classes, 0, None)
    if need is not None:
        fit_batch(need, options.defaults_from, device)


def per_item_bytes(image_shape: Sequence[int], activation: int, *, gradients: bool) -> int:
    """Memory one image (or grid point) takes through a model: itself, and its forward's
    activations, kept again for a backward when ``gradients``."""
    return image_bytes(image_shape) + activation * (3 if gradients else 1)
