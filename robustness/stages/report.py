"""The report stage: run a list of experiments, then write report.md and report.html.

Each section is an experiment (a probe, or itself a report); its figures and tables are embedded
with their captions and the exact command that reproduces that section. Every number in the
report comes from this run (or from cached results of the same configs and weights).
"""

from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig

from robustness import tracking
from robustness.errors import ConfigError, NotApplicableError
from robustness.io import atomic_write_text
from robustness.reporting.document import ReportHeader, Section, render_html, render_markdown
from robustness.stages.common import RunOutcome, compose_experiment, to_python

log = logging.getLogger("robustness")


def reproduce_command(experiment: str, overrides: Sequence[str]) -> str:
    return " ".join(["python -m robustness", f"experiment={experiment}", *(shlex.quote(o) for o in overrides)])


def report_sections(cfg: DictConfig) -> list[dict[str, Any]]:
    """The report's sections in order, each ``{experiment, title, caption, overrides}``.

    ``report.sections`` maps a section's key (its experiment, unless it names another with
    ``experiment:``) to its settings, in order (conf/report/seed.yaml); a list of such settings,
    each with its ``experiment``, is read the same way.
    """
    raw = to_python(cfg.report.get("sections")) if cfg.get("report") is not None else None
    if isinstance(raw, dict):
        entries = [{"experiment": key, **(value or {})} for key, value in raw.items()]
    elif isinstance(raw, list):
        entries = [dict(entry) if isinstance(entry, dict) else {"experiment": entry} for entry in raw]
    else:
        entries = []
    if not entries:
        raise ConfigError("a report needs at least one section", "list experiments under report.sections, e.g. report=seed (conf/report/seed.yaml)")
    for index, entry in enumerate(entries, start=1):
        unknown = sorted(set(entry) - {"experiment", "title", "caption", "overrides"})
        if not entry.get("experiment") or unknown:
            problem = f"has unknown keys {', '.join(unknown)}" if unknown else "names no experiment"
            raise ConfigError(f"report section {index} {problem}", "write each section as NAME: {title: ..., overrides: [...]} (see conf/report/seed.yaml)")
        if not isinstance(entry.get("overrides", []), list):
            raise ConfigError(f"report section {index} ({entry['experiment']}): overrides must be a list", "e.g. overrides: [probe.resolution=101]")
    return entries


def _for_sections(overrides: Sequence[str]) -> list[str]:
    """The command line's overrides every section takes: all but those of the report itself
    (``report.sections.fig2_boundary.overrides=[...]``, ``~report.sections.fig9_perceptual``), which
    the report has applied and which a section's own config would not have."""
    kept = []
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if not (key == "report" or key.startswith(("report.", "report/"))):
            kept.append(override)
    return kept


def clean_accuracies(results: dict[str, Any]) -> dict[str, float]:
    """Each variant's clean test accuracy as the report's sections measured it: on the whole test
    split (training_shift), else on the robust-accuracy section's images (its eps = 0 rows)."""
    found: dict[str, float] = {}
    for probe, column in (("robust_accuracy", "clean_acc"), ("training_shift", "clean_acc")):
        for result in results.values():
            if getattr(result, "probe", None) != probe:
                continue
            for row in next(iter(result.tables.values()), []):
                value = row.get(column)
                if isinstance(value, (int, float)) and value == value:
                    found[str(row["variant"])] = float(value)
    return found


def report_header(cfg: DictConfig, overrides: Sequence[str], results: dict[str, Any], seconds: float) -> ReportHeader:
    """What the report ran: dataset, models with their clean accuracy, command, time, versions."""
    from importlib import metadata

    accuracy = clean_accuracies(results)
    variants = [str(v) for v in cfg.get("variants") or []] or list(accuracy)
    versions = {}
    for package in ("robustness", "torch", "torchvision", "pytorch-lightning", "hydra-core"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return ReportHeader(
        dataset=str(cfg.dataset.name),
        models=[(variant, accuracy.get(variant)) for variant in variants],
        command=reproduce_command(str(cfg.get("experiment_name") or "report"), overrides),
        seconds=seconds,
        versions=versions,
    )


def _scorecard_section(results: dict[str, Any], seed: int, output_dir: Path, wandb_run: Any) -> Section:
    """The scorecard of the seed report's claims, from every section's results: the first section."""
    from robustness.scorecard import compute_scorecard
    from robustness.registry import lookup

    scorecard = compute_scorecard(results, seed)
    scorecard.save(output_dir / "results" / "scorecard")
    artefacts = lookup("reporter", "scorecard")(scorecard, output_dir)
    tracking.log_artefacts(wandb_run, artefacts)
    return Section(title="Scorecard - which of the seed report's claims hold on these models",
                   command="(computed from the sections below)", artefacts=artefacts)


def report(cfg: DictConfig, output_dir: Path, overrides: Sequence[str] = (), tag: str = "", wandb_run: Any = None, _depth: int = 0) -> RunOutcome:
    """``task=report``: every section in order, then the documents."""
    from robustness.stages import run_stage

    sections = report_sections(cfg)
    title = cfg.report.get("title") or f"Report: {cfg.get('experiment_name')}"
    own_run = wandb_run is None and cfg.logger.name == "wandb"
    if own_run:
        wandb_run = tracking.start_wandb_run(
            to_python(cfg.logger), output_dir, name=str(cfg.get("experiment_name") or "report"),
            config=tracking.plain_config(cfg), tags=[f"experiment:{cfg.get('experiment_name')}", "report"],
        )
    started = time.monotonic()
    entries: list[Section] = []
    results: dict[str, Any] = {}
    for index, section in enumerate(sections, start=1):
        experiment = section["experiment"]
        # Report-wide overrides first, then the command line's, then the section's own.
        extra = [*(cfg.report.get("overrides") or []), *_for_sections(overrides), *section.get("overrides", [])]
        log.info("[report %d/%d] %s (elapsed %.0f s)", index, len(sections), experiment, time.monotonic() - started)
        child = compose_experiment(experiment, extra)
        try:
            outcome = run_stage(child, output_dir / f"{index:02d}_{experiment}", overrides=extra, wandb_run=wandb_run, _depth=_depth + 1)
        except NotApplicableError as exc:
            log.warning("[report %d/%d] %s does not apply here and is left out: %s", index, len(sections), experiment, exc.message)
            entries.append(Section(title=section.get("title") or experiment, caption=f"Not run: {exc.message}.",
                                   command=reproduce_command(experiment, extra)))
            continue
        entries.append(Section(
            title=section.get("title") or experiment,
            caption=section.get("caption", ""),
            command=reproduce_command(experiment, extra),
            artefacts=list(outcome.artefacts),
        ))
        for key, result in outcome.results.items():
            results[f"{index:02d}_{experiment}/{key}" if key in results else key] = result
    if _depth == 0:
        log.info("[report] all %d sections done in %.0f s", len(sections), time.monotonic() - started)
        if cfg.report.get("scorecard", True) and results:
            entries.insert(0, _scorecard_section(results, int(cfg.seed), output_dir, wandb_run))

    header = report_header(cfg, overrides, results, time.monotonic() - started) if _depth == 0 else None
    md_path = atomic_write_text(output_dir / "report.md", render_markdown(title, entries, output_dir, header))
    html_path = atomic_write_text(output_dir / "report.html", render_html(title, entries, output_dir, header))
    artefacts = [artefact for entry in entries for artefact in entry.artefacts]
    if wandb_run is not None and _depth == 0:
        import wandb

        wandb_run.log({"report": wandb.Html(html_path.read_text(encoding="utf-8"))})
    if own_run:
        wandb_run.finish()
    if _depth == 0:
        log.info("report written to %s and %s", md_path, html_path)
    return RunOutcome("report", output_dir, artefacts=artefacts, results=results)
