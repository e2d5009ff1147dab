"""Experiment tracking: W&B (offline unless the user opts in), CSV, or nothing.

One W&B run per job. It is created here rather than by Lightning so that online mode can
fall back to offline when the service cannot be reached, and so that probe and report runs,
which have no Trainer, log to a run of the same shape.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf

from robustness.errors import ConfigError

log = logging.getLogger(__name__)

_MODES = ("offline", "online", "disabled")
_RUN_ROOT: Path | None = None


def set_run_root(directory: Path | None) -> None:
    """Put every W&B run started from now on into ``<directory>/wandb`` (the command's run directory)."""
    global _RUN_ROOT
    _RUN_ROOT = directory


def start_wandb_run(logger_cfg: Mapping[str, Any], save_dir: Path, name: str, config: Mapping[str, Any], tags: Iterable[str] = ()) -> Any:
    """Start a W&B run; in online mode fall back to offline (with a warning) if init fails or times out."""
    import wandb

    mode = str(logger_cfg.get("mode", "offline"))
    if mode not in _MODES:
        raise ConfigError(f"unknown W&B mode '{mode}'", f"set logger.mode to one of: {', '.join(_MODES)}")
    save_dir = _RUN_ROOT or save_dir
    save_dir.mkdir(parents=True, exist_ok=True)
    kwargs = dict(
        project=logger_cfg.get("project", "robustness"),
        entity=logger_cfg.get("entity"),
        group=logger_cfg.get("group"),
        tags=sorted({str(t) for t in [*logger_cfg.get("tags", []), *tags]}),
        name=name,
        dir=str(save_dir),
        config=dict(config),
        reinit="create_new",
    )
    timeout = float(logger_cfg.get("init_timeout", 30))
    if mode == "online":
        try:
            return wandb.init(mode="online", settings=wandb.Settings(init_timeout=timeout, silent=True), **kwargs)
        except Exception as exc:  # any failure to reach the service: never block the run on it
            warnings.warn(f"W&B online init failed ({type(exc).__name__}: {exc}); logging offline instead. Sync later with `wandb sync {save_dir}/wandb`.")
            os.environ["WANDB_MODE"] = "offline"
    return wandb.init(mode=mode if mode != "online" else "offline", settings=wandb.Settings(silent=True, init_timeout=timeout), **kwargs)


def make_lightning_logger(logger_cfg: Mapping[str, Any], save_dir: Path, name: str, config: Mapping[str, Any], tags: Iterable[str] = ()) -> Any:
    """The Lightning logger for a training job, or False for none."""
    kind = logger_cfg.get("name", "wandb")
    if kind == "none":
        return False
    if kind == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=str(save_dir), name="csv", version="")
    if kind == "wandb":
        from pytorch_lightning.loggers import WandbLogger

        run = start_wandb_run(logger_cfg, save_dir, name, config, tags)
        return WandbLogger(experiment=run, save_dir=str(save_dir))
    raise ConfigError(f"unknown logger '{kind}'", "choose logger=wandb, logger=csv or logger=none")


def log_artefacts(run: Any, artefacts: Iterable[Any], prefix: str = "") -> None:
    """Send figures (as wandb.Image) and tables (as wandb.Table) to a W&B run; no-op without one."""
    if run is None:
        return
    import wandb

    from robustness.reporting.base import table_columns

    payload: dict[str, Any] = {}
    for artefact in artefacts:
        key = f"{prefix}{artefact.name}"
        if artefact.kind == "figure":
            png = next((p for p in artefact.paths if str(p).endswith(".png")), None)
            if png is not None:
                payload[f"figures/{key}"] = wandb.Image(str(png), caption=artefact.caption)
        elif artefact.kind == "table" and artefact.rows:
            columns = table_columns(artefact.rows)
            data = [[_plain(row.get(c)) for c in columns] for row in artefact.rows]
            # A column may hold numbers and blanks ('' where a claim was not measured).
            payload[f"tables/{key}"] = wandb.Table(columns=columns, data=data, allow_mixed_types=True)
    if payload:
        run.log(payload)


def finish_run(logger: Any, summary: Mapping[str, Any] | None = None) -> None:
    """Finish the W&B run behind a Lightning logger (multirun jobs must not share one)."""
    experiment = getattr(logger, "_experiment", None) if logger else None
    if experiment is None or not hasattr(experiment, "finish"):
        return
    if summary:
        experiment.summary.update(dict(summary))
    experiment.finish()


def _plain(value: Any) -> Any:
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
