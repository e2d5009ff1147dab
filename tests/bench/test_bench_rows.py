"""The lines every benchmark table prints under it: a legend line per column, then its targets."""

from __future__ import annotations

import pytest
import torch

from robustness.bench import BenchRows, verdict
from robustness.bench.__main__ import main


def test_every_column_gets_one_legend_line_in_table_order_then_the_targets():
    rows = [{"row": "a", "ms": 1.0}, {"row": "b", "ratio": 2.0}]
    table = BenchRows(rows, {"ratio": "b over a", "ms": "milliseconds", "row": "what ran", "unused": "never printed"}, [f"ratio >= 2: {verdict(True)}"])
    assert list(table) == rows
    assert table.notes == ["- row: what ran", "- ms: milliseconds", "- ratio: b over a", "targets: ratio >= 2: met"]
    assert BenchRows(rows[:1], {"row": "r", "ms": "m"}, []).notes[-1] == "targets: none set for this table"
    assert verdict(False) == "missed"


def test_a_column_without_a_legend_line_is_refused():
    with pytest.raises(KeyError, match="ratio"):
        BenchRows([{"row": "a", "ratio": 2.0}], {"row": "what ran"}, [])


def test_make_bench_prints_the_legend_and_targets_under_each_table(capsys, monkeypatch):
    # The GPU benchmark on a machine without one (as CI is): it says so, and still ends with its targets line.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["gpu"]) == 0
    out = capsys.readouterr().out
    assert "no GPU" in out
    assert out.rstrip().endswith("targets: none set for this table")
