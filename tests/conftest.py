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


# The longest files first. `make test` hands whole files to its two workers in collection order
# (--dist loadfile --no-loadscope-reorder; by default pytest-xdist would order them by their count
# of tests instead) to whichever is free: a long file collected last would run alone at the end.
LONGEST_FIRST = (
    "test_rehearse.py",
    "stages/test_ddp.py",
    "stages/test_write_faults.py",
    "stages/test_report.py",
    "test_adding_components.py",
    "models/test_imported.py",
    "stages/test_bad_input.py",
    "test_examples.py",
    "stages/test_reliability.py",
    "stages/test_framework.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.path.as_posix()
        return next((i for i, name in enumerate(LONGEST_FIRST) if path.endswith(f"tests/{name}")), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: within a file, and among the others, collection order stays
