"""Training shows its progress as log lines, as a log file or a CI machine sees it."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from helpers import run_outcome


def test_training_logs_its_batches_and_epochs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="robustness"):
        run_outcome("train", ["trainer.max_epochs=2", "callbacks.log_progress.every_s=0"], tmp_path, artifacts_dir=tmp_path / "store")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[train base]")]
    batches = [line for line in lines if re.match(r"\[train base\] epoch [12]/2, batch \d+/\d+, loss \d", line)]
    epochs = [line for line in lines if re.match(r"\[train base\] epoch [12]/2 done in \d+ s so far, validation accuracy 0\.\d{4}", line)]
    assert len(batches) >= 2 and len(epochs) == 2
    assert "s left" in batches[0] and "s left" not in batches[-1]  # the estimate, until the last batch
