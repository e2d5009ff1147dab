"""The train stage: fit one variant and write it to the store under its fingerprint.

Several processes (DDP). Only rank 0 takes the store's lock and writes; the other ranks train
beside it and wait for its save. Two ways they come to exist:

- Lightning's DDP launcher (``trainer=ddp``, ``trainer.devices=N``) starts ranks 1..N-1 during
  ``fit`` by running the command line again. Such a process must not run the user's command (it
  would wait for the lock rank 0 holds while rank 0 waits for it to join), so rank 0 writes the
  one training they join to ``<output>/.ddp/<key>.json`` and names it in ``FOLLOWER_JOB_ENV``;
  the entry point sees it and calls :func:`follow`. Each DDP training starts its own ranks.
- A launcher started every process of the job (torchrun, SLURM or submitit tasks: a
  ``LaunchedGroup``): each runs the whole command; at each training rank 0 decides under the
  lock (train or reuse) and tells the others through torch.distributed.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from robustness import fingerprint, tracking
from robustness.errors import ConfigError, TrainingError
from robustness.io import atomic_write_json, read_json
from robustness.registry import build
from robustness.stages import variants as variant_lookup
from robustness.stages.common import (FOLLOWER_JOB_ENV, OWN_TRAINER_KEYS, LaunchedGroup, RunOutcome, device_for, launched_group, make_datamodule,
                                      to_python, store_for)
from robustness.tensors import relative_change
from robustness.training.module import ClassifierModule
from robustness.training.regularizer import TrainContext
from robustness.training.resume import RandomState, discard_checkpoints, last_checkpoint, sigterm_as_interrupt

log = logging.getLogger("robustness")


def train(cfg: DictConfig, output_dir: Path, overrides: Sequence[str] = (), tag: str = "", wandb_run: Any = None) -> RunOutcome:
    """``task=train``: train the variant the run's regularizer names, with the run's recipe."""
    # The recipe's overrides for this variant come first, then the whole command line.
    v = variant_lookup.resolve(cfg, str(cfg.regularizer.variant), overrides, own_overrides=overrides)
    if tag:
        v.alias = f"{v.variant}@{tag}"
    return train_variant(v, output_dir, overrides)


def train_variant(v: variant_lookup.Variant, output_dir: Path, overrides: Sequence[str] = ()) -> RunOutcome:
    """Train ``v`` unless the store holds it already; one process at a time per entry."""
    cfg = v.config
    output_dir.mkdir(parents=True, exist_ok=True)
    if v.parent is not None:
        variant_lookup.ensure_trained(v.parent, output_dir, overrides)
    store = store_for(cfg, str(cfg.dataset.name))
    group = launched_group()
    if group is not None and not group.leader:
        # Rank 0 of the job decides, under the lock; this process trains beside it, or reuses.
        _connect(group, cfg)
        decision = _share(None)
        if decision == "reuse":
            return RunOutcome("train", output_dir, metrics=store.metrics(v.key))
        if decision != "train":
            raise TrainingError(f"rank 0 of this {group.launcher} job could not start training '{v.alias}'", "see rank 0's error above")
        return _fit(v, store.reader(), output_dir, overrides, group=group)
    with store.lock(v.key):
        if group is not None:
            _connect(group, cfg)
        # Another job (a parallel test worker, a multirun sibling) may have trained it meanwhile.
        if store.has(v.key) and not cfg.get("retrain", False):
            _share("reuse", group)
            log.info("'%s' is in the store already with this exact config (%s): reusing it; retrain=true trains it again",
                     v.alias, store.entry_dir(v.key))
            store.set_alias(v.alias, v.key)
            metrics = store.metrics(v.key)
            atomic_write_json(output_dir / "metrics.json", metrics)
            return RunOutcome("train", output_dir, metrics=metrics)
        from robustness.stages.checks import check_config

        try:
            check_config(cfg, output_dir)  # a variant trained for a probe is checked like a run of its own
        except BaseException:
            _share("failed", group)
            raise
        _share("train", group)
        return _fit(v, store, output_dir, overrides, group=group)


def follow(job_path: Path, config_dir: Path) -> None:
    """Rank 1.. of a DDP training that Lightning started by running the command again: join the
    training ``job_path`` describes (written by rank 0 in :func:`_fit`), then wait for rank 0's save."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    job = read_json(job_path)
    output_dir = Path(job["output_dir"])
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):  # a parent variant is composed from its experiment
        cfg = OmegaConf.create(job["config"])
        v = variant_lookup.of_training_config(cfg, job["overrides"], job["alias"])
    if v.key != job["key"]:
        raise TrainingError(f"DDP rank {os.environ.get('LOCAL_RANK')} composed '{v.alias}' to fingerprint {v.key[:16]}..., "
                            f"rank 0 to {job['key'][:16]}...", "report this: the ranks of one training must agree on its config")
    store = store_for(cfg, str(cfg.dataset.name)).reader()
    resume_from = Path(job["resume_from"]) if job.get("resume_from") else None
    try:
        _fit(v, store, output_dir, job["overrides"], resume_from=resume_from, follower=True)
    finally:
        # A process that exits with its gloo group alive can abort in the group's destructor
        # ("terminate called without an active exception"); Lightning's launcher in rank 0 then
        # kills rank 0 too, in the middle of whatever it went on to do.
        _leave_group()


def _trainer_options(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    options = to_python(cfg.trainer)
    own = {key: options.pop(key) for key in OWN_TRAINER_KEYS if key in options}
    if options.get("enable_progress_bar") == "auto":
        # Bars redraw in place: only a terminal shows them as such; a log file gets every frame.
        options["enable_progress_bar"] = sys.stderr.isatty()
    options["plugins"] = [instantiate(p) for p in options.get("plugins") or []]
    return options, own


def _fit(v: variant_lookup.Variant, store: Any, output_dir: Path, overrides: Sequence[str] = (), *,
         group: LaunchedGroup | None = None, resume_from: Path | None = None, follower: bool = False) -> RunOutcome:
    """Train ``v``; rank 0 saves it. ``follower``: a rank Lightning started (see :func:`follow`)."""
    cfg = v.config
    leader = not follower and (group is None or group.leader)
    if group is not None and not leader and _share(None) != "ready":
        # Rank 0 sets up first: a regularizer writes what it derives (an adversarial set) into the store, the others read it.
        raise TrainingError(f"rank 0 of this {group.launcher} job could not set up the training of '{v.alias}'", "see rank 0's error")
    try:
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
        datamodule = make_datamodule(cfg)
        info = datamodule.info
        model = build("model", cfg.model, info=info)
        regularizer = build("regularizer", cfg.regularizer)
        device = device_for(cfg)
        trainer_options, own = _trainer_options(cfg)
        regularizer.check_precision(str(trainer_options.get("precision", "32-true")))

        if v.parent is not None:
            store.load_into(v.parent.key, model, info, to_python(v.parent.config.model), what=f"the '{v.parent.alias}' weights")
        # The weights training starts from (the parent's, or the seeded initialisation), to say how far it moved them.
        start = [p.detach().clone() for p in model.parameters()]
        regularizer.setup(TrainContext(model=model, datamodule=datamodule, store=store, device=device, config=cfg, cache_key=v.key))
        datamodule.train_set = regularizer.train_dataset(datamodule.train_set)
        module = ClassifierModule(model, info.num_classes, regularizer, max_bad_steps=int(own.get("max_bad_steps", 20)), **to_python(cfg.optim))

        resume_dir = store.resume_dir(v.key)
        callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node is not None]
        for callback in callbacks:
            if isinstance(callback, pl.callbacks.ModelCheckpoint):
                callback.dirpath = str(resume_dir)
        if not any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks):
            # callbacks.model_checkpoint=null: no checkpoints at all, rather than Lightning's own beside the logs.
            trainer_options["enable_checkpointing"] = False
        random_state = next((c for c in callbacks if isinstance(c, RandomState)), None)
        if random_state is None:
            raise ConfigError("the callbacks config has no RandomState callback, so an interrupted run could not resume exactly",
                              "keep callbacks.random_state (conf/callbacks/default.yaml)")
        if not follower:  # a follower resumes from the checkpoint rank 0 chose
            resume_from = last_checkpoint(resume_dir) if cfg.get("resume", True) else None
        if resume_from is not None:
            log.info("resuming '%s' from %s (the last completed epoch of an interrupted run; resume=false starts afresh)", v.alias, resume_from)
    except BaseException:
        if group is not None and leader:
            _share("failed", group)
        raise
    if group is not None and leader:
        _share("ready", group)

    if leader:
        logger = tracking.make_lightning_logger(
            to_python(cfg.logger), output_dir, name=f"{cfg.get('experiment_name') or 'train'}-{v.variant}", config=tracking.plain_config(cfg),
            tags=[f"variant:{v.variant}", f"dataset:{info.name}", f"experiment:{cfg.get('experiment_name')}"],
        )
    else:  # one W&B run per training: rank 0's
        logger = False
    trainer = pl.Trainer(**trainer_options, logger=logger, callbacks=[*callbacks, *regularizer.callbacks()], default_root_dir=str(output_dir))
    distributed = trainer.world_size > 1
    # Lightning starts the other ranks of this training itself, by running the command again (module docstring).
    launch = _Launch(v, output_dir, overrides, resume_from) if leader and group is None and distributed else None

    def interruption() -> KeyboardInterrupt:
        return random_state.interruption if isinstance(random_state.interruption, KeyboardInterrupt) else KeyboardInterrupt()

    try:
        try:
            with sigterm_as_interrupt():
                try:
                    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None, weights_only=True)
                    if trainer.interrupted:
                        raise interruption()
                    fit_metrics = _scalars(trainer.callback_metrics)
                    test_metrics = _scalars(trainer.test(module, datamodule=datamodule, verbose=False)[0])
                except SystemExit:
                    # Lightning handles a KeyboardInterrupt inside fit() or test() by cleaning up and
                    # calling sys.exit(1); RandomState.on_exception kept the interrupt (and its signal).
                    if not trainer.interrupted:
                        raise
                    raise interruption() from None
        except KeyboardInterrupt:
            tracking.finish_run(logger)
            where = resume_dir / "last.ckpt"
            log.warning("training of '%s' interrupted; run the same command again to resume from the last completed epoch (checkpoint: %s)",
                        v.alias, where if where.is_file() else "none yet: no epoch was completed")
            raise
        if distributed:
            # What each rank ended with (the DDP test compares these with the stored weights).
            log.info("rank %d of %d ended training '%s' with parameters sha256 %s", trainer.global_rank, trainer.world_size, v.alias,
                     fingerprint.of_state(dict(model.named_parameters())))
        if not leader:
            status = _share(None)
            if status != "saved":
                log.warning("rank 0 could not store '%s' (%s); this rank stops", v.alias, status)
                if not follower:
                    raise TrainingError(f"rank 0 of this {group.launcher if group else 'DDP'} job could not store '{v.alias}'", "see rank 0's error")
            return RunOutcome("train", output_dir)
        try:
            metrics: dict[str, Any] = {**fit_metrics, **test_metrics}
            metrics["skipped_steps"] = module.skipped_steps
            metrics["epochs"] = trainer.current_epoch
            # What the regularizer did (e.g. the adversarial set's size and accuracy history), kept with the model.
            metrics["regularizer"] = regularizer.describe()
            metrics["fingerprint"] = v.key
            metrics["start"] = {"from": v.parent.alias if v.parent is not None else "random init",
                                "weight_change": relative_change(start, list(model.parameters()))}
            directory = store.save(v.key, model, info, to_python(cfg.model), metrics, OmegaConf.to_yaml(cfg, resolve=True),
                                   variant=v.variant, identity=v.identity)
            store.set_alias(v.alias, v.key)
            atomic_write_json(output_dir / "metrics.json", metrics)
            discard_checkpoints(resume_dir)
        except BaseException as exc:
            if distributed:
                _share(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", group)
            raise
        if distributed:
            _share("saved", group)
    finally:
        if launch is not None:
            launch.close()
    log.info("trained '%s': test accuracy %.4f -> %s", v.alias, metrics.get("test/acc", float("nan")), directory)
    tracking.finish_run(logger, summary=metrics)
    return RunOutcome("train", output_dir, metrics=metrics)


# ---- several processes ---------------------------------------------------------------------
# What Lightning's DDP launcher sets in rank 0's environment when it starts the other ranks; put
# back after the training, so that the next DDP training (a fine-tuned child, the next variant of
# a probe) starts its own ranks instead of waiting for ranks that have left.
_LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")


class _Launch:
    """Rank 0's side of a DDP training whose other ranks Lightning starts: their job, and the clean-up after."""

    def __init__(self, v: variant_lookup.Variant, output_dir: Path, overrides: Sequence[str], resume_from: Path | None) -> None:
        self.variables = {name: os.environ.get(name) for name in _LAUNCH_VARIABLES}
        self.threads = torch.get_num_threads()
        job = {"config": OmegaConf.to_yaml(v.config, resolve=True), "overrides": list(overrides), "key": v.key, "alias": v.alias,
               "output_dir": str(output_dir), "resume_from": str(resume_from) if resume_from else None}
        self.job = atomic_write_json(output_dir / ".ddp" / f"{v.key}.json", job)
        os.environ[FOLLOWER_JOB_ENV] = str(self.job)

    def close(self) -> None:
        """Leave the process group Lightning made for this training and restore what it changed in the environment."""
        os.environ.pop(FOLLOWER_JOB_ENV, None)
        self.job.unlink(missing_ok=True)
        try:
            self.job.parent.rmdir()
        except OSError:
            pass
        _leave_group()
        for name, value in self.variables.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        torch.set_num_threads(self.threads)


# The gloo group that carries the ranks' small messages (decisions, save outcomes), whatever
# backend the training uses (NCCL cannot send Python objects without a CUDA device set up for it).
_CONTROL: dict[str, Any] = {}


def _leave_group() -> None:
    """Destroy this process's groups (the training's and the control group), if it has any."""
    import torch.distributed as dist

    _CONTROL.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _control_group() -> Any:
    import torch.distributed as dist

    if "group" not in _CONTROL:
        _CONTROL["group"] = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _CONTROL["group"]


def _share(message: str | None, group: LaunchedGroup | None = None) -> str | None:
    """Rank 0's ``message``, on every rank (a no-op outside a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return message
    box = [message]
    dist.broadcast_object_list(box, src=0, group=_control_group())
    return box[0]


def _connect(group: LaunchedGroup, cfg: DictConfig) -> None:
    """Join the process group of a launched job before its first decision; Lightning's fit reuses it."""
    import torch.distributed as dist
    from lightning_fabric.plugins.environments import LightningEnvironment, SLURMEnvironment, TorchElasticEnvironment
    from lightning_fabric.utilities.distributed import _init_dist_connection

    if dist.is_initialized():
        return
    if group.launcher.startswith("submitit"):
        # Lightning knows no environment for submitit's local tasks: describe the group in the
        # variables its own launcher uses, with a port every task derives from the job's id.
        job = int(os.environ.get("SUBMITIT_LOCAL_JOB_ID", "0") or 0)
        os.environ.update(LOCAL_RANK=str(group.rank), NODE_RANK="0", WORLD_SIZE=str(group.world_size),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(20000 + job % 20000))
    environment = SLURMEnvironment() if SLURMEnvironment.detect() else TorchElasticEnvironment() if TorchElasticEnvironment.detect() \
        else LightningEnvironment()
    backend = "nccl" if device_for(cfg).type == "cuda" else "gloo"
    _init_dist_connection(environment, backend, group.rank, group.world_size)
    # Left before the interpreter's own teardown: a group destroyed there can abort the process
    # (see `follow`), which the launcher reports as this rank's failure.
    atexit.register(_leave_group)


def _scalars(values: Any) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if not torch.is_tensor(v) or v.numel() == 1}
