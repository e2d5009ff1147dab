"""Stages: what one composed config does. ``task`` names the stage; :func:`run` looks it up.

- ``train``  (robustness/stages/train.py): fit one variant into the store under its fingerprint;
- ``probe``  (robustness/stages/probe.py): load variants, compute a probe's result, draw it;
- ``report`` (robustness/stages/report.py): run a list of experiments, write report.md/html.

The Hydra entry point (robustness/cli.py) and the tests both call :func:`run`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig

from robustness.errors import ConfigError
from robustness.stages.checks import check_config
from robustness.stages.common import RunOutcome, apply_debug, compose_experiment
from robustness.stages import probe as probe_stage
from robustness.stages import report as report_stage
from robustness.stages import train as train_stage

STAGES = {"train": train_stage.train, "probe": probe_stage.probe, "report": report_stage.report}

__all__ = ["RunOutcome", "STAGES", "compose_experiment", "run"]


def run(cfg: DictConfig, output_dir: str | Path, overrides: Sequence[str] = (), tag: str = "", wandb_run: Any = None) -> RunOutcome:
    """Check the whole config, then run the stage ``cfg.task`` names, writing under ``output_dir``.

    overrides: the command-line overrides that produced ``cfg``; a report hands them on to its
               sections, and the variants a run trains or loads inherit those about data and model.
    tag:       set for multirun jobs; the trained model's alias is ``<variant>@<tag>``.
    wandb_run: an already running W&B run to log into (report sections); None starts one.
    """
    return run_stage(cfg, output_dir, overrides, tag, wandb_run)


def run_stage(cfg: DictConfig, output_dir: str | Path, overrides: Sequence[str] = (), tag: str = "", wandb_run: Any = None,
              _depth: int = 0) -> RunOutcome:
    task = cfg.get("task")
    if task not in STAGES:
        raise ConfigError(f"unknown task '{task}'", f"set task to one of: {', '.join(STAGES)} (or pick an experiment=...)")
    apply_debug(cfg)
    output_dir = check_config(cfg, output_dir)
    if task == "report":
        return report_stage.report(cfg, output_dir, overrides, tag, wandb_run, _depth=_depth)
    return STAGES[task](cfg, output_dir, overrides, tag, wandb_run)
