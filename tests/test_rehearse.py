"""The real settings rehearsed (issue 12): the report pipelines and the CIFAR-10 / Tiny-ImageNet
training experiments run end to end at their real size on small data in each real on-disk layout,
and every command the README shows runs as written (in rehearsal mode where it trains).

``make rehearse`` runs every file in experiments/; this runs the ones a change is most likely to
break, in one store, so the README commands after them reuse the variants they trained.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import cli_in_process
from robustness import rehearse

REPO = Path(__file__).resolve().parents[1]
# The reports train every variant of their recipe (Tiny-ImageNet's at the report's architecture,
# image size and 200 classes), so they rehearse the real-setting trainings too. report_cifar10 is
# the same pipeline with the same architecture on 32x32 images and 10 classes; `make rehearse`
# runs it (here it cost more than both of these together, for no code path of its own).
IN_TESTS = ["report_digits", "report_tinyimagenet"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rehearsal")


def _env() -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}


def test_every_experiment_file_is_rehearsed_by_make_rehearse() -> None:
    names = rehearse.experiment_names()
    assert names == sorted(p.stem for p in (REPO / "experiments").glob("*.yaml")) and len(names) >= 18
    assert set(IN_TESTS) <= set(names)
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^rehearse:.*\n\t\$\(PYTHON\) -m robustness\.rehearse\s*$", makefile, re.M)


def test_the_generic_probe_experiment_is_rehearsed_with_each_probe_no_other_experiment_names() -> None:
    """experiment=probe fails without a probe: the rehearsal gives it those no figure's experiment runs."""
    assert rehearse.arguments("probe") == [["probe=hessian_norm"], ["probe=min_perturbation"]]
    assert rehearse.arguments("fig2_boundary") == [[]]


def test_report_pipelines_and_real_setting_training_run_at_real_size(work: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "robustness.rehearse", *IN_TESTS, "--work-dir", str(work)],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=3000)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert out.stdout.rstrip().splitlines()[-1] == f"{len(IN_TESTS)} passed, 0 failed"
    for name in IN_TESTS:
        assert re.search(rf"^PASS  {name}\s", out.stdout, re.M), name
    # The Tiny-ImageNet report ran the report's own architecture on 200 classes of 64x64 images.
    (report,) = list((work / "outputs" / "report_tinyimagenet").glob("*/report.md"))
    assert "Table 1" in report.read_text()


def readme_commands() -> list[str]:
    """Every ``python -m robustness ...`` line of the README's code blocks, as written."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.splitlines():
            for part in line.split("  #", 1)[0].split("&&"):
                command = part.strip()
                placeholder = "NAME" in command or "[key=value" in command  # the README's template line
                if command.startswith("python -m robustness") and not command.startswith("python -m robustness.") and not placeholder:
                    commands.append(command)
    return commands


def test_every_make_target_the_readme_shows_exists() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"\bmake ([a-z][a-z-]*)", text))
    assert {"install", "test", "rehearse", "bench"} <= targets
    for target in targets:
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), target


def test_every_readme_command_runs_as_written(work: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run after the rehearsal above (same module, same store): variants it trained are reused.

    Each command runs through the entry point in this process (``python -m robustness`` is
    ``robustness.cli.main`` with those arguments), from the rehearsal's folder: a fresh
    interpreter per command would spend most of this test importing torch and Lightning."""
    commands = readme_commands()
    assert any("experiment=fig2_boundary" in c for c in commands) and any(c.endswith("--help") for c in commands)
    data_dir = work / "data"
    if not data_dir.is_dir():  # this test alone: write the data the rehearsal would have written
        rehearse.write_data(data_dir)
    monkeypatch.chdir(work)
    failures = []
    for command in commands:
        args = shlex.split(command)[3:]
        if "--help" not in args:
            args += ["debug=rehearsal", "logger=csv", f"paths.data_dir={data_dir}", f"paths.artifacts_dir={work / 'store'}",
                     f"paths.output_dir={work / 'readme-outputs'}"]
        code, stderr = cli_in_process(args, capsys, monkeypatch)
        if code != 0:
            failures.append(f"{command}\n{stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize("where", ["a-file", "a-file/below"])
def test_a_work_dir_that_is_a_file_is_our_error(tmp_path: Path, where: str, capsys: pytest.CaptureFixture[str]) -> None:
    # `python -m robustness.rehearse` exits with what main() returns.
    (tmp_path / "a-file").write_text("")
    code = rehearse.main(["train", "--work-dir", str(tmp_path / where)])
    out, err = capsys.readouterr()
    assert code == 2, err[-3000:]
    assert err.startswith(f"error: cannot use --work-dir {tmp_path / where} ({tmp_path / 'a-file'} is a file, not a folder)")
    assert "\n  fix: " in err and "Traceback" not in err
    assert out == ""  # refused before any data was written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
