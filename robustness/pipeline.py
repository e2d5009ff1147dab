"""What one composed config does: train a variant, run a probe, or assemble a report.

The Hydra entry point (robustness/cli.py) and the tests both call :func:`run`; nothing here
depends on being launched by Hydra except :func:`compose_experiment`, which needs Hydra's
config search path to be initialised (the entry point and ``tests/helpers.py`` do that).
"""

from __future__ import annotations

import logging
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from robustness.data import ImageDataModule
from robustness.errors import ConfigError, StoreError
from robustness.io import atomic_write_json
from robustness.probes.base import ProbeContext, ProbeResult
from robustness.registry import build, choices, lookup
from robustness.reporting.base import Artefact
from robustness import fingerprint
from robustness.store import ModelStore
from robustness import tracking
from robustness.training.module import ClassifierModule
from robustness.training.regularizer import TrainContext

log = logging.getLogger("robustness")

TASKS = ("train", "probe", "report")
# Keys of the trainer group that are ours, not Lightning's.
_OWN_TRAINER_KEYS = ("max_bad_steps",)


@dataclass
class RunOutcome:
    """What a run produced: metrics (train), artefacts (probe, report) and where."""

    task: str
    output_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    artefacts: list[Artefact] = field(default_factory=list)


# --------------------------------------------------------------------------------------
# entry


def run(cfg: DictConfig, output_dir: str | Path, overrides: Sequence[str] = (), tag: str = "", wandb_run: Any = None) -> RunOutcome:
    """Run the task named by ``cfg.task`` and write its outputs under ``output_dir``.

    overrides: the command-line overrides that produced ``cfg``; a report hands them on to its
               sections so that ``dataset=...`` on the command line reaches every section.
    tag:       set for multirun jobs; trained variants go to ``<variant>@<tag>`` in the store.
    wandb_run: an already running W&B run to log into (report sections); None starts one.
    """
    output_dir = Path(output_dir).expanduser().resolve()
    _check_writable(output_dir)
    task = cfg.get("task")
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}'", f"set task to one of: {', '.join(TASKS)} (or pick an experiment=...)")
    if task == "train":
        return train(cfg, output_dir, tag=tag)
    if task == "probe":
        return probe(cfg, output_dir, wandb_run=wandb_run)
    from robustness.reporting.report import build_report

    return build_report(cfg, output_dir, overrides, wandb_run=wandb_run)


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe_file = directory / ".write-test"
        probe_file.write_text("")
        probe_file.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cannot write to the output directory {directory} ({exc.strerror or exc})",
            "choose a writable place with paths.output_dir=... (or hydra.run.dir=...)",
        ) from None


# --------------------------------------------------------------------------------------
# shared building blocks


def resolve_path(path: str) -> Path:
    return Path(str(path)).expanduser().resolve()


def device_for(cfg: DictConfig) -> torch.device:
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def datamodule_for(cfg: DictConfig) -> ImageDataModule:
    datamodule = build("dataset", cfg.dataset, data_dir=str(resolve_path(cfg.paths.data_dir)), seed=int(cfg.seed))
    datamodule.setup("fit")
    return datamodule


def store_for(cfg: DictConfig, info_name: str, tag: str = "") -> ModelStore:
    return ModelStore(resolve_path(cfg.paths.artifacts_dir), info_name, str(cfg.model.name), tag)


def plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) or OmegaConf.is_list(node) else node


def model_cfg_dict(cfg: DictConfig) -> dict[str, Any]:
    return plain(cfg.model)


def compose_experiment(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``experiment=name`` plus overrides with the project's config (Hydra must be initialised)."""
    from hydra import compose
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose(config_name="config", overrides=[f"experiment={name}", *overrides])
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"cannot compose experiment '{name}': {str(exc).splitlines()[0]}", "check the experiment name and overrides (`python -m robustness --help` lists them)") from None
    with open_dict(cfg):
        cfg.experiment_name = name
    return cfg


def variant_command(cfg: DictConfig, variant: str) -> str:
    experiment = cfg.store.variant_experiments.get(variant)
    if experiment is None:
        return f"(no experiment is registered for variant '{variant}' under store.variant_experiments)"
    return f"python -m robustness experiment={experiment} dataset={cfg.dataset.name} model={cfg.model.name} paths.artifacts_dir={cfg.paths.artifacts_dir}"


def ensure_variant(cfg: DictConfig, variant: str, output_dir: Path, info_name: str) -> None:
    """Make sure the store holds ``variant``: train it when allowed, else explain how to get it."""
    store = store_for(cfg, info_name)
    if store.has(variant):
        return
    experiment = cfg.store.variant_experiments.get(variant)
    if not cfg.store.train_missing or experiment is None:
        raise StoreError(
            f"the store has no '{variant}' model for {info_name}/{cfg.model.name} (looked in {store.variant_dir(variant)})",
            f"train it with: {variant_command(cfg, variant)}",
        )
    with _variant_lock(store, variant):
        # Another job (a parallel test worker, a multirun sibling) may have trained it meanwhile.
        if store.has(variant):
            return
        _train_missing_variant(cfg, variant, experiment, output_dir)


@contextmanager
def _variant_lock(store: ModelStore, variant: str) -> Iterator[None]:
    """One process at a time trains a given missing variant; the others wait, then reuse it."""
    import fcntl

    lock_path = store.variant_dir(variant).parent / f".{variant}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _train_missing_variant(cfg: DictConfig, variant: str, experiment: str, output_dir: Path) -> None:
    log.info("variant '%s' is missing from the store: training it with experiment=%s", variant, experiment)
    child = compose_experiment(experiment, list(cfg.store.train_overrides))
    with open_dict(child):
        for key in ("dataset", "model", "paths", "logger", "store"):
            child[key] = cfg[key]
        child.seed = cfg.seed
        child.trainer.accelerator = cfg.trainer.accelerator
    if child.regularizer.variant != variant:
        raise ConfigError(
            f"store.variant_experiments maps '{variant}' to experiment '{experiment}', which trains variant '{child.regularizer.variant}'",
            f"point store.variant_experiments.{variant} at an experiment that trains '{variant}'",
        )
    train(child, output_dir / f"train_{variant}")


# --------------------------------------------------------------------------------------
# train


class EpochCheckpoint(pl.Callback):
    """Keep ``<resume dir>/last.ckpt`` at every epoch end so that an interrupted run can resume.

    Resuming is exact: a run resumed from epoch ``k`` ends with the same weights as one that
    was never interrupted (on CPU, same seed). That holds because

    - checkpoints are taken at epoch ends only (a partly done epoch is lost on interruption,
      never half-replayed); Lightning restores the model, optimiser, LR scheduler and loop counters;
    - the shuffling order is a function of (seed, epoch) (``EpochSeededSampler``);
    - the global RNG states (torch, CUDA, numpy, python) at the epoch end are stored in the
      checkpoint and put back at the start of the next epoch, so random attack starts, dropout
      and augmentation in the main process continue the sequence the uninterrupted run would
      have drawn. (Not covered: random numbers drawn in DataLoader worker processes, and
      ``on_train_epoch_start`` hooks of the module or of later callbacks that draw them.)

    The config fingerprint is stored inside the checkpoint itself (one atomic file): a checkpoint
    written by a run with a different config is never resumed from.
    """

    KEY = "robustness_resume"

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory = directory
        self.fingerprint = fingerprint
        self.interruption: BaseException | None = None
        self._rng_to_restore: dict[str, Any] | None = None

    @property
    def path(self) -> Path:
        return self.directory / "last.ckpt"

    # ---- saving ------------------------------------------------------------------------
    def _save(self, trainer: pl.Trainer) -> None:
        from robustness.io import _atomic

        # weights_only=False here means "the full training state" (optimiser, schedulers, loops).
        # Trainer.save_checkpoint is collective (every rank calls it, only rank 0 writes), so
        # only rank 0 goes through a temporary file: another rank's empty temporary file must
        # never replace the checkpoint.
        if trainer.is_global_zero:
            self.directory.mkdir(parents=True, exist_ok=True)
            _atomic(self.path, lambda tmp: trainer.save_checkpoint(tmp, weights_only=False))
        else:
            trainer.save_checkpoint(self.path, weights_only=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Epoch boundaries are the points from which a resumed run is bit-identical to an
        # uninterrupted one (the shuffling order is a function of seed and epoch).
        self._save(trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[self.KEY] = {"fingerprint": self.fingerprint, "rng": _rng_states()}

    # ---- resuming ----------------------------------------------------------------------
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = (checkpoint.get(self.KEY) or {}).get("rng")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The first epoch after a resume: continue the random streams where the saved epoch left them.
        if self._rng_to_restore is None:
            return
        _set_rng_states(self._rng_to_restore)
        self._rng_to_restore = None
        # A resumed fit() makes this epoch's batch iterator early, before the sampler learns the
        # epoch and before the RNG states above are back (creating it draws a base seed from the
        # global RNG). An uninterrupted run makes it right after this hook: do the same here.
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if fetcher is not None and trainer.current_epoch > 0:
            iter(fetcher)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning turns a KeyboardInterrupt inside fit() into sys.exit(1); remember what it was.
        if isinstance(exception, (KeyboardInterrupt, SystemExit)):
            self.interruption = exception

    def discard(self) -> None:
        """Drop the resume checkpoint once the run is complete; leave one that another config's run
        has written meanwhile (and any temporary file of a run still going) alone."""
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True).get(self.KEY) or {}
            if saved.get("fingerprint") == self.fingerprint:
                self.path.unlink()
        except Exception:  # noqa: BLE001 - absent or unreadable: not ours to delete
            pass
        try:
            self.directory.rmdir()
        except OSError:
            pass

    def resumable(self) -> Path | None:
        """``last.ckpt`` when it exists, is readable and was written with this config; else None."""
        if not self.path.is_file():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True).get(self.KEY) or {}
        except Exception as exc:  # noqa: BLE001 - unreadable for any reason: start afresh
            log.warning("ignoring the resume checkpoint %s: it cannot be read safely (%s: %s); training starts from scratch",
                        self.path, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return None
        if saved.get("fingerprint") != self.fingerprint:
            log.warning("ignoring the resume checkpoint %s: it was written by a run with a different configuration; "
                        "training starts from scratch (and will replace it)", self.path)
            return None
        return self.path


def _rng_states() -> dict[str, Any]:
    """The global random states, as tensors and plain numbers (loadable with weights_only=True)."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


class Interrupted(KeyboardInterrupt):
    """A stop requested by a signal other than SIGINT (SIGTERM from a scheduler or ``kill``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"received signal {signum}")
        self.signum = signum


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (e.g. from a cluster scheduler) like Ctrl-C: stop cleanly, keep checkpoints."""

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def train(cfg: DictConfig, output_dir: Path, tag: str = "") -> RunOutcome:
    """Fit one variant and write it to the store."""
    output_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    datamodule = datamodule_for(cfg)
    info = datamodule.info
    model = build("model", cfg.model, info=info)
    regularizer = build("regularizer", cfg.regularizer)
    variant = regularizer.variant
    store = store_for(cfg, info.name, tag)
    device = device_for(cfg)

    if regularizer.init_from:
        ensure_variant(cfg, regularizer.init_from, output_dir, info.name)
        store.load_into(regularizer.init_from, model, info, model_cfg_dict(cfg))
    regularizer.setup(TrainContext(model=model, datamodule=datamodule, store=store, device=device, config=cfg))
    datamodule.train_set = regularizer.train_dataset(datamodule.train_set)

    trainer_kwargs = plain(cfg.trainer)
    own = {key: trainer_kwargs.pop(key) for key in _OWN_TRAINER_KEYS if key in trainer_kwargs}
    optim = plain(cfg.optim)
    module = ClassifierModule(model, info.num_classes, regularizer, max_bad_steps=int(own.get("max_bad_steps", 20)), **optim)

    resolved = tracking.plain_config(cfg)
    checkpoint = EpochCheckpoint(store.resume_dir(variant), _resume_fingerprint(resolved))
    resume_from = checkpoint.resumable() if cfg.get("resume", True) else None
    if resume_from is not None:
        log.info("resuming '%s' from %s (the last completed epoch of an interrupted run; resume=false starts afresh)", variant, resume_from)

    logger = tracking.make_lightning_logger(
        plain(cfg.logger), output_dir, name=f"{cfg.get('experiment_name') or 'train'}-{variant}", config=resolved,
        tags=[f"variant:{variant}", f"dataset:{info.name}", f"experiment:{cfg.get('experiment_name')}"],
    )
    trainer = pl.Trainer(
        **trainer_kwargs,
        logger=logger,
        callbacks=[checkpoint, *regularizer.callbacks()],
        default_root_dir=str(output_dir),
        enable_checkpointing=False,
    )
    try:
        with _sigterm_as_interrupt():
            try:
                # weights_only=True: the resume checkpoint holds only tensors, numbers, strings and
                # containers of them (see EpochCheckpoint), so nothing in it can run code.
                trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None, weights_only=True)
                if trainer.interrupted:
                    raise checkpoint.interruption if isinstance(checkpoint.interruption, KeyboardInterrupt) else KeyboardInterrupt()
                fit_metrics = _scalars(trainer.callback_metrics)
                test_metrics = _scalars(trainer.test(module, datamodule=datamodule, verbose=False)[0])
            except SystemExit:
                # Lightning handles a KeyboardInterrupt inside fit() or test() by cleaning up and
                # calling sys.exit(1); EpochCheckpoint.on_exception kept the interrupt (and its signal).
                if not trainer.interrupted:
                    raise
                raise checkpoint.interruption if isinstance(checkpoint.interruption, KeyboardInterrupt) else KeyboardInterrupt() from None
    except KeyboardInterrupt:
        tracking.finish_run(logger)
        where = checkpoint.path if checkpoint.path.is_file() else "none yet: no epoch was completed"
        log.warning("training of '%s' interrupted; run the same command again to resume from the last completed epoch (checkpoint: %s)", variant, where)
        raise
    metrics = {**fit_metrics, **test_metrics}
    metrics["skipped_steps"] = module.skipped_steps
    metrics["epochs"] = trainer.current_epoch
    # What the regularizer did (e.g. the adversarial set's size and accuracy history), kept with the model.
    metrics["regularizer"] = regularizer.describe()
    if trainer.is_global_zero:
        store.save(variant, model, info, model_cfg_dict(cfg), metrics, OmegaConf.to_yaml(cfg, resolve=True))
        atomic_write_json(output_dir / "metrics.json", metrics)
        checkpoint.discard()
        log.info("trained '%s': test accuracy %.4f -> %s", variant, metrics.get("test/acc", float("nan")), store.variant_dir(variant, tagged=True))
    tracking.finish_run(logger, summary=metrics)
    return RunOutcome("train", output_dir, metrics=metrics)


# Trainer options that change how a run looks, not what it computes: a run may resume with them changed.
_COSMETIC_TRAINER_KEYS = ("enable_progress_bar", "enable_model_summary", "log_every_n_steps")


def _resume_fingerprint(resolved: dict[str, Any]) -> str:
    """A hash of everything that determines the trained weights; a resume checkpoint is used only when it matches."""
    keyed = {k: resolved.get(k) for k in ("dataset", "model", "regularizer", "optim", "trainer", "seed")}
    keyed["trainer"] = {k: v for k, v in (keyed["trainer"] or {}).items() if k not in _COSMETIC_TRAINER_KEYS}
    return fingerprint.of_config(keyed)


def _scalars(values: Any) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if not torch.is_tensor(v) or v.numel() == 1}


# --------------------------------------------------------------------------------------
# probe


def load_variants(cfg: DictConfig, datamodule: ImageDataModule, output_dir: Path, device: torch.device) -> dict[str, torch.nn.Module]:
    variants = list(cfg.variants)
    if not variants:
        raise ConfigError("no model variants to probe", "set variants=[base,adversarial,cure] (or a subset)")
    models: dict[str, torch.nn.Module] = {}
    store = store_for(cfg, datamodule.info.name)
    for variant in variants:
        ensure_variant(cfg, variant, output_dir, datamodule.info.name)
        model = build("model", cfg.model, info=datamodule.info)
        store.load_into(variant, model, datamodule.info, model_cfg_dict(cfg))
        models[variant] = model.to(device).eval()
    return models


def probe_work_dir(cfg: DictConfig, info_name: str) -> Path:
    """Where a probe keeps partial and final results: keyed by everything that determines them."""
    store = store_for(cfg, info_name)
    stamps = {}
    for variant in cfg.variants:
        weights = store.variant_dir(variant) / "model.pt"
        stamps[variant] = weights.stat().st_mtime_ns if weights.is_file() else None
    key = fingerprint.of_config({
        "probe": plain(cfg.probe), "attack": plain(cfg.attack), "dataset": plain(cfg.dataset),
        "variants": list(cfg.variants), "seed": int(cfg.seed), "weights": stamps,
    })
    return store.root / store.dataset / store.model / "probes" / f"{cfg.probe.name}-{key}"


def probe(cfg: DictConfig, output_dir: Path, wandb_run: Any = None) -> RunOutcome:
    """Run ``cfg.probe`` on the variants from the store, draw its figures and tables."""
    if cfg.get("probe") is None or "name" not in cfg.probe:
        raise ConfigError("task=probe needs a probe", f"choose one with probe=NAME ({', '.join(choices('probe'))}) or an experiment=...")
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    name = str(cfg.probe.name)
    compute = lookup("probe", name)
    draw = lookup("reporter", name)
    device = device_for(cfg)
    datamodule = datamodule_for(cfg)
    models = load_variants(cfg, datamodule, output_dir, device)

    work_dir = probe_work_dir(cfg, datamodule.info.name)
    final = work_dir / "result"
    if (final / "result.json").is_file() and not cfg.get("recompute", False):
        log.info("probe '%s': reusing the result computed earlier with the same config (%s); recompute=true forces a new one", name, final)
        result = ProbeResult.load(final)
    else:
        if cfg.get("recompute", False):
            shutil.rmtree(work_dir / "partial", ignore_errors=True)
        ctx = ProbeContext(
            cfg=plain(cfg.probe), models=models, data=datamodule, attack=plain(cfg.attack), device=device,
            seed=int(cfg.seed), work_dir=work_dir / "partial", progress=_progress_printer(name), config=cfg,
        )
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(int(cfg.seed))
        result = compute(ctx)
        result.meta.setdefault("experiment", cfg.get("experiment_name"))
        result.meta.setdefault("variants", list(cfg.variants))
        result.meta.setdefault("dataset", datamodule.info.name)
        result.meta.setdefault("model", str(cfg.model.name))
        result.save(final)
    result.save(output_dir / "results" / name)
    artefacts = draw(result, output_dir)

    own_run = wandb_run is None and cfg.logger.name == "wandb"
    if own_run:
        wandb_run = tracking.start_wandb_run(
            plain(cfg.logger), output_dir, name=str(cfg.get("experiment_name") or name), config=tracking.plain_config(cfg),
            tags=[f"probe:{name}", f"dataset:{datamodule.info.name}", f"experiment:{cfg.get('experiment_name')}"],
        )
    tracking.log_artefacts(wandb_run, artefacts)
    if own_run:
        wandb_run.finish()
    for artefact in artefacts:
        log.info("wrote %s %s: %s", artefact.kind, artefact.name, ", ".join(str(p) for p in artefact.paths))
    return RunOutcome("probe", output_dir, artefacts=artefacts)


def _progress_printer(name: str):
    state = {"last": 0.0}

    def report(done: int, total: int, what: str = "") -> None:
        now = time.monotonic()
        if done >= total or now - state["last"] > 2.0:
            state["last"] = now
            print(f"  [{name}] {what} {done}/{total}", file=sys.stderr, flush=True)

    return report
