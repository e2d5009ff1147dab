"""DDP through the command line and the store (issue 32): the documented ``trainer=ddp`` command
trains once, with every rank, and stores once, what the ranks ended with; it ends in bounded time.

Two CPU processes (gloo) stand in for two GPUs: the launch, the store's lock and the saves are the
same code paths.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import cli_in_process

from robustness import fingerprint
from robustness.data.digits import DigitsDataModule
from robustness.registry import build
from robustness.store import ModelStore

# Two CPU ranks, a short training; everything else as the README's command.
DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false", "logger=csv"]
SHORT = ["trainer.max_epochs=1", "dataset.train_fraction=0.3", "dataset.batch_size=32"]
# Two ranks on two shared cores start in ~10 s each and train in seconds: a hang is far above this.
BOUND_S = 240
RANK_LINE = re.compile(r"rank (\d) of 2 ended training '([^']+)' with parameters sha256 ([0-9a-f]{64})")


def _env() -> dict[str, str]:
    # A rank's variables from an outer launcher would make the command a member of that group.
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "MASTER_PORT", "MASTER_ADDR")}
    return {**env, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    # Its own session, so that a timeout or the test's kill reaches every rank.
    return subprocess.Popen([sys.executable, "-m", "robustness", *args], cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = BOUND_S) -> tuple[int, str, float]:
    started = time.monotonic()
    try:
        out = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0]
        pytest.fail(f"the DDP command did not end within {timeout:.0f} s:\n{out[-3000:]}")
    return proc.returncode, out, time.monotonic() - started


def _run(args: list[str], cwd: Path, timeout: float = BOUND_S) -> str:
    code, out, _ = _finish(_start(args, cwd), timeout)
    assert code == 0, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    # A rank that exits with its process group alive aborts in the group's destructor; Lightning
    # then kills rank 0 too, which only sometimes happens before rank 0 ends by itself.
    assert "terminate called" not in out, out[-4000:]
    return out


def _rank_digests(out: str) -> dict[str, dict[int, str]]:
    """variant alias -> rank -> the digest of the parameters that rank ended with."""
    found: dict[str, dict[int, str]] = {}
    for rank, alias, digest in RANK_LINE.findall(out):
        found.setdefault(alias, {})[int(rank)] = digest
    return found


def _stored(store_dir: Path, alias: str) -> tuple[dict[str, torch.Tensor], dict]:
    store = ModelStore(store_dir, "digits", "smallcnn")
    key = store.aliases()[alias]
    versions = [p for p in store.entry_dir(key).iterdir() if p.name.startswith("v-")]
    assert len(versions) == 1, f"one training, one save: found {versions}"
    directory = store.version_dir(key)
    return torch.load(directory / "model.pt", weights_only=True), json.loads((directory / "meta.json").read_text())


def _parameters_digest(state: dict[str, torch.Tensor], meta: dict) -> str:
    # Parameters only: each rank keeps its own batch-norm statistics under DDP.
    names = {name for name, _ in build("model", meta["model"], info=DigitsDataModule.info).named_parameters()}
    return fingerprint.of_state({k: v for k, v in state.items() if k in names})


def _assert_stored_is_what_every_rank_ended_with(out: str, store_dir: Path, alias: str) -> dict[str, torch.Tensor]:
    digests = _rank_digests(out).get(alias, {})
    assert sorted(digests) == [0, 1], f"both ranks must train '{alias}': {digests}\n{out[-3000:]}"
    state, meta = _stored(store_dir, alias)
    assert digests[0] == digests[1] == _parameters_digest(state, meta)
    return state


def _initial_parameters(meta: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    import pytorch_lightning as pl

    pl.seed_everything(seed, workers=True, verbose=False)
    return dict(build("model", meta["model"], info=DigitsDataModule.info).named_parameters())


def test_the_documented_ddp_command_trains_once_and_stores_what_both_ranks_ended_with(tmp_path: Path) -> None:
    # CURE, whose second-order step is the one DDP path plain training lacks; plain training under
    # DDP is checked the same way by the resume and report tests below.
    regularizer, alias = "cure", "cure"
    store = tmp_path / "store"
    args = ["experiment=train", f"regularizer={regularizer}", *DDP, *SHORT, f"paths.artifacts_dir={store}", f"paths.output_dir={tmp_path / 'out'}",
            f"paths.data_dir={tmp_path / 'data'}"]
    code, out, seconds = _finish(_start(args, tmp_path))
    assert code == 0, out[-4000:]
    assert "MEMBER: 2/2" in out  # two processes did join
    state = _assert_stored_is_what_every_rank_ended_with(out, store, alias)
    _, meta = _stored(store, alias)
    initial = _initial_parameters(meta)
    assert any(not torch.equal(state[k], v) for k, v in initial.items()), "the ranks trained: the weights moved from the initialisation"
    entry = ModelStore(store, "digits", "smallcnn").entry_dir(meta["fingerprint"])
    assert not (entry / "resume").exists()
    assert not list((tmp_path / "out").rglob(".ddp/*.json"))  # the ranks' job is gone with the training
    # The same command again reuses the stored model, with no second process.
    again = _run(args, tmp_path)
    assert "reusing it" in again and "MEMBER" not in again


@pytest.mark.slow
def test_an_interrupted_ddp_run_resumes_on_every_rank_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    common = ["experiment=train", *DDP, "trainer.max_epochs=3", "dataset.train_fraction=0.3", "dataset.batch_size=32",
              f"paths.output_dir={tmp_path / 'out'}", f"paths.data_dir={tmp_path / 'data'}"]
    reference = tmp_path / "reference"
    _run([*common, f"paths.artifacts_dir={reference}"], tmp_path)

    store = tmp_path / "store"
    first = _start([*common, f"paths.artifacts_dir={store}"], tmp_path)
    deadline = time.monotonic() + BOUND_S
    while not list(store.glob("digits/smallcnn/entries/*/resume/last.ckpt")):
        assert first.poll() is None, first.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no checkpoint of the first epoch"
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # every rank, mid-run, without a chance to clean up
    first.communicate()
    (last,) = store.glob("digits/smallcnn/entries/*/resume/last.ckpt")
    assert torch.load(last, weights_only=True)["epoch"] < 2

    out = _run([*common, f"paths.artifacts_dir={store}"], tmp_path)
    assert len(re.findall(r"resuming 'base' from", out)) == 2, "both ranks resume from the checkpoint"
    resumed = _assert_stored_is_what_every_rank_ended_with(out, store, "base")
    expected, _ = _stored(reference, "base")
    _, meta = _stored(store, "base")
    names = {name for name, _ in build("model", meta["model"], info=DigitsDataModule.info).named_parameters()}
    assert all(torch.equal(resumed[k], expected[k]) for k in names), "resumed weights differ from the uninterrupted run's"


@pytest.mark.slow
def test_a_report_with_ddp_trains_each_variant_with_both_ranks_then_probes_in_one_process(tmp_path: Path) -> None:
    """Two DDP trainings in one command (base, then its fine-tuned child): rank 0 starts fresh ranks
    for each, since the first ones have left; then the report's probe runs in rank 0 alone."""
    # A report of one section: a report group option of the user's own, in a config folder of theirs (--config-dir).
    (tmp_path / "conf" / "report").mkdir(parents=True)
    (tmp_path / "conf" / "report" / "one.yaml").write_text("scorecard: false\nsections:\n  fig2_boundary:\n    overrides: ['variants=[base,adversarial]']\n")
    store = tmp_path / "store"
    out = _run(["--config-dir", str(tmp_path / "conf"), "experiment=report_digits", "report=one", *DDP, "debug=rehearsal",
                f"paths.artifacts_dir={store}", f"paths.output_dir={tmp_path / 'out'}", f"paths.data_dir={tmp_path / 'data'}"], tmp_path)
    for alias in ("base", "adversarial"):
        _assert_stored_is_what_every_rank_ended_with(out, store, alias)
    assert out.count("MEMBER: 2/2") == 2, "rank 1 of each training joined"
    (report,) = (tmp_path / "out").rglob("report.md")
    assert "fig2_boundary" in report.read_text()
    assert len(list((tmp_path / "out").rglob("boundary_plane*.png"))) >= 1
    assert "rank 1" not in "".join(line for line in out.splitlines() if "wrote figure" in line)


def test_more_processes_than_cores_is_warned_about_and_ends(tmp_path: Path) -> None:
    """The issue's `trainer=cpu trainer.devices=3` on 2 cores waited forever; now every rank trains and the run ends."""
    cores = len(os.sched_getaffinity(0))
    store = tmp_path / "store"
    out = _run(["experiment=train", "trainer=cpu", f"trainer.devices={cores + 1}", "logger=csv", "debug=rehearsal",
                f"paths.artifacts_dir={store}", f"paths.output_dir={tmp_path / 'out'}", f"paths.data_dir={tmp_path / 'data'}"], tmp_path)
    assert out.count(f"trainer.devices={cores + 1} starts {cores + 1} training processes on {cores} CPU core(s)") == 1
    digests = _rank_digests(out.replace(f"of {cores + 1} ended", "of 2 ended"))["base"]
    assert sorted(digests) == list(range(cores + 1)) and len(set(digests.values())) == 1
    state, meta = _stored(store, "base")
    assert digests[0] == _parameters_digest(state, meta)


# ---------------------------------------------------------------------------------------------
# processes a launcher started (torchrun here; SLURM and submitit tasks take the same path)


def _torchrun(args: list[str], cwd: Path) -> tuple[int, str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "robustness", *args]
    proc = subprocess.Popen(command, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    code, out, _ = _finish(proc)
    return code, out


def test_torchrun_ranks_decide_through_rank_0_and_store_once(tmp_path: Path) -> None:
    """Every rank runs the whole command: base (the parent) and the fine-tuned child, each trained by both, stored by rank 0."""
    store = tmp_path / "store"
    code, out = _torchrun(["experiment=train", "regularizer=adversarial_finetune", *DDP, "debug=rehearsal", f"paths.artifacts_dir={store}",
                           f"hydra.run.dir={tmp_path / 'out'}", f"paths.data_dir={tmp_path / 'data'}"], tmp_path)
    assert code == 0, out[-4000:]
    assert "terminate called" not in out, out[-4000:]  # each rank leaves its group before the interpreter's teardown
    for alias in ("base", "adversarial"):
        _assert_stored_is_what_every_rank_ended_with(out, store, alias)
    assert out.count("trained 'base'") == 1 and out.count("trained 'adversarial'") == 1  # one save each


@pytest.mark.parametrize(("args", "message"), [
    (["experiment=fig2_boundary", *DDP], "this probe runs in 2 processes started by torchrun; a probe runs in one"),
    (["experiment=train", "trainer=cpu", "logger=csv"], "torchrun started 2 processes for this job, and the trainer options make 1"),
])
def test_torchrun_refuses_what_one_group_cannot_run(tmp_path: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Each rank of a torchrun group, in the environment torchrun gives it, refuses before any work.

    Run in this process with each rank's variables: the refusal comes before the group is joined,
    so a real launch (``test_torchrun_ranks_decide_through_rank_0_and_store_once``) adds three
    interpreters' imports and nothing this test checks."""
    for rank in (0, 1):
        for name, value in {"TORCHELASTIC_RUN_ID": "refusal", "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0",
                            "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
            monkeypatch.setenv(name, value)
        code, err = cli_in_process([*args, f"paths.artifacts_dir={tmp_path / 'store'}", f"paths.output_dir={tmp_path / 'out'}"],
                                   capsys, monkeypatch)
        assert code == 2, err[-4000:]
        assert err.count(f"error: {message}") == 1, err[-4000:]
        assert "Traceback" not in err
    assert not (tmp_path / "store" / "digits").exists()


def test_submitit_tasks_of_one_job_are_the_ranks_of_its_training(tmp_path: Path) -> None:
    """hydra.launcher.tasks_per_node=2: both tasks run the job; they form the DDP group, rank 0 stores."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the cluster extra is not installed")
    store, sweep = tmp_path / "store", tmp_path / "sweep"
    _run(["-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "experiment=train", *DDP, "debug=rehearsal",
          f"paths.artifacts_dir={store}", f"hydra.sweep.dir={sweep}", f"paths.data_dir={tmp_path / 'data'}"], tmp_path)
    logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))
    (alias,) = _rank_digests(logs)
    _assert_stored_is_what_every_rank_ended_with(logs, store, alias)
    assert logs.count(f"trained '{alias}'") == 1


@pytest.mark.parametrize(("variables", "expected"), [
    ({}, None),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NAME": "sweep"}, (3, 4, 2)),
    ({"SLURM_NTASKS": "4", "SLURM_PROCID": "3", "SLURM_JOB_NAME": "interactive"}, None),  # Lightning leaves `srun --job-name=interactive` alone
    ({"TORCHELASTIC_RUN_ID": "x", "RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "1", "GROUP_RANK": "0"}, (1, 2, 2)),
    ({"SUBMITIT_LOCAL_NTASKS": "2", "SUBMITIT_LOCAL_GLOBALID": "1"}, (1, 2, 2)),
    ({"LOCAL_RANK": "1", "WORLD_SIZE": "2", "ROBUSTNESS_DDP_FOLLOWER_JOB": "/job.json"}, None),  # a rank the training stage started
])
def test_a_process_knows_its_place_before_any_trainer_exists(monkeypatch: pytest.MonkeyPatch, variables: dict, expected: tuple | None) -> None:
    from robustness.stages.common import FOLLOWER_JOB_ENV, launched_group

    assert FOLLOWER_JOB_ENV == "ROBUSTNESS_DDP_FOLLOWER_JOB"
    for name in [n for n in os.environ if n.startswith(("SLURM_", "SUBMITIT_", "TORCHELASTIC_"))] + ["RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"]:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    group = launched_group()
    assert (None if group is None else (group.rank, group.world_size, group.per_node)) == expected
    if group is not None:
        assert group.leader == (expected[0] == 0)
