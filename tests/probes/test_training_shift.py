"""How far each variant moved: the training_shift experiment on the real config and the shared store."""

from __future__ import annotations

import json
import os
import math
from pathlib import Path

import pytest
import torch

from helpers import run_outcome, stored_model
from robustness.store import load_weights


def _parameters(directory: Path) -> dict[str, torch.Tensor]:
    from robustness.data.digits import DigitsDataModule
    from robustness.models.smallcnn import smallcnn

    state = load_weights(directory / "model.pt", "a test's weights")
    # Parameters only: normalisation constants and batch-norm statistics are buffers, not weights.
    names = {name for name, _ in smallcnn(DigitsDataModule().info).named_parameters()}
    assert names and names <= set(state)
    return {k: state[k].double() for k in names}


def test_training_shift_reports_where_each_variant_started_and_how_far_it_moved(tmp_path: Path) -> None:
    outcome = run_outcome("training_shift", ["variants=[base,adversarial,pgd]"], tmp_path)
    artifacts = Path(os.environ["ROBUSTNESS_TEST_ARTIFACTS"])
    result = outcome.results["training_shift"]
    rows = {r["variant"]: r for r in result.tables["training_shift"]}
    assert [r["variant"] for r in result.tables["training_shift"]] == ["base", "adversarial", "pgd"]
    assert rows["base"]["starts_from"] == rows["pgd"]["starts_from"] == "random init"
    assert rows["adversarial"]["starts_from"] == "base"
    # a start that is a random initialisation has no accuracies; a stored start is evaluated like the model
    assert math.isnan(rows["base"]["clean_acc_start"]) and math.isnan(rows["pgd"]["adv_set_acc_start"])
    assert rows["adversarial"]["clean_acc_start"] == rows["base"]["clean_acc"]
    assert rows["adversarial"]["adv_set_acc_start"] == rows["base"]["adv_set_acc"]

    # the adversarial set is the recipe's own, built against base: the numbers its training logged
    metrics = json.loads((stored_model(artifacts, "adversarial") / "metrics.json").read_text())
    recipe = metrics["regularizer"]
    assert result.meta["adversarial_set_of"] == "adversarial" and result.meta["adversarial_set_size"] == recipe["adv_set_size"]
    assert rows["base"]["adv_set_acc"] == pytest.approx(recipe["adv_set_initial_acc"], abs=1e-6)
    assert rows["adversarial"]["adv_set_acc"] == pytest.approx(recipe["adv_set_acc_history"][-1][1], abs=1e-6)
    assert result.meta["images"] == 450 and result.meta["whole_split"]  # the digits' whole test split

    # ||theta - theta_0|| / ||theta_0|| recomputed from the two stored weight files
    before, after = _parameters(stored_model(artifacts, "base")), _parameters(stored_model(artifacts, "adversarial"))
    moved = math.sqrt(sum(float((after[k] - before[k]).pow(2).sum()) for k in before))
    size = math.sqrt(sum(float(before[k].pow(2).sum()) for k in before))
    assert rows["adversarial"]["weight_change"] == pytest.approx(moved / size, rel=1e-6)
    assert 0 < rows["adversarial"]["weight_change"] < rows["pgd"]["weight_change"]

    table = (outcome.output_dir / "training_shift.md").read_text()
    assert "random init" in table and "→" in table
