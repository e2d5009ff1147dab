"""The probe stage: load the variants, compute (or reuse) the probe's result, draw it."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from robustness import fingerprint, tracking
from robustness.errors import ConfigError, StoreError
from robustness.probes.base import ProbeContext, ProbeResult, TrainingRecord
from robustness.progress import progress_reporter
from robustness.registry import build, choices, lookup
from robustness.stages.common import RunOutcome, device_for, make_datamodule, to_python, store_for, writable_problem
from robustness.stages.variants import Variant, load_models, variant_style, weights_digest

log = logging.getLogger("robustness")


def result_key(cfg: DictConfig, variants: dict[str, Variant], weights: dict[str, str]) -> str:
    """What a probe result depends on: the probe and attack configs, the split, the seed, and
    each model's fingerprint and exact weights."""
    return fingerprint.of_config({
        "probe": to_python(cfg.probe),
        "attack": to_python(cfg.attack),
        "split": fingerprint.dataset_identity(to_python(cfg.dataset), int(cfg.seed)),
        "seed": int(cfg.seed),
        "models": {name: [v.key, weights[name]] for name, v in variants.items()},
    })


def _cache_root(cfg: DictConfig, store_probes: Path, output_dir: Path) -> Path | None:
    """Where results are cached: the store, or (read-only store) the run's folder; None: no caching."""
    if writable_problem(store_probes) is None:
        return store_probes
    fallback = output_dir / "probe-cache"
    log.warning("the store's probe folder %s is not writable: caching this probe's results in %s instead", store_probes, fallback)
    return fallback if writable_problem(fallback) is None else None


def training_record(v: Variant, store: Any, info: Any, device: torch.device) -> TrainingRecord:
    """What the store knows of how ``v`` was trained: its metrics, its starting model, its adversarial set."""
    if "external" in v.identity:
        return TrainingRecord("published")
    metrics = store.metrics(v.key)
    start_model = None
    if v.parent is not None:
        start_model = build("model", v.parent.config.model, info=info)
        store.load_into(v.parent.key, start_model, info, to_python(v.parent.config.model), what=f"the '{v.parent.alias}' weights")
        start_model = start_model.to(device).eval()
    set_name = (metrics.get("regularizer") or {}).get("adv_set")
    adversarial_set = store.load_tensors(v.key, set_name) if set_name else None
    return TrainingRecord(v.parent.alias if v.parent is not None else "random init", metrics, start_model, adversarial_set)


def probe(cfg: DictConfig, output_dir: Path, overrides: Sequence[str] = (), tag: str = "", wandb_run: Any = None) -> RunOutcome:
    """``task=probe``: run ``cfg.probe`` on the variants, draw its figures and tables."""
    if cfg.get("probe") is None or "name" not in cfg.probe:
        raise ConfigError("task=probe needs a probe", f"choose one with probe=NAME ({', '.join(choices('probe'))}) or an experiment=...")
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    name = str(cfg.probe.name)
    compute = lookup("probe", name)
    draw = lookup("reporter", name)
    device = device_for(cfg)
    datamodule = make_datamodule(cfg)
    models, variants = load_models(cfg, datamodule, output_dir, device, overrides)
    store = store_for(cfg, datamodule.info.name)
    weights = {n: weights_digest(v, store) for n, v in variants.items()}

    styles = {n: variant_style(v) for n, v in variants.items()}
    cache_root = _cache_root(cfg, store.probes_dir(), output_dir)
    work_dir = (cache_root or output_dir / "probe-work") / f"{name}-{result_key(cfg, variants, weights)}"
    final = work_dir / "result"
    if cache_root is None:
        log.warning("probe '%s': no writable folder for its cache, so this result is computed afresh and not kept", name)
    result, artefacts = None, None
    if (final / "result.json").is_file() and not cfg.get("recompute", False):
        try:
            result = ProbeResult.load(final)
            result.meta["variant_styles"] = styles  # the display settings of this run, not of the one that computed it
            artefacts = draw(result, output_dir)
            log.info("probe '%s': reusing the result computed earlier with the same config and weights (%s); recompute=true forces a new one", name, final)
        except (StoreError, KeyError, IndexError, ValueError, TypeError) as exc:
            log.warning("probe '%s': the cached result %s cannot be used (%s: %s); computing it again",
                        name, final, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            result = artefacts = None
    if result is None:
        if cfg.get("recompute", False):
            shutil.rmtree(work_dir / "partial", ignore_errors=True)
        ctx = ProbeContext(
            options=to_python(cfg.probe), models=models, data=datamodule, attack=to_python(cfg.attack), device=device,
            seed=int(cfg.seed), work_dir=work_dir / "partial", progress=progress_reporter(name),
            training=lambda variant: training_record(variants[variant], store, datamodule.info, device),
            # recompute=true computes afresh: nothing shared with earlier runs is reused then.
            shared_dir=cache_root / "per-model" if cache_root is not None and not cfg.get("recompute", False) else None,
        )
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(int(cfg.seed))
        result = compute(ctx)
        result.meta.setdefault("experiment", cfg.get("experiment_name"))
        result.meta.setdefault("variants", list(models))
        result.meta.setdefault("dataset", datamodule.info.name)
        result.meta.setdefault("model", str(cfg.model.name))
        result.meta.setdefault("fingerprints", {n: v.key for n, v in variants.items()})
        result.meta["variant_styles"] = styles
        result.save(final)
        if cache_root is None:
            shutil.rmtree(work_dir, ignore_errors=True)
        artefacts = draw(result, output_dir)
    result.save(output_dir / "results" / name)

    own_run = wandb_run is None and cfg.logger.name == "wandb"
    if own_run:
        wandb_run = tracking.start_wandb_run(
            to_python(cfg.logger), output_dir, name=str(cfg.get("experiment_name") or name), config=tracking.plain_config(cfg),
            tags=[f"probe:{name}", f"dataset:{datamodule.info.name}", f"experiment:{cfg.get('experiment_name')}"],
        )
    tracking.log_artefacts(wandb_run, artefacts)
    if own_run:
        wandb_run.finish()
    for artefact in artefacts:
        log.info("wrote %s %s: %s", artefact.kind, artefact.name, ", ".join(str(p) for p in artefact.paths))
    return RunOutcome("probe", output_dir, artefacts=artefacts, results={name: result})
