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
# The same for the processes the tests start (the CLI, the rehearsal, DDP ranks) while the suite
# runs in parallel: a subprocess with a thread per core beside another worker spends its time
# waiting for a thread that is not scheduled (the Tiny-ImageNet rehearsal: 580 s that way, 270 s
# with one thread, beside one busy core).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _workers > 1:
    _threads = str(max(1, (os.cpu_count() or 1) // _workers))
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_name, _threads)


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
    "test_store.py",
    "stages/test_framework.py",
    "geometry/test_planes.py",
    "reporting/test_browser.py",
    "test_api.py",
    "attacks/test_autoattack.py",
    "test_leaderboard.py",
    "training/test_cure.py",
    "reporting/test_document.py",
    "probes/test_perceptual.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.path.as_posix()
        return next((i for i, name in enumerate(LONGEST_FIRST) if path.endswith(f"tests/{name}")), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: within a file, and among the others, collection order stays
