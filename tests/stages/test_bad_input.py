"""Bad input of issue 32, as a user meets it on the command line: everything that reaches Lightning,
torch or the operating system is checked before work, and one bad job of a sweep stays one job."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import cli_in_process, compose

from robustness.errors import ConfigError
from robustness.stages import checks

LONG = "x" * 300


def _cli(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "robustness", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _refused(code: int, stderr: str, message: str) -> None:
    assert code == 2, stderr[-3000:]
    assert stderr.startswith(f"error: {message}"), stderr[-3000:]
    assert "\n  fix: " in stderr and "Traceback" not in stderr
    assert stderr.count("error: ") == 1


@pytest.mark.parametrize(("overrides", "message"), [
    (["+trainer.gradient_clip=1.0"], "trainer.gradient_clip is not an option of Lightning's Trainer"),
    (["trainer.accelerator=cpu", "+trainer.strategy=fsdp"], "trainer.strategy=fsdp needs GPUs, and this run has none"),
    (["+trainer.strategy=ddp_spawn", "trainer.devices=2"], "trainer.strategy=ddp_spawn starts its processes with multiprocessing"),
    (["+trainer.strategy=nonsense"], "unknown trainer.strategy 'nonsense'"),
    (["+trainer.gradient_clip_val=abc"], "Lightning refuses these trainer options: `gradient_clip_val` should be an int or a float"),
    (["+trainer.max_time=abc"], "Lightning refuses these trainer options: `Timer(duration='abc')` is not a valid duration"),
    (["+trainer.logger=true"], "trainer.logger is set by the training stage itself"),
    (["trainer.devices=0"], "trainer.devices must be >= 1, got 0"),
    (["trainer=ddp", "trainer.accelerator=cpu", "+trainer.num_nodes=2"], "trainer.num_nodes=2 needs a launcher that starts the processes on every machine"),
    (["trainer.accelerator=cpu", "trainer.precision=16-mixed"], "trainer.precision=16-mixed needs a GPU"),
    (["dataset.val_fraction=1.0"], "dataset.val_fraction must lie in (0, 1), got 1.0"),
    (["dataset.val_fraction=0.5", "dataset.test_fraction=0.5"], "dataset.val_fraction + dataset.test_fraction must be < 1"),
    ([f"paths.output_dir={LONG}"], "paths.output_dir cannot be used as the output folder: it holds a folder name of 300 bytes"),
    ([f"hydra.run.dir=out/{LONG}"], "hydra.run.dir cannot be used as the output folder: it holds a folder name of 300 bytes"),
    ([f"paths.artifacts_dir={LONG}"], "paths.artifacts_dir cannot be used: it holds a folder name of 300 bytes"),
])
def test_values_for_lightning_torch_and_the_file_system_are_refused_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                               monkeypatch: pytest.MonkeyPatch, overrides: list[str], message: str) -> None:
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "store"
    _refused(*cli_in_process(["experiment=train", "logger=csv", f"paths.artifacts_dir={store}", *overrides], capsys, monkeypatch), message)
    assert not (store / "digits").exists() and not list(tmp_path.glob("x*"))  # nothing trained, no folder made


def test_a_refusal_is_the_same_from_a_fresh_process(tmp_path: Path) -> None:
    """The cases above run the entry point in the test's process; once from a shell, as a user types it."""
    out = _cli(["experiment=train", "logger=csv", f"paths.artifacts_dir={tmp_path / 'store'}", "+trainer.gradient_clip=1.0"], tmp_path)
    _refused(out.returncode, out.stderr, "trainer.gradient_clip is not an option of Lightning's Trainer")
    assert out.stdout == "" and not (tmp_path / "store" / "digits").exists()


def test_an_unknown_trainer_key_lists_every_option_lightning_takes(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import pytorch_lightning as pl

    monkeypatch.chdir(tmp_path)
    code, stderr = cli_in_process(["experiment=train", "logger=csv", "+trainer.gradient_clip=1.0"], capsys, monkeypatch)
    _refused(code, stderr, "trainer.gradient_clip is not an option")
    offered = stderr.split("fix: choose among: ", 1)[1].strip().split(", ")
    expected = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self", "logger", "callbacks", "default_root_dir"}
    assert set(offered) == expected | {"max_bad_steps"}


def test_every_trainer_option_passes_through_to_lightning(tmp_path: Path) -> None:
    """Options the issue did not name are accepted and reach the Trainer check, with Lightning's own validation."""
    cfg = compose("train", ["trainer=cpu", "+trainer.gradient_clip_val=0.5", "+trainer.accumulate_grad_batches=2",
                                  "+trainer.val_check_interval=0.5", "+trainer.detect_anomaly=false", "+trainer.barebones=false",
                                  "+trainer.num_sanity_val_steps=0", "+trainer.check_val_every_n_epoch=1"])
    checks.check_config(cfg, tmp_path / "out")
    cfg = compose("train", ["trainer=cpu", "+trainer.val_check_interval=2.5"])
    with pytest.raises(ConfigError, match="val_check_interval"):
        checks.check_config(cfg, tmp_path / "out")


def test_the_checks_leave_torchs_process_wide_flags_as_they_were(tmp_path: Path) -> None:
    import torch

    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    checks.check_config(compose("train", ["trainer=cpu", "+trainer.benchmark=true"]), tmp_path / "out")
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before


@pytest.mark.parametrize(("overrides", "warned"), [
    (["dataset=colour_digits"], True),             # the digits recipe (the default) on other data
    (["dataset=colour_digits", "recipe=generic"], False),
    (["recipe=colour_digits"], False),              # a recipe picks its own dataset
])
def test_a_recipe_made_for_other_data_is_warned_about(tmp_path: Path, caplog: pytest.LogCaptureFixture, overrides: list[str], warned: bool) -> None:
    with caplog.at_level("WARNING", logger="robustness"):
        checks.check_config(compose("train", ["trainer=cpu", *overrides]), tmp_path / "out")
    said = [r.getMessage() for r in caplog.records if "holds the training settings chosen for" in r.getMessage()]
    assert said == (["recipe=digits holds the training settings chosen for digits, and this run reads dataset=colour_digits: its variants "
                     "train with them. Add recipe=generic (settings for any data) or the recipe made for colour_digits, unless that is "
                     "what you mean."] if warned else [])


# ---------------------------------------------------------------------------------------------
# sweeps


def _summary(sweep: Path) -> list[dict[str, str]]:
    import csv

    with open(sweep / "sweep_summary.csv", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


SWEEP = ["experiment=train", "trainer=cpu", "logger=csv", "debug=rehearsal"]


@pytest.mark.parametrize("launcher", ["basic", "submitit_local"])
def test_one_bad_value_in_a_sweep_is_that_jobs_error_and_the_others_run(tmp_path: Path, launcher: str, capsys: pytest.CaptureFixture[str],
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Also the submitit sweep's summary: its jobs run in processes of their own, the summary is the command's."""
    sweep = tmp_path / "sweep"
    args = ["-m", *SWEEP, "optim.lr=1e-2,-1", f"paths.artifacts_dir={tmp_path / 'store'}", f"hydra.sweep.dir={sweep}"]
    if launcher == "basic":  # jobs run in the command's process: run it in this one
        monkeypatch.chdir(tmp_path)
        code, stderr = cli_in_process(args, capsys, monkeypatch)
        output = stderr
    else:
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the cluster extra is not installed")
        out = _cli([args[0], f"hydra/launcher={launcher}", *args[1:]], tmp_path)
        code, stderr, output = out.returncode, out.stderr, out.stderr + out.stdout
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in output, stderr[-3000:]
    # Refused in the command's own process, before the launcher started any job.
    assert re.search(r"^error: job 1 of the sweep \(experiment=train .*optim\.lr=-1.*\) is refused before launch: "
                     r"the learning rate must be > 0, got -1$", stderr, re.M), stderr[-3000:]
    assert (sweep / "sweep_summary.csv").read_text().startswith("job,optim.lr,")
    rows = _summary(sweep)
    assert [row["job"] for row in rows] == ["0", "1"]
    assert rows[0]["status"] == "done" and float(rows[0]["optim.lr"]) == 1e-2 and 0 < float(rows[0]["test/acc"]) <= 1
    assert rows[1]["status"] == "refused: the learning rate must be > 0, got -1"
    assert (sweep / "1" / "error.txt").read_text().startswith("the learning rate must be > 0, got -1")
    assert not (sweep / "1" / "metrics.json").exists()


def test_a_job_that_fails_at_run_time_leaves_the_other_jobs_and_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Known only once the job runs (the data folder is empty): its error, then the next job."""
    sweep = tmp_path / "sweep"
    monkeypatch.chdir(tmp_path)
    code, stderr = cli_in_process(["-m", *SWEEP, "dataset=cifar10,digits", f"paths.data_dir={tmp_path / 'empty'}",
                                   f"paths.artifacts_dir={tmp_path / 'store'}", f"hydra.sweep.dir={sweep}"], capsys, monkeypatch)
    assert code == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    rows = _summary(sweep)
    assert rows[0]["dataset"] == "cifar10" and rows[0]["status"].startswith("error: CIFAR-10 not found")
    assert rows[1]["dataset"] == "digits" and rows[1]["status"] == "done"


def test_a_sweep_into_a_folder_of_an_older_sweep_lists_only_its_own_jobs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = tmp_path / "sweep"
    common = [*SWEEP, f"paths.artifacts_dir={tmp_path / 'store'}", f"hydra.sweep.dir={sweep}"]
    monkeypatch.chdir(tmp_path)
    code, stderr = cli_in_process(["-m", *common, "seed=0,1,2"], capsys, monkeypatch)
    assert code == 0, stderr[-3000:]
    assert [row["seed"] for row in _summary(sweep)] == ["0", "1", "2"]
    code, stderr = cli_in_process(["-m", *common, "seed=5"], capsys, monkeypatch)
    assert code == 0, stderr[-3000:]
    rows = _summary(sweep)
    assert len(rows) == 1 and rows[0]["job"] == "0" and rows[0]["seed"] == "5" and rows[0]["status"] == "done"
    assert "seed=5" in (sweep / "0" / ".hydra" / "overrides.yaml").read_text()
