"""What every stage needs: composing experiments, plain values, devices, data and the store."""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from robustness.data.base import ImageDataModule
from robustness.errors import ConfigError, composition_error
from robustness.registry import build
from robustness.store import ModelStore

log = logging.getLogger("robustness")

# Overrides that say *where* and *on what* a run happens; a variant that a run needs is composed
# with them, so that `dataset=cifar10 model.activation=tanh` reaches every model it loads or
# trains. Everything else on the command line (optim.lr, probe.*, variants) stays with the run.
INHERITED_OVERRIDES = ("recipe", "dataset", "model", "seed", "paths", "logger", "store", "debug", "trainer.accelerator", "trainer.precision")
# Group choices inherited as a whole, though keys under them are not (``trainer=cpu``, not ``trainer.max_epochs``).
INHERITED_CHOICES = ("trainer",)
# Keys of the trainer group that are ours, not Lightning's (the training stage takes them out).
OWN_TRAINER_KEYS = ("max_bad_steps",)


@dataclass
class RunOutcome:
    """What a run produced: metrics (train), artefacts (probe, report), results (probe) and where."""

    task: str
    output_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    artefacts: list[Any] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)


def to_python(node: Any) -> Any:
    """A config node as plain Python values (resolved); anything else unchanged."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) or OmegaConf.is_list(node) else node


def resolve_path(path: Any) -> Path:
    return Path(str(path)).expanduser().absolute()


def inherited(overrides: Sequence[str]) -> list[str]:
    """The overrides a variant composed for this run inherits (see ``INHERITED_OVERRIDES``)."""
    kept = []
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key in INHERITED_CHOICES or any(key == p or key.startswith(p + ".") or key.startswith(p + "/") for p in INHERITED_OVERRIDES):
            kept.append(override)
    return kept


# Composed configs of this process, by (experiment, overrides), each with the Hydra config loader
# that composed it: a report composes the same variant's training config once per section, and
# Hydra takes 0.1-0.2 s a time. A new loader (Hydra initialised again) makes its entries stale.
_COMPOSED: dict[tuple[str, tuple[str, ...]], tuple[Any, DictConfig]] = {}


def compose_experiment(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``experiment=name`` plus overrides with the project's config (Hydra must be initialised).

    Each call returns its own copy: callers may change it freely.
    """
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    hydra = GlobalHydra.instance()
    loader = hydra.config_loader() if hydra.is_initialized() else None
    key = (str(name), tuple(str(o) for o in overrides))
    cached = _COMPOSED.get(key)
    if loader is not None and cached is not None and cached[0]() is loader:
        return copy.deepcopy(cached[1])
    try:
        cfg = compose(config_name="config", overrides=[f"experiment={name}", *overrides])
    except (HydraException, OmegaConfBaseException) as exc:
        raise composition_error(exc) from None
    with open_dict(cfg):
        cfg.experiment_name = name
    if loader is not None:
        _COMPOSED[key] = (weakref.ref(loader), copy.deepcopy(cfg))
    return cfg


@dataclass(frozen=True)
class LaunchedGroup:
    """The processes a launcher started for one job (torchrun, SLURM or submitit tasks), seen from one of them.

    Every member runs the same command; only the leader (rank 0) takes the store's locks and writes.
    """

    rank: int
    world_size: int
    launcher: str      # what started them, as the user would name it
    per_node: int      # processes on each node: each drives one of ``trainer.devices``

    @property
    def leader(self) -> bool:
        return self.rank == 0


def launched_group() -> LaunchedGroup | None:
    """This process's place among the processes a launcher started for the job, or None for a lone process.

    Read from the launchers' environment variables, in the order Lightning detects them, before
    any Trainer exists. Lightning's own DDP children are not a launched group: the training stage
    starts them itself (``stages.train``) and they carry its job in ``FOLLOWER_JOB_ENV``.
    """
    env = os.environ
    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    def number(name: str, default: int) -> int:
        try:
            return int(env.get(name, default))
        except ValueError:
            return default

    if SLURMEnvironment.detect() and number("SLURM_NTASKS", 1) > 1:
        per_node = number("SLURM_NTASKS_PER_NODE", number("SLURM_NTASKS", 1))
        return LaunchedGroup(number("SLURM_PROCID", 0), number("SLURM_NTASKS", 1), "SLURM (hydra.launcher.tasks_per_node)", per_node)
    if TorchElasticEnvironment.detect() and number("WORLD_SIZE", 1) > 1:
        return LaunchedGroup(number("RANK", 0), number("WORLD_SIZE", 1), "torchrun", number("LOCAL_WORLD_SIZE", number("WORLD_SIZE", 1)))
    if number("SUBMITIT_LOCAL_NTASKS", 1) > 1:
        tasks = number("SUBMITIT_LOCAL_NTASKS", 1)
        return LaunchedGroup(number("SUBMITIT_LOCAL_GLOBALID", 0), tasks, "submitit (hydra.launcher.tasks_per_node)", tasks)
    if FOLLOWER_JOB_ENV not in env and "LOCAL_RANK" in env and number("WORLD_SIZE", 1) > 1:
        # Processes started by hand the way Lightning's launcher starts its own (LOCAL_RANK, NODE_RANK, WORLD_SIZE).
        first = number("LOCAL_RANK", 0) == 0 and number("NODE_RANK", number("GROUP_RANK", 0)) == 0
        per_node = number("LOCAL_WORLD_SIZE", number("WORLD_SIZE", 1))
        return LaunchedGroup(0 if first else max(1, number("RANK", 1)), number("WORLD_SIZE", 1), "LOCAL_RANK/WORLD_SIZE", per_node)
    return None


# Set by the training stage for the DDP processes Lightning starts by running the command again:
# the path of the one training they join (stages/train.py).
FOLLOWER_JOB_ENV = "ROBUSTNESS_DDP_FOLLOWER_JOB"


def device_for(cfg: DictConfig) -> torch.device:
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def make_datamodule(cfg: DictConfig, setup: bool = True) -> ImageDataModule:
    datamodule = build("dataset", cfg.dataset, data_dir=str(resolve_path(cfg.paths.data_dir)), seed=int(cfg.seed))
    if setup:
        datamodule.setup("fit")
    return datamodule


def store_for(cfg: DictConfig, dataset_name: str) -> ModelStore:
    return ModelStore(resolve_path(cfg.paths.artifacts_dir), dataset_name, str(cfg.model.name))


def writable_problem(directory: Path) -> str | None:
    """Why ``directory`` (or the nearest existing folder above it) cannot take new files, or None."""
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:  # a real write: permission bits say nothing for root or on a read-only mount
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return f"{existing} is not writable: {exc.strerror or exc}"
    return None


def check_writable(directory: Path, what: str, hint: str) -> None:
    problem = writable_problem(directory)
    if problem is None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            problem = exc.strerror or str(exc)
    if problem:
        raise ConfigError(f"cannot write to the {what} {directory} ({problem})", hint)


def apply_debug(cfg: DictConfig) -> None:
    """Apply ``debug`` (``debug=rehearsal``): merge its ``settings`` over the run's config, and
    shrink the run's probe, regularizer and attack (and the attack nested in either) by
    ``debug.shrink`` for the keys those components have, then by each component's own
    ``rehearsal`` values; nothing else changes.

    Runs after composition, because a variant's training overrides (its recipe's) come after
    every config file, the debug one included."""
    debug = cfg.get("debug")
    if not isinstance(debug, DictConfig):
        return
    settings, shrink = debug.get("settings"), debug.get("shrink")
    with open_dict(cfg):
        if settings:
            for key, value in settings.items():
                if isinstance(cfg.get(key), DictConfig):
                    cfg[key].merge_with(value)
                else:
                    cfg[key] = value
        for group in ("probe", "regularizer", "attack"):
            node = cfg.get(group)
            if not isinstance(node, DictConfig):
                continue
            if shrink and group in shrink:
                _set_existing(node, shrink[group])
            for inner in (node, *(value for value in node.values() if isinstance(value, DictConfig))):
                # A component's own rehearsal values (its YAML's `rehearsal:`), for keys the shared list lacks.
                if isinstance(inner.get("rehearsal"), DictConfig):
                    _set_existing(inner, inner.rehearsal)


def _set_existing(node: DictConfig, values: DictConfig) -> None:
    for key, value in values.items():
        if key not in node:
            continue
        if isinstance(node[key], DictConfig):
            if isinstance(value, DictConfig):
                _set_existing(node[key], value)
        else:
            node[key] = value
