"""The probe stage: load the variants, compute (or reuse) the probe's result, draw it."""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from torch import nn

from robustness import fingerprint, tracking
from robustness.errors import ConfigError, StoreError
from robustness.probes.base import ProbeContext, ProbeResult, TrainingRecord
from robustness.progress import progress_reporter
from robustness.registry import build, choices, lookup
from robustness.reporting.base import draw_tables
from robustness.stages.common import RunOutcome, device_for, make_datamodule, to_python, store_for, writable_problem
from robustness.stages.variants import Variant, load_resolved, resolve_variants, variant_style, weights_digest

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


@dataclass
class GivenModels:
    """Models and images handed in from Python (``robustness.report``) instead of the store's.

    models:    name -> model in eval mode
    data:      a data-module stand-in serving the given images (``split_tensors``, ``info``)
    cache_dir: where probe results are kept, for every section of the run
    """

    models: dict[str, nn.Module]
    data: Any
    cache_dir: Path


_GIVEN: ContextVar[GivenModels | None] = ContextVar("given_models", default=None)


@contextmanager
def given_models(given: GivenModels) -> Iterator[None]:
    """Inside the block, the probe stage measures ``given`` instead of loading variants from the
    store: a section runs on the given models its ``variants`` name, or on all of them where it
    names none of them. Nothing is trained and the store is not read."""
    token = _GIVEN.set(given)
    try:
        yield
    finally:
        _GIVEN.reset(token)


@dataclass
class _Sources:
    """What one probe run measures, and where its result is kept."""

    names: list[str]
    # The models, loaded when first asked for: a kept result needs none.
    load_models: Callable[[], dict[str, nn.Module]]
    datamodule: Any
    work_dir: Path
    cache_root: Path | None
    training: Any
    styles: dict[str, dict[str, str]]
    fingerprints: dict[str, str]
    model_name: str


def _from_store(cfg: DictConfig, name: str, output_dir: Path, overrides: Sequence[str], device: torch.device) -> _Sources:
    datamodule = make_datamodule(cfg)
    variants, published = resolve_variants(cfg, datamodule, output_dir, device, overrides)
    store = store_for(cfg, datamodule.info.name)
    weights = {n: weights_digest(v, store) for n, v in variants.items()}
    cache_root = _cache_root(cfg, store.probes_dir(), output_dir)
    return _Sources(
        names=list(variants), load_models=lambda: load_resolved(variants, published, datamodule, store, device), datamodule=datamodule,
        work_dir=(cache_root or output_dir / "probe-work") / f"{name}-{result_key(cfg, variants, weights)}", cache_root=cache_root,
        training=lambda variant: training_record(variants[variant], store, datamodule.info, device),
        styles={n: variant_style(v) for n, v in variants.items()}, fingerprints={n: v.key for n, v in variants.items()},
        model_name=str(cfg.model.name),
    )


def _from_given(cfg: DictConfig, name: str, given: GivenModels) -> _Sources:
    wanted = [str(v) for v in cfg.get("variants") or []]
    chosen = [n for n in wanted if n in given.models] or list(given.models)
    models = {n: given.models[n] for n in chosen}
    weights = {n: fingerprint.of_state(model) for n, model in models.items()}
    key = fingerprint.of_config({
        "probe": to_python(cfg.probe), "attack": to_python(cfg.attack), "seed": int(cfg.seed), "models": weights,
        "data": given.data.fingerprint(),
    })
    return _Sources(
        names=chosen, load_models=lambda: models, datamodule=given.data, work_dir=given.cache_dir / f"{name}-{key}", cache_root=given.cache_dir,
        training=lambda variant: TrainingRecord(), styles={n: {"title": n} for n in models}, fingerprints=weights, model_name="given",
    )


def probe(cfg: DictConfig, output_dir: Path, overrides: Sequence[str] = (), tag: str = "", wandb_run: Any = None) -> RunOutcome:
    """``task=probe``: run ``cfg.probe`` on the variants, draw its figures and tables."""
    if cfg.get("probe") is None or "name" not in cfg.probe:
        raise ConfigError("task=probe needs a probe", f"choose one with probe=NAME ({', '.join(choices('probe'))}) or an experiment=...")
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    name = str(cfg.probe.name)
    compute = lookup("probe", name)
    # A probe without a reporter of its own has its tables written (reporting.base.draw_tables).
    draw = lookup("reporter", name) if name in choices("reporter") else draw_tables
    device = device_for(cfg)
    given = _GIVEN.get()
    sources = _from_given(cfg, name, given) if given is not None else _from_store(cfg, name, output_dir, overrides, device)
    datamodule, styles, cache_root, work_dir = sources.datamodule, sources.styles, sources.cache_root, sources.work_dir
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
            options=to_python(cfg.probe), models=sources.load_models(), data=datamodule, attack=to_python(cfg.attack), device=device,
            seed=int(cfg.seed), work_dir=work_dir / "partial", progress=progress_reporter(name),
            training=sources.training,
            # recompute=true computes afresh: nothing shared with earlier runs is reused then.
            shared_dir=cache_root / "per-model" if cache_root is not None and not cfg.get("recompute", False) else None,
        )
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(int(cfg.seed))
        result = compute(ctx)
        result.meta.setdefault("experiment", cfg.get("experiment_name"))
        result.meta.setdefault("variants", sources.names)
        result.meta.setdefault("dataset", datamodule.info.name)
        result.meta.setdefault("model", sources.model_name)
        result.meta.setdefault("fingerprints", sources.fingerprints)
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
