"""What each reporter puts on screen: pivots, chosen columns, the scorecard's verdicts, and a reduced report covering every reporter."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest

from robustness.probes.base import ProbeResult
from robustness.registry import choices
from robustness.reporting import robust_accuracy as robust_accuracy_report
from robustness.reporting import scorecard as scorecard_report
from robustness.reporting.base import MAX_SHOWN_COLUMNS, table_columns
from robustness.scorecard import compute_scorecard

import synthetic


def test_robust_accuracy_is_shown_one_row_per_model_and_one_column_per_eps(tmp_path: Path) -> None:
    result = synthetic.robust_accuracy()
    long_rows = result.tables["robust_accuracy"]
    table, _figure = robust_accuracy_report.draw(result, tmp_path)
    shown = table.display
    assert len(long_rows) == 70 and len(shown) == 10  # 5 models x 2 attacks, instead of 70 rows
    assert table_columns(shown) == ["Model", "clean", "ε = 0.02", "ε = 0.05", "ε = 0.1", "ε = 0.15", "ε = 0.2", "ε = 0.3"]
    by_cell = {(row["variant"], row["attack"], row["eps"]): row["robust_acc"] for row in long_rows}
    cure = next(row for row in shown if row["Model"] == "CURE training (autoattack)")
    assert cure["ε = 0.15"] == by_cell[("cure", "autoattack", 0.15)] and cure["clean"] == 0.9644
    with open(tmp_path / "robust_accuracy.csv", encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == 70  # the CSV keeps the long list

    # More eps than fit: evenly spaced ones, the first and the last among them; eps = 0 shown where it differs from clean.
    rows = [{"variant": "base", "eps": e / 10, "clean_acc": 0.9, "robust_acc": 0.8 - e / 100} for e in range(11)]
    shown = robust_accuracy_report.pivot(rows, {"attack": {"name": "pgd"}}, several_attacks=False)
    columns = table_columns(shown)
    assert len(columns) == MAX_SHOWN_COLUMNS and columns[2] == "ε = 0" and columns[-1] == "ε = 1"


def _scorecard(tmp_path: Path) -> tuple[ProbeResult, list[Any]]:
    results = {f"{i}/{n}": r for i, (_, section) in enumerate(synthetic.sections_and_results()) for n, r in enumerate(section)}
    result = compute_scorecard(results, seed=0)
    return result, scorecard_report.draw(result, tmp_path)


def test_scorecard_shows_one_row_per_claim_with_its_verdict_and_folds_the_rest(tmp_path: Path) -> None:
    result, (table, forest) = _scorecard(tmp_path)
    rows = result.tables["scorecard"]
    assert table_columns(table.display) == ["Claim", "Measure", "Models", "b − a (mean)", "95% CI", "Verdict"]
    assert [row["Verdict"] for row in table.display] == [row["verdict_mean"] for row in rows]
    figure2 = next(row for row in table.display if row["Claim"].startswith("Figure 2"))
    source = next(row for row in rows if row["source"] == "Figure 2")
    assert figure2["b − a (mean)"] == source["effect_mean"] and figure2["Models"] == "base → adversarial"
    assert next(row for row in table.display if "(cure)" in row["Claim"])["Models"] == "cure: natural → adversarial pairs"
    assert {"b − a (median)", "Verdict (median)", "Seed report", "Note", "Items"} <= set(table_columns(table.details))
    counts = {v: sum(row["verdict_mean"] == v for row in rows) for v in ("holds", "does not hold", "inconclusive", "not measured")}
    assert table.summary.startswith(f"{counts['holds']} of {len(rows)} claims hold, {counts['does not hold']} do not, {counts['inconclusive']} are inconclusive")
    assert ("1 was not measured" in table.summary) == (counts["not measured"] == 1)
    differ = sum(row["verdict_mean"] != row["verdict_median"] for row in rows)
    assert f"by the median, {differ} verdict" in table.summary
    assert "the seed report states means" in table.caption  # the rule is printed with the table
    with open(tmp_path / "scorecard.csv", encoding="utf-8") as handle:
        saved = list(csv.DictReader(handle))
    assert {"mean 95% CI", "median 95% CI", "Verdict (median)", "d (standardised)", "d 95% CI", "Seed report", "Note"} <= set(saved[0])
    assert forest.kind == "figure" and forest.name == "scorecard_forest" and all(Path(p).is_file() for p in forest.paths)


def test_the_reduced_report_runs_every_reporter_and_shows_readable_tables(synthetic_report: dict[str, Any]) -> None:
    assert synthetic_report["reporters"] == set(choices("reporter")), "give tests/reporting/synthetic.py a result for every reporter"
    sections = synthetic_report["sections"]
    artefacts = [a for s in sections for a in s.artefacts]
    # The scorecard is the first section, its forest plot the first figure.
    assert sections[0].title.startswith("Scorecard")
    assert next(a for a in artefacts if a.kind == "figure").name == "scorecard_forest"
    for artefact in artefacts:
        if artefact.kind == "table":
            assert len(table_columns(artefact.display)) <= MAX_SHOWN_COLUMNS, artefact.name
            assert len(table_columns(artefact.details)) <= MAX_SHOWN_COLUMNS, artefact.name
    for section in sections:
        names = [(a.kind, a.name) for a in section.artefacts]
        assert len(names) == len(set(names)), f"an artefact appears twice in {section.title}"
    names = [a.name for a in artefacts]
    # Per-pair and per-angle lists are linked, never printed.
    assert "path_pairs" not in names and any(p.name == "path_pairs.csv" for a in artefacts for p in a.csvs)
    assert any(p.name == "perceptual_sweep.csv" for a in artefacts if a.kind == "figure" for p in a.csvs)
    md = synthetic_report["md"].read_text(encoding="utf-8")
    html = synthetic_report["html"].read_text(encoding="utf-8")
    # No caption printed twice for one section (the curvature profile's figure and table once shared theirs).
    for section in sections:
        captions = [a.caption for a in section.artefacts if a.caption]
        assert len(captions) == len(set(captions)), section.title
    for artefact in artefacts:
        if artefact.caption:
            assert md.count(artefact.caption) == sum(a.caption == artefact.caption for a in artefacts), artefact.name
    assert html.count("data:image/png;base64,") == sum(a.kind == "figure" for a in artefacts)
    assert html.count('class="verdict ') == 2 * len(artefacts[0].display)  # the table's and the details' badges
    # Verdicts first: the scorecard's table comes before any other section.
    assert md.index("| Claim | Measure | Models |") < md.index(f"## {sections[1].title}")


@pytest.mark.parametrize("statistic", ["mean", "median"])
def test_the_verdict_column_follows_the_headline_the_result_names(tmp_path: Path, statistic: str) -> None:
    result, _ = _scorecard(tmp_path)
    result.meta["headline"] = {"statistic": statistic, "rule": f"by the {statistic}"}
    for row in result.tables["scorecard"]:
        row["verdict"] = row[f"verdict_{statistic}"]
    table, _ = scorecard_report.draw(result, tmp_path / statistic)
    other = "median" if statistic == "mean" else "mean"
    assert f"b − a ({statistic})" in table_columns(table.display) and f"Verdict ({other})" in table_columns(table.details)
    assert [row["Verdict"] for row in table.display] == [row[f"verdict_{statistic}"] for row in result.tables["scorecard"]]
    assert all(math.isfinite(row["d"]) for row in result.tables["scorecard"] if row["verdict"] != "not measured" and not row["claim"].startswith("ordering"))
