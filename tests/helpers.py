"""Run experiments inside the test suite exactly as the command line would, on embedded data."""

from __future__ import annotations

import os
from pathlib import Path
from contextlib import contextmanager
from typing import Iterator, Sequence

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from robustness.cli import CONFIG_DIR
from robustness.stages import RunOutcome, compose_experiment, run
from robustness.testing import correctly_classified, digits_resnet18, rho, train_digits_smallcnn  # noqa: F401 - shared with the benchmarks

# One store for the whole session: variants trained by the first experiment that needs them
# are reused by the others (set by conftest.py).
SHARED_ARTIFACTS = os.environ.setdefault("ROBUSTNESS_TEST_ARTIFACTS", "")

# Short training for variants the store lacks; quiet progress output.
FAST_TRAINING = [
    "trainer.max_epochs=3",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]


def fast_overrides(artifacts_dir: str | Path | None = None, logger: str = "csv") -> list[str]:
    """Overrides every test run uses: shared store, quick training, no progress bars."""
    artifacts = artifacts_dir or os.environ["ROBUSTNESS_TEST_ARTIFACTS"]
    quoted = ",".join(f"'{o}'" for o in FAST_TRAINING)
    return [
        f"paths.artifacts_dir={artifacts}",
        f"logger={logger}",
        "trainer.enable_progress_bar=false",
        f"store.train_overrides=[{quoted}]",
    ]


@contextmanager
def hydra_initialized() -> Iterator[None]:
    """Hydra's config search path, as the entry point sets it up (reports compose their sections)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        yield


def compose(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    with hydra_initialized():
        return compose_experiment(name, list(overrides))


def run_experiment(name: str, overrides: Sequence[str], tmp_path: Path, artifacts_dir: str | Path | None = None, logger: str = "csv") -> Path:
    """Compose experiments/<name>.yaml with overrides and run it; returns the run's output directory.

    ``overrides`` come after the test defaults (shared store, short training, CSV logging),
    so a test can override any of them.
    """
    return run_outcome(name, overrides, tmp_path, artifacts_dir, logger).output_dir


def run_outcome(name: str, overrides: Sequence[str], tmp_path: Path, artifacts_dir: str | Path | None = None, logger: str = "csv") -> RunOutcome:
    all_overrides = [*fast_overrides(artifacts_dir, logger), f"paths.data_dir={tmp_path / 'data'}", *overrides]
    output_dir = Path(tmp_path) / f"run_{name}"
    with hydra_initialized():
        cfg = compose_experiment(name, all_overrides)
        return run(cfg, output_dir, overrides=all_overrides)


def stored_model(artifacts_dir: str | Path, alias: str, dataset: str = "digits", model: str = "smallcnn") -> Path:
    """The live version folder (model.pt, meta.json, ...) of the model the store's ``alias`` names."""
    from robustness.store import ModelStore

    store = ModelStore(artifacts_dir, dataset, model)
    key = store.aliases()[alias]
    directory = store.version_dir(key)
    assert directory is not None, f"alias {alias} points at {key}, which has no complete save"
    return directory


def resume_checkpoints(artifacts_dir: str | Path, dataset: str = "digits", model: str = "smallcnn") -> list[Path]:
    """Every ``last.ckpt`` of an unfinished training run in the store."""
    return sorted(Path(artifacts_dir).glob(f"{dataset}/{model}/entries/*/resume/last.ckpt"))


def make_fake_tiny(data_dir: Path, train_per_class: int = 4, val_per_class: int = 2) -> Path:
    """A three-class Tiny-ImageNet tree in its real layout (JPEGs, val_annotations.txt)."""
    from robustness.data import layouts

    return layouts.write_tinyimagenet(data_dir, train_per_class, seed=0, val_per_class=val_per_class, num_classes=3)


def cli_in_process(args: Sequence[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """``python -m robustness *args`` run in this process: its exit status and what it printed to
    stderr. For refusals, which end before any work: a subprocess would spend its seconds importing
    torch and Lightning to print one line."""
    import logging
    import sys

    from robustness import cli, tracking

    monkeypatch.setattr(sys, "argv", ["robustness", *args])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    # What the entry point sets for its process: where W&B runs go, the root logger's handlers, the
    # filters on Lightning's loggers. Each goes back as it was, for the tests after this one.
    monkeypatch.setattr(tracking, "_RUN_ROOT", getattr(tracking, "_RUN_ROOT", None))
    lightning = [logging.getLogger(name) for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                                                       "lightning_fabric.utilities.rank_zero")]
    for logger in lightning:
        monkeypatch.setattr(logger, "filters", list(logger.filters))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    capsys.readouterr()
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        GlobalHydra.instance().clear()
        for handler in list(root.handlers):  # the run's log file and console handlers go with it
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        root.setLevel(level)
    return code, capsys.readouterr().err
