from __future__ import annotations

import os
import tempfile

import pytest
import torch

# Nothing in the suite may reach the network; W&B stays offline.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# One store for the session so that variants are trained once (see tests/helpers.py).
if not os.environ.get("ROBUSTNESS_TEST_ARTIFACTS"):
    os.environ["ROBUSTNESS_TEST_ARTIFACTS"] = tempfile.mkdtemp(prefix="robustness-test-store-")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_artifacts() -> str:
    return os.environ["ROBUSTNESS_TEST_ARTIFACTS"]
