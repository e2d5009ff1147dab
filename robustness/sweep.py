"""After a multirun: one table of every job's overrides and final metrics."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from robustness.reporting.base import write_table

log = logging.getLogger("robustness")


def collect_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory under ``sweep_dir``: its overrides, then its metrics.json."""
    rows: list[dict[str, Any]] = []
    job_dirs = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    metric_keys: list[str] = []
    for job_dir in job_dirs:
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
        metrics_file = job_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        metrics = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
        for key in metrics:
            if key not in metric_keys:
                metric_keys.append(key)
        row: dict[str, Any] = {"job": int(job_dir.name), "status": "done" if metrics else "no metrics (failed or still running)"}
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


class SweepSummary(Callback):
    """Hydra callback: write ``sweep_summary.csv`` / ``.md`` in the sweep directory."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = collect_sweep(sweep_dir)
        if rows:
            artefact = write_table(rows, sweep_dir, "sweep_summary", caption=f"Sweep summary: {len(rows)} jobs of {sweep_dir}")
            log.info("sweep summary: %s", ", ".join(str(p) for p in artefact.paths))
