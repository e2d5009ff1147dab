"""Multiruns: every job's config checked before any is launched, and one table of this sweep's jobs after.

``SweepSummary`` is a Hydra callback (conf/config.yaml). Before the launcher starts anything
(``on_multirun_start``, in the command's own process) it lists the sweep's jobs as Hydra's basic
sweeper will number them, composes each and runs the stage's config checks on it: a job whose
values are refused gets our error in its folder (``error.txt``) and on the console at once,
whatever the launcher. The list (``.sweep_jobs.json``) is what the summary reads, so an older
sweep's job folders in the same place are never counted as this sweep's.

A job whose run raises one of our errors (refused values, missing data) does not stop the sweep
either: the entry point writes its ``error.txt`` and returns (robustness/cli.py), so the other jobs
run and the summary is written. After the last job, ``sweep_summary.csv`` / ``.md`` list every
job with its status, and the command ends with status 2 when any job was refused or failed.
(Hydra launches every job its sweeper lists, so a refused job is still started, and stops at its
config check before any work.)
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from robustness.errors import RobustnessError
from robustness.io import atomic_write_json, atomic_write_text, read_json
from robustness.reporting.base import write_table

log = logging.getLogger("robustness")

MANIFEST = ".sweep_jobs.json"
ERROR_FILE = "error.txt"
_BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def job_error(job_dir: Path, exc: RobustnessError) -> None:
    """Record that a job ended with one of our errors (the summary shows it)."""
    atomic_write_text(job_dir / ERROR_FILE, str(exc).strip() + "\n")


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Each job's overrides, in the order (and so with the numbers) Hydra's basic sweeper gives them;
    None under another sweeper."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if config.hydra.sweeper.get("_target_") != _BASIC_SWEEPER:
        return None
    params = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    overrides = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
    return [list(job) for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def check_job(config: DictConfig, overrides: list[str], index: int) -> str | None:
    """Our error for one job's config, as its run would raise it before any work, or None.

    The job's config is composed the way its launcher will compose it (Hydra's config loader,
    from the sweep's own config and the job's overrides).
    """
    from hydra.core.global_hydra import GlobalHydra

    from robustness.stages.checks import check_config
    from robustness.stages.common import apply_debug

    if not GlobalHydra.instance().is_initialized():
        return None
    job = GlobalHydra.instance().config_loader().load_sweep_config(config, list(overrides))
    with open_dict(job):
        job.hydra.job.num = index
    HydraConfig.instance().set_config(job)  # ${hydra:...} in the job's config resolve to the job's values
    try:
        task = copy.deepcopy(job)
        with open_dict(task):
            del task["hydra"]
        apply_debug(task)
        check_config(task, Path(config.hydra.sweep.dir) / str(index))
    except RobustnessError as exc:
        return str(exc).strip()
    finally:
        HydraConfig.instance().set_config(config)
    return None


def collect_sweep(sweep_dir: Path, since: float = 0.0) -> list[dict[str, Any]]:
    """One row per job of the sweep in ``sweep_dir``: its overrides, then its metrics.json.

    The jobs are those the sweep's list (``.sweep_jobs.json``, written when it started) names;
    without one (another sweeper), the numbered folders Hydra wrote into since ``since``. An older
    sweep's folders in the same place are not this sweep's.
    """
    rows: list[dict[str, Any]] = []
    manifest = sweep_dir / MANIFEST
    listed: dict[int, dict[str, Any]] = {}
    if manifest.is_file() and read_json(manifest).get("started", 0.0) >= since:
        listed = {int(job["job"]): job for job in read_json(manifest)["jobs"]}
        job_dirs = [sweep_dir / str(index) for index in sorted(listed)]
    else:
        job_dirs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit() and _written_since(p, since)),
                          key=lambda p: int(p.name))
    metric_keys: list[str] = []
    for job_dir in job_dirs:
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        if int(job_dir.name) in listed:
            overrides = listed[int(job_dir.name)]["overrides"]
        else:
            overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
        metrics_file = job_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        for key in metrics:
            if key not in metric_keys:
                metric_keys.append(key)
        error_file = job_dir / ERROR_FILE
        if error_file.is_file():
            first = error_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()[0]
            status = f"{'refused' if listed.get(int(job_dir.name), {}).get('refused') else 'error'}: {first}"
        else:
            status = "done" if metrics else "no metrics (failed or still running)"
        row: dict[str, Any] = {"job": int(job_dir.name), "status": status}
        row.update(dict(o.split("=", 1) for o in overrides if "=" in o and not o.startswith(("paths.", "logger", "trainer.enable_progress_bar"))))
        row["_metrics"] = metrics
        rows.append(row)
    all_keys = sorted({k for row in rows for k in row if k not in ("job", "status", "_metrics")})
    # The swept keys are those whose value differs between jobs; the rest is the same everywhere.
    override_keys = [k for k in all_keys if len({str(row.get(k)) for row in rows}) > 1] or all_keys
    metric_keys = [k for k in metric_keys if not k.endswith("_step")]
    table = []
    for row in rows:
        metrics = row.pop("_metrics")
        table.append({"job": row["job"], **{k: row.get(k, "") for k in override_keys}, **{k: metrics.get(k, "") for k in metric_keys}, "status": row["status"]})
    return table


def _written_since(job_dir: Path, since: float) -> bool:
    overrides = job_dir / ".hydra" / "overrides.yaml"
    return overrides.is_file() and overrides.stat().st_mtime >= since


class SweepSummary(Callback):
    """Hydra callback: check every job before the launcher starts any; write ``sweep_summary.csv`` / ``.md`` after."""

    def __init__(self) -> None:
        self.started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()
        jobs = sweep_jobs(config)
        if jobs is None:
            return
        sweep_dir = Path(config.hydra.sweep.dir)
        listed = []
        for index, overrides in enumerate(jobs):
            refused = check_job(config, overrides, index)
            listed.append({"job": index, "overrides": overrides, "refused": refused})
            if refused:
                job_dir = sweep_dir / str(index)
                atomic_write_text(job_dir / ERROR_FILE, refused + "\n")
                print(f"error: job {index} of the sweep ({' '.join(overrides)}) is refused before launch: {refused}", file=sys.stderr)
        atomic_write_json(sweep_dir / MANIFEST, {"started": self.started, "jobs": listed})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = collect_sweep(sweep_dir, since=self.started)
        if not rows:
            return
        artefact = write_table(rows, sweep_dir, "sweep_summary", caption=f"Sweep summary: {len(rows)} jobs of {sweep_dir}")
        log.info("sweep summary: %s", ", ".join(str(p) for p in artefact.paths))
        failed = [row for row in rows if str(row["status"]).startswith(("refused", "error"))]
        if failed:
            print(f"error: {len(failed)} of {len(rows)} jobs of the sweep did not run to the end: "
                  + "; ".join(f"job {row['job']} {row['status']}" for row in failed)
                  + f"\n  fix: see each job's error.txt and log under {sweep_dir} (and {artefact.paths[0].name} beside them)", file=sys.stderr)
            raise SystemExit(2)
