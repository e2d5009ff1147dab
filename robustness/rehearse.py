"""``make rehearse``: every experiment in experiments/ runs, at its real size, on the CPU.

Small data is written in each dataset's real on-disk layout (CIFAR-10 pickles, SVHN .mat files,
a Tiny-ImageNet tree of 64x64 JPEGs, Fashion-MNIST idx files), then each experiment runs as a
user would run it - ``python -m robustness experiment=NAME`` in a fresh process - with
``debug=rehearsal``, which shrinks the amount of work (batches, epochs, images, grid) but not
what runs: the same dataset class, architecture, image size, class count, regularizer, attack,
probe and reporter. All experiments share one store, so a report reuses the variants that an
earlier training experiment stored with the same config.

The list is read from the folder, so a new experiment is rehearsed without anyone adding it.
Prints one line per experiment, then ``N passed, M failed``; exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO / "experiments"
# Images per class written for each generated dataset: enough for a couple of batches per epoch
# and for the probes' handfuls of images, few enough to write in seconds.
PER_CLASS = 4
# Tiny-ImageNet has 200 classes: one image each is already 25 batches. Adversarial training scans
# the training set for images its (here untrained) model gets right, at the real 64x64 ResNet-18.
PER_CLASS_OF = {"tinyimagenet": 1}


def experiment_names() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))


def order(names: list[str]) -> list[str]:
    """Training experiments first, then probes, then reports: later ones reuse stored variants."""

    def kind(name: str) -> int:
        text = (EXPERIMENTS / f"{name}.yaml").read_text(encoding="utf-8")
        return 0 if "task: train" in text else 2 if "task: report" in text else 1

    return sorted(names, key=lambda n: (kind(n), n))


def arguments(name: str) -> list[list[str]]:
    """The argument lists experiment ``name`` is rehearsed with, one run each.

    ``experiment=probe`` runs whatever probe it is given, and fails without one: it is rehearsed
    with each probe that no other experiment names, so that every probe runs in a rehearsal.
    """
    if name != "probe":
        return [[]]
    from robustness.probes.defaults import choices

    texts = "".join(p.read_text(encoding="utf-8") for p in EXPERIMENTS.glob("*.yaml"))
    named = set(re.findall(r"override /probe: (\w+)", texts))
    probes = choices("probe")
    return [[f"probe={probe}"] for probe in probes if probe not in named] or [[f"probe={probes[0]}"]]


def write_data(data_dir: Path) -> None:
    from robustness.data import layouts

    layouts.write_all(data_dir, per_class=PER_CLASS, per_class_of=PER_CLASS_OF)


def run_one(name: str, data_dir: Path, work: Path, timeout: float, extra: list[str] | None = None) -> tuple[bool, float, str]:
    command = [
        sys.executable, "-m", "robustness", f"experiment={name}", *(extra or []), "debug=rehearsal", "logger=csv",
        f"paths.data_dir={data_dir}", f"paths.artifacts_dir={work / 'store'}", f"paths.output_dir={work / 'outputs'}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1", "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    log_path = _log_path(work, name, extra)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            completed = subprocess.run(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
        ok = completed.returncode == 0
        detail = "" if ok else _last_error(log_path, completed.returncode)
    except subprocess.TimeoutExpired:
        ok, detail = False, f"timed out after {timeout:.0f} s"
    return ok, time.monotonic() - started, detail


def _label(name: str, extra: list[str] | None) -> str:
    return " ".join([name, *(extra or [])])


def _log_path(work: Path, name: str, extra: list[str] | None) -> Path:
    return work / "logs" / f"{_label(name, extra).replace(' ', '_')}.log"


def _last_error(log_path: Path, code: int) -> str:
    lines = [line.strip() for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:") or "Error" in line or "Exception" in line:
            return f"exit {code}: {line[:300]}"
    return f"exit {code}: {lines[-1][:300] if lines else 'no output'}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m robustness.rehearse", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="experiments to rehearse (default: every file in experiments/)")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep data, store, outputs and logs here (default: a temporary folder)")
    # Long enough for a 64x64 ResNet-18 report on two shared CPU cores (~16 min measured), short enough to catch a hang.
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per experiment")
    args = parser.parse_args(argv)
    available = experiment_names()
    unknown = [n for n in args.names if n not in available]
    if unknown:
        print(f"error: no experiment named {', '.join(unknown)} in {EXPERIMENTS}\n  fix: choose among: {', '.join(available)}", file=sys.stderr)
        return 2
    names = order(args.names or available)
    if args.work_dir is not None:
        from robustness.io import path_length_problem
        from robustness.stages.common import writable_problem

        work_dir = args.work_dir.expanduser().absolute()
        problem = path_length_problem(work_dir) or writable_problem(work_dir)
        if problem:
            print(f"error: cannot use --work-dir {work_dir} ({problem})\n  fix: give a folder that exists or can be created, "
                  "and that this user can write to", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="robustness-rehearsal-") as tmp:
        work = (args.work_dir or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        data_dir = work / "data"
        started = time.monotonic()
        write_data(data_dir)
        print(f"rehearsing {len(names)} experiments (data in each real layout written in {time.monotonic() - started:.0f} s; logs in {work / 'logs'})", flush=True)
        passed = failed = 0
        for name in names:
            for extra in arguments(name):
                ok, seconds, detail = run_one(name, data_dir, work, args.timeout, extra)
                passed, failed = passed + ok, failed + (not ok)
                print(f"{'PASS' if ok else 'FAIL'}  {_label(name, extra):<28} {seconds:6.0f} s  {detail}", flush=True)
                if not ok:
                    tail = _log_path(work, name, extra).read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
                    print("\n".join(f"      | {line}" for line in tail), flush=True)
        print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
