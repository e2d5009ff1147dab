"""The one-command report, reduced by debug=rehearsal (the same probes and code paths as the default
run, on a few images and coarse grids), with its W&B run read back."""

from __future__ import annotations

from pathlib import Path

from helpers import compose, fast_overrides, hydra_initialized
from robustness.stages import run

REPORT_ITEMS = ["Figure 2", "Figure 3", "Figure 4", "Table 1", "Figures 5 and 6", "Figures 7 and 8", "Table 2", "Figure 9"]


def test_reduced_report_has_every_figure_and_table_and_logs_them_to_wandb(tmp_path: Path) -> None:
    overrides = [*fast_overrides(logger="wandb"), "debug=rehearsal", f"paths.data_dir={tmp_path / 'data'}"]
    cfg = compose("report_digits", overrides)
    with hydra_initialized():
        outcome = run(cfg, tmp_path / "report", overrides=overrides)

    report = (tmp_path / "report" / "report.md").read_text()
    for item in REPORT_ITEMS:
        assert f"## {item}" in report
    figures = [a for a in outcome.artefacts if a.kind == "figure"]
    tables = [a for a in outcome.artefacts if a.kind == "table"]
    assert len(figures) >= 12 and len(tables) >= 10
    for artefact in outcome.artefacts:
        for path in artefact.paths:
            assert path.is_file() and path.stat().st_size > 0, path
    # Every figure is embedded in report.md, every table written into it.
    for figure in figures:
        assert f"]({figure.paths[0].relative_to(tmp_path / 'report')})" in report
    assert "| Base model |" in report or "| base |" in report
    # Each section's Reproduce line reruns exactly that section: report-wide and command-line
    # overrides, then the section's own.
    import shlex

    expected = " ".join(["python -m robustness experiment=fig2_boundary", *(shlex.quote(o) for o in [*overrides, *cfg.report.sections.fig2_boundary.get("overrides", [])])])
    assert f"Reproduce: `{expected}`" in report
    html = (tmp_path / "report" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(figures)

    # One offline W&B run for the report, holding every figure and table it shows.
    runs = list((tmp_path / "report").glob("wandb/offline-run-*"))
    assert len(runs) == 1
    media = runs[0] / "files" / "media"
    logged_images = {p.name.split("_")[0] for p in media.rglob("*.png")}
    logged_tables = list(media.rglob("*.table.json"))
    assert len(list(media.rglob("*.png"))) == len(figures)
    assert len(logged_tables) == len(tables)
    assert logged_images


def test_a_section_is_dropped_or_changed_from_the_command_line_and_the_sections_never_see_it() -> None:
    from robustness.stages.report import _for_sections, report_sections

    command_line = ["~report.sections.fig9_perceptual", "++report.sections.fig2_boundary.overrides=['probe.resolution=101']", "seed=3", "+report.title=x"]
    cfg = compose("report_digits", command_line[:2])
    sections = [section["experiment"] for section in report_sections(cfg)]
    assert "fig9_perceptual" not in sections and len(sections) == 11
    assert next(s for s in report_sections(cfg) if s["experiment"] == "fig2_boundary")["overrides"] == ["probe.resolution=101"]
    # A section composes its own experiment, which has no report node to delete or change.
    assert _for_sections(command_line) == ["seed=3"]
