"""Refuse a wrong config before any work starts.

No value from the command line reaches torch, Lightning, matplotlib or Hydra unchecked: every
number must be finite, the run-wide options (seed, optimiser, trainer) are range-checked here,
and every component the run will use is built once from its config node, so that its own
validation speaks before the first batch. Each problem is a ConfigError: ``error:`` / ``fix:``
and exit code 2.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from robustness.errors import ConfigError, RobustnessError
from robustness.models import zoo
from robustness.registry import build, lookup
from robustness.stages.common import check_writable, device_for, make_datamodule, resolve_path, to_python
from robustness.stages.variants import check_imported_models

_ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true", "64", "transformer-engine")
_OPTIMIZERS = ("adamw", "sgd")


def _numbers(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _numbers(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _numbers(value, f"{prefix}{index}.")
    elif isinstance(node, float):
        yield prefix.rstrip("."), node


def _as_int(value: Any, key: str, low: int | None = None, high: int | None = None, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {value!r}", hint or f"set {key} to a whole number")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{key} must be {bounds}, got {value}", hint or f"set {key} {bounds}")
    return value


def _as_float(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}", f"set {key} to a number")
    return float(value)


def check_config(cfg: DictConfig, output_dir: str | Path) -> Path:
    """Validate ``cfg`` for its stage; returns the absolute output folder (created, writable)."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"the configuration cannot be resolved: {str(exc).splitlines()[0]}", "check the interpolations (${...}) in your overrides") from None
    resolved.pop("hydra", None)
    for key, value in _numbers(resolved):
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}", f"set {key} to a finite value")

    task = str(cfg.task)
    _as_int(cfg.get("seed"), "seed", 0, 2**32 - 1, hint="set seed to an integer in [0, 4294967295], e.g. seed=0")
    _check_optim(resolved.get("optim") or {})
    _check_trainer(resolved.get("trainer") or {}, training=task == "train")
    output = resolve_path(output_dir)
    check_writable(output, "output directory", "choose a writable place with paths.output_dir=... (or hydra.run.dir=...)")
    if task == "train" or (task == "probe" and cfg.store.get("train_missing", True)):
        check_writable(resolve_path(cfg.paths.artifacts_dir), "model store", "choose a writable store with paths.artifacts_dir=...")

    if task == "report":
        return output
    _built("dataset", lambda: make_datamodule(cfg, setup=False))
    _built("model", lambda: check_imported_models(cfg))  # model=import: its target imports, its weights file exists
    if task == "train" and zoo.is_external(cfg.model):
        raise ConfigError(f"model={cfg.model.name} is a published model: it is probed, not trained",
                          "use it in a probe's variants (task=probe), e.g. experiment=robust_accuracy model=robustbench 'variants=[rb_standard]'")
    if task == "train":
        regularizer = _built("regularizer", lambda: build("regularizer", cfg.regularizer))
        regularizer.check_precision(str(cfg.trainer.get("precision", "32-true")))
    if task == "probe":
        names = cfg.get("variants")
        if not OmegaConf.is_list(names) or not all(isinstance(v, str) and v for v in names):
            raise ConfigError(f"variants must be a list of variant names, got {to_python(names)!r}", "e.g. variants=[base,adversarial,cure]")
        if cfg.get("attack") is not None:
            _built("attack", lambda: build("attack", cfg.attack))
        if cfg.get("probe") is not None and "name" in cfg.probe:
            _built("probe", lambda: _probe_options(cfg))
    return output


def _built(group: str, make: Any) -> Any:
    try:
        return make()
    except RobustnessError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"an option of the {group} config has the wrong type or value: {exc}", f"see conf/{group}/ for its options") from None


def _probe_options(cfg: DictConfig) -> Any:
    """The probe's options object, built (and validated) the way the probe itself will, and its
    memory judged for this dataset's images before any model is loaded."""
    from robustness.probes.base import check_memory_before_loading
    from robustness.registry import options_of

    name = str(cfg.probe.name)
    options_class = options_of("probe", name)
    if options_class is None:
        return None
    options = options_class.from_cfg(to_python(cfg.probe))
    info = getattr(make_datamodule(cfg, setup=False), "info", None)  # a dataset may know its shape only once set up
    if info is not None:
        check_memory_before_loading(options, info.image_shape, info.num_classes, device_for(cfg))
    return options


def _check_optim(optim: dict[str, Any]) -> None:
    if optim.get("optimizer") not in _OPTIMIZERS:
        raise ConfigError(f"unknown optim.optimizer '{optim.get('optimizer')}'", f"choose one of: {', '.join(_OPTIMIZERS)}")
    if not _as_float(optim.get("lr"), "optim.lr") > 0:
        raise ConfigError(f"the learning rate must be > 0, got {optim.get('lr')}", "set optim.lr to a positive number, e.g. optim.lr=1e-3")
    if _as_float(optim.get("weight_decay", 0.0), "optim.weight_decay") < 0:
        raise ConfigError(f"weight decay must be >= 0, got {optim.get('weight_decay')}", "set optim.weight_decay=0 or a positive number")
    if not 0 < _as_float(optim.get("gamma", 1.0), "optim.gamma") <= 1:
        raise ConfigError(f"the ExponentialLR gamma must lie in (0, 1], got {optim.get('gamma')}", "set optim.gamma, e.g. optim.gamma=0.7")
    if not 0 <= _as_float(optim.get("momentum", 0.0), "optim.momentum") < 1:
        raise ConfigError(f"optim.momentum must lie in [0, 1), got {optim.get('momentum')}", "set optim.momentum, e.g. optim.momentum=0.9")


def _check_trainer(trainer: dict[str, Any], training: bool) -> None:
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator not in _ACCELERATORS:
        raise ConfigError(f"unknown trainer.accelerator '{accelerator}'", f"choose one of: {', '.join(_ACCELERATORS)} (or trainer=auto)")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer=gpu asks for a GPU, and this machine has none that torch can use",
                          "use trainer=auto (a GPU where there is one) or trainer=cpu")
    if accelerator == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("trainer.accelerator=mps asks for Apple's GPU, which this machine lacks", "use trainer=auto or trainer=cpu")
    devices = trainer.get("devices", 1)
    if devices != "auto":
        _as_int(devices, "trainer.devices", 1, hint="set trainer.devices to a positive integer (or auto)")
    precision = str(trainer.get("precision", "32-true"))
    if precision not in _PRECISIONS:
        raise ConfigError(f"unknown trainer.precision '{precision}'", f"choose one of: {', '.join(_PRECISIONS[:6])}")
    if precision.startswith("16") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.precision={precision} needs a GPU (float16 autocast on the CPU is not supported)",
                          "use trainer.precision=bf16-mixed on the CPU, or 32-true")
    if training:
        _as_int(trainer.get("max_epochs"), "trainer.max_epochs", 1,
                hint="train for at least one epoch (trainer.max_epochs=0 would store an untrained model)")
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        if key in trainer and trainer[key] is not None:
            value = trainer[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (isinstance(value, float) and value > 1):
                raise ConfigError(f"trainer.{key} must be a share in [0, 1] or a number of batches, got {value!r}", f"e.g. trainer.{key}=4")
            if training and key == "limit_train_batches" and value == 0:
                raise ConfigError("trainer.limit_train_batches=0 trains on nothing", "set it to a number of batches > 0, or 1.0 for all")
    if "max_bad_steps" in trainer:
        _as_int(trainer["max_bad_steps"], "trainer.max_bad_steps", 1)
    if "log_every_n_steps" in trainer:
        _as_int(trainer["log_every_n_steps"], "trainer.log_every_n_steps", 1)
    bar = trainer.get("enable_progress_bar", True)
    if not (isinstance(bar, bool) or bar == "auto"):
        raise ConfigError(f"trainer.enable_progress_bar must be true, false or auto, got {bar!r}", "e.g. trainer.enable_progress_bar=auto")
