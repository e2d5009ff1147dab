"""The one-command report: run a list of experiments, then assemble report.md and report.html.

Each section is an experiment (a probe, or itself a report); its figures and tables are
embedded with their captions and the exact command that reproduces them. Every number in
the report comes from this run.
"""

from __future__ import annotations

import base64
import html
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig

from robustness import tracking
from robustness.errors import ConfigError
from robustness.io import atomic_write_text
from robustness.reporting.base import Artefact, format_cell, markdown_table

log = logging.getLogger("robustness")


def build_report(cfg: DictConfig, output_dir: Path, overrides: Sequence[str] = (), wandb_run: Any = None):
    from robustness.pipeline import RunOutcome, compose_experiment, plain, run

    sections = list(cfg.report.get("sections") or [])
    if not sections:
        raise ConfigError("a report needs at least one section", "list experiments under report.sections, e.g. - {experiment: fig2_boundary}")
    title = cfg.report.get("title") or f"Report: {cfg.get('experiment_name')}"
    own_run = wandb_run is None and cfg.logger.name == "wandb"
    if own_run:
        wandb_run = tracking.start_wandb_run(
            plain(cfg.logger), output_dir, name=str(cfg.get("experiment_name") or "report"),
            config=tracking.plain_config(cfg), tags=[f"experiment:{cfg.get('experiment_name')}", "report"],
        )
    started = time.monotonic()
    entries: list[tuple[dict[str, Any], list[Artefact]]] = []
    for index, section in enumerate(sections, start=1):
        section = plain(section)
        experiment = section.get("experiment")
        if not experiment:
            raise ConfigError(f"report section {index} names no experiment", "write each section as {experiment: NAME, overrides: [...]}")
        # Report-wide overrides first, then the command line's, then the section's own.
        extra = [*(cfg.report.get("overrides") or []), *overrides, *section.get("overrides", [])]
        print(f"[report {index}/{len(sections)}] {experiment} (elapsed {time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
        child = compose_experiment(experiment, extra)
        outcome = run(child, output_dir / f"{index:02d}_{experiment}", overrides=extra, wandb_run=wandb_run)
        section["command"] = " ".join(["python -m robustness", f"experiment={experiment}", *section.get("overrides", [])])
        entries.append((section, outcome.artefacts))
    print(f"[report] done in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)

    markdown = render_markdown(title, entries, output_dir)
    md_path = atomic_write_text(output_dir / "report.md", markdown)
    html_path = atomic_write_text(output_dir / "report.html", render_html(title, entries))
    artefacts = [artefact for _, group in entries for artefact in group]
    if wandb_run is not None:
        import wandb

        wandb_run.log({"report": wandb.Html(html_path.read_text(encoding="utf-8"))})
    if own_run:
        wandb_run.finish()
    log.info("report written to %s and %s", md_path, html_path)
    return RunOutcome("report", output_dir, artefacts=artefacts)


def _relative(path: Path, base: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


def render_markdown(title: str, entries: list[tuple[dict[str, Any], list[Artefact]]], base: Path) -> str:
    lines = [f"# {title}", ""]
    for section, artefacts in entries:
        heading = section.get("title") or section["experiment"]
        lines += [f"## {heading}", ""]
        if section.get("caption"):
            lines += [section["caption"], ""]
        lines += [f"Reproduce: `{section['command']}`", ""]
        for artefact in artefacts:
            if artefact.kind == "figure":
                png = next(p for p in artefact.paths if str(p).endswith(".png"))
                lines += [f"![{artefact.name}]({_relative(png, base)})", "", f"*{artefact.caption}*" if artefact.caption else "", ""]
            else:
                csv_path = next(p for p in artefact.paths if str(p).endswith(".csv"))
                lines += [f"**{artefact.caption or artefact.name}** ([CSV]({_relative(csv_path, base)}))", "", markdown_table(artefact.rows), ""]
    return "\n".join(lines)


def render_html(title: str, entries: list[tuple[dict[str, Any], list[Artefact]]]) -> str:
    """A single self-contained HTML file: figures inlined as base64 PNGs."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}"
        "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:.2em .6em;text-align:right}"
        "img{max-width:100%}code{background:#f3f3f3;padding:0 .3em}figcaption,.caption{color:#444;font-style:italic}</style>",
        f"</head><body><h1>{html.escape(title)}</h1>",
    ]
    for section, artefacts in entries:
        parts.append(f"<h2>{html.escape(section.get('title') or section['experiment'])}</h2>")
        if section.get("caption"):
            parts.append(f"<p>{html.escape(section['caption'])}</p>")
        parts.append(f"<p>Reproduce: <code>{html.escape(section['command'])}</code></p>")
        for artefact in artefacts:
            if artefact.kind == "figure":
                png = next(p for p in artefact.paths if str(p).endswith(".png"))
                data = base64.b64encode(Path(png).read_bytes()).decode()
                parts.append(f"<figure><img alt='{html.escape(artefact.name)}' src='data:image/png;base64,{data}'>"
                             f"<figcaption>{html.escape(artefact.caption)}</figcaption></figure>")
            else:
                parts.append(f"<p class='caption'>{html.escape(artefact.caption or artefact.name)}</p>")
                parts.append(_html_table(artefact.rows))
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>(no rows)</p>"
    columns = list(rows[0].keys())
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format_cell(row.get(c, '')))}</td>" for c in columns) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
