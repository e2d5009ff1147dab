"""The train stage: fit one variant and write it to the store under its fingerprint."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from robustness import tracking
from robustness.errors import ConfigError
from robustness.io import atomic_write_json
from robustness.registry import build
from robustness.stages import variants as variant_lookup
from robustness.stages.common import RunOutcome, device_for, make_datamodule, to_python, store_for
from robustness.tensors import relative_change
from robustness.training.module import ClassifierModule
from robustness.training.regularizer import TrainContext
from robustness.training.resume import RandomState, discard_checkpoints, last_checkpoint, sigterm_as_interrupt

log = logging.getLogger("robustness")

# Keys of the trainer group that are ours, not Lightning's.
_OWN_TRAINER_KEYS = ("max_bad_steps",)


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
    with store.lock(v.key):
        # Another job (a parallel test worker, a multirun sibling) may have trained it meanwhile.
        if store.has(v.key) and not cfg.get("retrain", False):
            log.info("'%s' is in the store already with this exact config (%s): reusing it; retrain=true trains it again",
                     v.alias, store.entry_dir(v.key))
            store.set_alias(v.alias, v.key)
            metrics = store.metrics(v.key)
            atomic_write_json(output_dir / "metrics.json", metrics)
            return RunOutcome("train", output_dir, metrics=metrics)
        from robustness.stages.checks import check_config

        check_config(cfg, output_dir)  # a variant trained for a probe is checked like a run of its own
        return _fit(v, store, output_dir)


def _trainer_options(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    options = to_python(cfg.trainer)
    own = {key: options.pop(key) for key in _OWN_TRAINER_KEYS if key in options}
    if options.get("enable_progress_bar") == "auto":
        # Bars redraw in place: only a terminal shows them as such; a log file gets every frame.
        options["enable_progress_bar"] = sys.stderr.isatty()
    options["plugins"] = [instantiate(p) for p in options.get("plugins") or []]
    return options, own


def _fit(v: variant_lookup.Variant, store: Any, output_dir: Path) -> RunOutcome:
    cfg = v.config
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
    random_state = next((c for c in callbacks if isinstance(c, RandomState)), None)
    if random_state is None:
        raise ConfigError("the callbacks config has no RandomState callback, so an interrupted run could not resume exactly",
                          "keep callbacks.random_state (conf/callbacks/default.yaml)")
    resume_from = last_checkpoint(resume_dir) if cfg.get("resume", True) else None
    if resume_from is not None:
        log.info("resuming '%s' from %s (the last completed epoch of an interrupted run; resume=false starts afresh)", v.alias, resume_from)

    resolved = tracking.plain_config(cfg)
    logger = tracking.make_lightning_logger(
        to_python(cfg.logger), output_dir, name=f"{cfg.get('experiment_name') or 'train'}-{v.variant}", config=resolved,
        tags=[f"variant:{v.variant}", f"dataset:{info.name}", f"experiment:{cfg.get('experiment_name')}"],
    )
    trainer = pl.Trainer(**trainer_options, logger=logger, callbacks=[*callbacks, *regularizer.callbacks()], default_root_dir=str(output_dir))

    def interruption() -> KeyboardInterrupt:
        return random_state.interruption if isinstance(random_state.interruption, KeyboardInterrupt) else KeyboardInterrupt()

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
    metrics: dict[str, Any] = {**fit_metrics, **test_metrics}
    metrics["skipped_steps"] = module.skipped_steps
    metrics["epochs"] = trainer.current_epoch
    # What the regularizer did (e.g. the adversarial set's size and accuracy history), kept with the model.
    metrics["regularizer"] = regularizer.describe()
    metrics["fingerprint"] = v.key
    metrics["start"] = {"from": v.parent.alias if v.parent is not None else "random init", "weight_change": relative_change(start, list(model.parameters()))}
    if trainer.is_global_zero:
        directory = store.save(v.key, model, info, to_python(cfg.model), metrics, OmegaConf.to_yaml(cfg, resolve=True),
                               variant=v.variant, identity=v.identity)
        store.set_alias(v.alias, v.key)
        atomic_write_json(output_dir / "metrics.json", metrics)
        discard_checkpoints(resume_dir)
        log.info("trained '%s': test accuracy %.4f -> %s", v.alias, metrics.get("test/acc", float("nan")), directory)
    tracking.finish_run(logger, summary=metrics)
    return RunOutcome("train", output_dir, metrics=metrics)


def _scalars(values: Any) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if not torch.is_tensor(v) or v.numel() == 1}
