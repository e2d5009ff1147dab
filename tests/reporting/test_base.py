"""One number format, one alignment rule and one source of variant titles and colours for every table and figure."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from robustness.reporting.base import (
    format_cell,
    format_number,
    interval_text,
    is_numeric,
    markdown_table,
    numeric_columns,
    percent,
    pick_columns,
    variant_colour,
    variant_title,
    write_table,
)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.0, "0"), (1.0, "1"), (0.99781, "0.9978"), (5.51234, "5.512"), (-0.0123456, "-0.01235"), (0.001, "0.001"),
        (1234.56, "1235"), (9999.7, "10000"), (12345.6, "1.235e+04"), (0.00064123, "6.412e-04"), (-3.5e-7, "-3.500e-07"),
        (7, "7"), (np.int64(12), "12"), (np.float32(0.5), "0.5"), (math.nan, "–"), (math.inf, "∞"), (-math.inf, "−∞"),
    ],
)
def test_every_number_gets_four_significant_digits_the_same_way(value: float, text: str) -> None:
    assert format_number(value) == text
    assert format_cell(value) == text


def test_cells_intervals_and_shares_use_that_format() -> None:
    assert format_cell(True) == "yes" and format_cell("base") == "base"
    assert interval_text(-0.0123456, 0.51234) == "[-0.01235, 0.5123]"
    assert interval_text(math.nan, 1.0) == "–"
    assert percent(29 / 30) == "96.67%" and percent(math.nan) == "–"


def test_numbers_right_aligned_and_text_left_aligned_in_markdown() -> None:
    rows = [
        {"Model": "Base model", "accuracy": 0.9978, "attack succeeded": "39/40", "95% CI": "[0.1, 0.2]", "change": "0.99 → 0.98", "note": ""},
        {"Model": "CURE training", "accuracy": 0.9644, "attack succeeded": "40/40", "95% CI": "–", "change": "0.97", "note": "three images dominate"},
    ]
    assert numeric_columns(rows) == {"accuracy", "attack succeeded", "95% CI", "change"}
    _header, rule, *_ = markdown_table(rows).splitlines()
    assert rule == "|:---|---:|---:|---:|---:|:---|"
    assert not is_numeric("random init") and is_numeric("+30°") and not is_numeric(True)
    # A column of blanks is not a number column.
    assert numeric_columns([{"a": ""}, {"a": ""}]) == set()


def test_a_table_keeps_every_column_in_its_csv_and_shows_what_its_reporter_chose(tmp_path: Path) -> None:
    rows = [{f"c{i}": float(i) for i in range(12)}, {f"c{i}": float(-i) for i in range(12)}]
    shown = pick_columns(rows, ["c0", "c5", "c11"])
    artefact = write_table(rows, tmp_path, "wide", "A wide table.", shown=shown)
    with open(tmp_path / "wide.csv", encoding="utf-8") as handle:
        assert list(csv.DictReader(handle))[1]["c7"] == "-7.0"
    assert artefact.rows == rows and artefact.display == [{"c0": 0.0, "c5": 5.0, "c11": 11.0}, {"c0": -0.0, "c5": -5.0, "c11": -11.0}]
    md = (tmp_path / "wide.md").read_text(encoding="utf-8")
    assert "| c0 | c5 | c11 |" in md and "c7" not in md and "wide.csv" in md
    plain = write_table(rows[:1], tmp_path, "plain")
    assert plain.display == plain.rows and plain.shown is None


STYLES = {"variant_styles": {"base": {"title": "Base model", "colour": "#1f77b4"}, "cure": {"title": "CURE training", "colour": "#2CA02C"}, "tv": {"title": "tv"}}}


def test_variant_titles_and_colours_come_from_the_results_meta() -> None:
    assert variant_title(STYLES, "base") == "Base model" and variant_colour(STYLES, "base") == "#1f77b4"
    assert variant_title(STYLES, "tv") == "tv" and variant_title({}, "distillation") == "distillation"
    # Without a style: a colour fixed by the name, never one a styled variant uses (compared without case).
    fallback = variant_colour(STYLES, "tv")
    assert fallback == variant_colour(STYLES, "tv") == variant_colour({**STYLES, "variants": ["x", "tv"]}, "tv")
    assert fallback.lower() not in {"#1f77b4", "#2ca02c"}
    assert len({variant_colour(STYLES, name) for name in ("tv", "rb_standard", "distillation", "a", "b", "c", "d")}) > 2
