from __future__ import annotations

import os
import tempfile

import pytest
import torch

# Nothing in the suite may reach the network; W&B stays offline.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# One store for the session so that variants are trained once (see tests/helpers.py). Parallel
# workers (pytest-xdist) share it through the run's id; the store's per-variant lock makes the
# first worker that needs a variant train it while the others wait for it.
if not os.environ.get("ROBUSTNESS_TEST_ARTIFACTS"):
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run_id:
        shared = os.path.join(tempfile.gettempdir(), f"robustness-test-store-{run_id}")
        os.makedirs(shared, exist_ok=True)
        os.environ["ROBUSTNESS_TEST_ARTIFACTS"] = shared
    else:
        os.environ["ROBUSTNESS_TEST_ARTIFACTS"] = tempfile.mkdtemp(prefix="robustness-test-store-")
# Tiny models on 2 cores: one thread per process avoids oversubscription (test workers run in
# parallel), which made the suite several times slower in CPU time.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_artifacts() -> str:
    return os.environ["ROBUSTNESS_TEST_ARTIFACTS"]
