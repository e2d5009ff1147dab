"""Refuse a wrong config before any work starts.

No value from the command line reaches torch, Lightning, matplotlib or Hydra unchecked: every
number must be finite, the run-wide options (seed, optimiser, trainer) are range-checked here,
and every component the run will use is built once from its config node, so that its own
validation speaks before the first batch. Each problem is a ConfigError: ``error:`` / ``fix:``
and exit code 2.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from robustness.errors import ConfigError, RobustnessError
from robustness.io import path_length_problem
from robustness.models import zoo
from robustness.registry import build
from robustness.stages.common import OWN_TRAINER_KEYS, check_writable, device_for, launched_group, make_datamodule, resolve_path, to_python
from robustness.stages.variants import check_imported_models

log = logging.getLogger("robustness")

_ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true", "64", "transformer-engine")
_OPTIMIZERS = ("adamw", "sgd")
# Trainer arguments the training stage sets itself, and the group that sets each.
_MANAGED_TRAINER_KEYS = {"logger": "the logger group (logger=wandb, logger=csv or logger=none)",
                         "callbacks": "the callbacks group (conf/callbacks/, e.g. callbacks.log_progress.every_s=60)",
                         "default_root_dir": "paths.output_dir"}
# Strategies whose processes Lightning starts some other way than by running the command again
# (multiprocessing), which the store's one-writer rule is not built for.
_SPAWNING = ("spawn", "fork", "notebook")
# Said once per process: a run checks its config, then each variant it trains.
_WARNED_OVERSUBSCRIBED: set[tuple[int, int]] = set()


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
    _check_trainer(resolved.get("trainer") or {}, training=task == "train", task=task)
    _check_fractions(resolved.get("dataset") or {})
    _check_path_lengths(resolved.get("paths") or {})
    _warn_of_a_recipe_for_other_data(resolved)
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


def _warn_of_a_recipe_for_other_data(resolved: dict[str, Any]) -> None:
    """A recipe is tuned for one dataset; a command that picks another dataset keeps the default
    recipe's settings (digits') without a word unless it also names a recipe, so say it."""
    recipe = str((resolved.get("recipe") or {}).get("name", ""))
    dataset = str((resolved.get("dataset") or {}).get("name", ""))
    if recipe and dataset and recipe not in ("generic", dataset):
        log.warning("recipe=%s holds the training settings chosen for %s, and this run reads dataset=%s: its variants train with "
                    "them. Add recipe=generic (settings for any data) or the recipe made for %s, unless that is what you mean.",
                    recipe, recipe, dataset, dataset)


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


def _trainer_keys() -> list[str]:
    """Every option ``pl.Trainer`` takes, read off its signature, plus ours."""
    import pytorch_lightning as pl

    return sorted({*inspect.signature(pl.Trainer.__init__).parameters} - {"self"} | set(OWN_TRAINER_KEYS))


def _check_trainer(trainer: dict[str, Any], training: bool, task: str = "train") -> None:
    known = _trainer_keys()
    for key in trainer:
        if key in _MANAGED_TRAINER_KEYS:
            raise ConfigError(f"trainer.{key} is set by the training stage itself", f"set it through {_MANAGED_TRAINER_KEYS[key]}")
        if key not in known:
            raise ConfigError(f"trainer.{key} is not an option of Lightning's Trainer (nor one of ours)",
                              f"choose among: {', '.join(k for k in known if k not in _MANAGED_TRAINER_KEYS)}")
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator not in _ACCELERATORS:
        raise ConfigError(f"unknown trainer.accelerator '{accelerator}'", f"choose one of: {', '.join(_ACCELERATORS)} (or trainer=auto)")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError("trainer=gpu asks for a GPU, and this machine has none that torch can use",
                          "use trainer=auto (a GPU where there is one) or trainer=cpu")
    if accelerator == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("trainer.accelerator=mps asks for Apple's GPU, which this machine lacks", "use trainer=auto or trainer=cpu")
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    processes = _check_devices(trainer, on_gpu)
    _check_strategy(str(trainer.get("strategy", "auto")), on_gpu, processes)
    precision = str(trainer.get("precision", "32-true"))
    if precision not in _PRECISIONS:
        raise ConfigError(f"unknown trainer.precision '{precision}'", f"choose one of: {', '.join(_PRECISIONS[:6])}")
    if precision.startswith("16") and not on_gpu:
        raise ConfigError(f"trainer.precision={precision} needs a GPU (float16 autocast on the CPU is not supported)",
                          "use trainer.precision=bf16-mixed on the CPU, or 32-true")
    if precision.startswith("bf16") and on_gpu and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"trainer.precision={precision} needs a GPU with bfloat16 support, and this one has none",
                          "use trainer.precision=16-mixed or 32-true on this GPU")
    if precision == "transformer-engine":
        raise ConfigError("trainer.precision=transformer-engine is for transformer layers (NVIDIA's FP8), which these models lack",
                          "use trainer.precision=bf16-mixed, 16-mixed or 32-true")
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
    _lightning_accepts(trainer)
    group = launched_group()
    if group is not None:
        _check_launched_group(group, processes, task)
    elif int(trainer.get("num_nodes", 1)) > 1:
        raise ConfigError(f"trainer.num_nodes={trainer.get('num_nodes')} needs a launcher that starts the processes on every machine, "
                          "and this one was started alone",
                          "use hydra/launcher=submitit_slurm with hydra.launcher.nodes and tasks_per_node, or torchrun on each machine")


def _check_devices(trainer: dict[str, Any], on_gpu: bool) -> int:
    """The number of training processes on this node; refuses devices this machine does not have."""
    devices = trainer.get("devices", 1)
    nodes = _as_int(trainer.get("num_nodes", 1), "trainer.num_nodes", 1, hint="set trainer.num_nodes to the number of machines, e.g. 1")
    if devices == "auto":
        count = torch.cuda.device_count() if on_gpu else 1
    elif on_gpu and (isinstance(devices, list) or (isinstance(devices, str) and "," in devices)):
        indices = devices if isinstance(devices, list) else [d for d in devices.split(",") if d.strip()]
        if not all(isinstance(i, int) or str(i).strip().isdigit() for i in indices):
            raise ConfigError(f"trainer.devices must be a number of GPUs or a list of GPU indices, got {devices!r}", "e.g. trainer.devices=2")
        missing = [int(i) for i in indices if int(i) >= torch.cuda.device_count()]
        if missing:
            raise ConfigError(f"trainer.devices asks for GPU {missing[0]}, and this machine has {torch.cuda.device_count()} (indices 0..{torch.cuda.device_count() - 1})",
                              "list GPUs this machine has, or give a number: trainer.devices=N")
        count = len(indices)
    else:
        if on_gpu and devices == -1:
            devices = torch.cuda.device_count()
        count = _as_int(devices, "trainer.devices", 1, hint="set trainer.devices to a number of processes >= 1 (or auto)")
        if on_gpu and count > torch.cuda.device_count():
            raise ConfigError(f"trainer.devices={count} asks for {count} GPUs, and this machine has {torch.cuda.device_count()}",
                              f"set trainer.devices={max(1, torch.cuda.device_count())} or fewer")
    if not on_gpu and count > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        if count > cores and (count, cores) not in _WARNED_OVERSUBSCRIBED:
            _WARNED_OVERSUBSCRIBED.add((count, cores))
            log.warning("trainer.devices=%d starts %d training processes on %d CPU core(s): they share the cores, so each runs "
                        "slower than alone (trainer.devices=%d or fewer avoids it)", count, count, cores, cores)
    return count * nodes


def _check_strategy(strategy: str, on_gpu: bool, processes: int) -> None:
    from pytorch_lightning.strategies import StrategyRegistry

    if strategy == "auto":
        return
    available = StrategyRegistry.available_strategies()
    if strategy not in available:
        raise ConfigError(f"unknown trainer.strategy '{strategy}'",
                          f"choose one of: auto, {', '.join(s for s in available if not any(w in s for w in _SPAWNING))} (trainer=ddp for several processes)")
    if any(word in strategy for word in _SPAWNING):
        raise ConfigError(f"trainer.strategy={strategy} starts its processes with multiprocessing, which this project does not support "
                          "(its training stage hands each rank's job over the command line)",
                          "use trainer=ddp (strategy=ddp) with trainer.devices=N")
    if strategy.startswith(("fsdp", "deepspeed", "xla", "single_xla", "single_tpu")) and not on_gpu:
        raise ConfigError(f"trainer.strategy={strategy} needs {'TPUs' if 'xla' in strategy or 'tpu' in strategy else 'GPUs'}, and this run has none",
                          "use trainer=ddp for several CPU processes, or the default (trainer=auto) for one")
    if strategy.startswith("deepspeed"):
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError(f"trainer.strategy={strategy} needs the deepspeed package, which is not installed",
                              "pip install deepspeed, or use trainer=ddp") from None


def _lightning_accepts(trainer: dict[str, Any]) -> None:
    """Build the Trainer these options describe, as the training stage will (no callbacks, no
    logger), so that Lightning's own validation of every other option speaks before any work.
    Building one changes process-wide torch flags (deterministic algorithms, cuDNN benchmark);
    they are put back."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    options = {k: v for k, v in trainer.items() if k not in OWN_TRAINER_KEYS}
    if options.get("enable_progress_bar") == "auto":
        options["enable_progress_bar"] = False
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    # Lightning's notes about the hardware it found are for the training, not for this check.
    chatty = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in chatty]
    try:
        for logger in chatty:
            logger.setLevel(logging.WARNING)
        options["plugins"] = [instantiate(p) for p in options.get("plugins") or []]
        pl.Trainer(**options, logger=False)
    except (TypeError, ValueError, RuntimeError, MisconfigurationException) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"Lightning refuses these trainer options: {message}", "fix the trainer.* value it names (conf/trainer/ holds the defaults)") from None
    finally:
        for logger, level in zip(chatty, levels):
            logger.setLevel(level)
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def _check_launched_group(group: Any, processes: int, task: str) -> None:
    """Processes a launcher started (torchrun, SLURM or submitit tasks) are one DDP training's ranks."""
    one = "start it as one process, without torchrun" if group.launcher == "torchrun" else "run it as one task (hydra.launcher.tasks_per_node=1)"
    if task != "train":
        raise ConfigError(f"this {task} runs in {group.world_size} processes started by {group.launcher}; a {task} runs in one "
                          "(only trainings are split over several)",
                          f"{one}; the variants it trains can still use several devices with trainer=ddp trainer.devices=N")
    if processes != group.world_size:
        raise ConfigError(f"{group.launcher} started {group.world_size} processes for this job, and the trainer options make "
                          f"{processes} (trainer.devices x trainer.num_nodes)",
                          f"set trainer=ddp trainer.devices={group.per_node} (one process per device), or {one}")


def _check_fractions(dataset: dict[str, Any]) -> None:
    """The dataset's split shares, before a data module hands them to scikit-learn or a sampler."""
    for key in ("val_fraction", "test_fraction"):
        if key in dataset and not 0 < _as_float(dataset[key], f"dataset.{key}") < 1:
            raise ConfigError(f"dataset.{key} must lie in (0, 1), got {dataset[key]}",
                              f"e.g. dataset.{key}=0.15: that share of the images is held out, the rest trains")
    if "train_fraction" in dataset and not 0 < _as_float(dataset["train_fraction"], "dataset.train_fraction") <= 1:
        raise ConfigError(f"dataset.train_fraction must lie in (0, 1], got {dataset['train_fraction']}",
                          "e.g. dataset.train_fraction=0.1 for 10% of the training set")
    if "val_fraction" in dataset and "test_fraction" in dataset and dataset["val_fraction"] + dataset["test_fraction"] >= 1:
        raise ConfigError(f"dataset.val_fraction + dataset.test_fraction must be < 1 (the rest trains), got "
                          f"{dataset['val_fraction']} + {dataset['test_fraction']}", "e.g. dataset.val_fraction=0.15 dataset.test_fraction=0.25")


def _check_path_lengths(paths: dict[str, Any]) -> None:
    """Folder names and lengths this file system can hold, judged before anything is created there."""
    for key, value in paths.items():
        if isinstance(value, str) and value:
            problem = path_length_problem(resolve_path(value))
            if problem:
                raise ConfigError(f"paths.{key} cannot be used: {problem}", f"choose a shorter paths.{key}")
