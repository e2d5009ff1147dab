"""The Hydra entry point: ``python -m robustness [experiment=NAME] [key=value ...]``."""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

from robustness.errors import ConfigError, RobustnessError, composition_error

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
log = logging.getLogger("robustness")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from robustness import tracking
    from robustness.stages import run

    quiet_third_party_noise()

    hydra_cfg = HydraConfig.get()
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("experiment=")]
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    tag = hydra_cfg.job.override_dirname if multirun else ""
    if multirun and cfg.logger.get("name") == "wandb" and not cfg.logger.get("group"):
        # One W&B group per sweep, one run per job.
        with open_dict(cfg):
            cfg.logger.group = f"{cfg.get('experiment_name')}-{Path(hydra_cfg.sweep.dir).name}"
    # Every W&B run of this command (a report's own, its sections', the variants it trains) goes
    # into one wandb/ folder of the run directory, so that `wandb sync <run dir>/wandb` finds them all.
    tracking.set_run_root(Path(hydra_cfg.runtime.output_dir))
    try:
        outcome = run(cfg, hydra_cfg.runtime.output_dir, overrides=overrides, tag=tag)
    except RobustnessError as exc:
        # One job of a sweep: its error in its log and folder, and the other jobs and the summary go on (robustness/sweep.py).
        _fail(exc, exit_code=None if multirun else 2)
        from robustness.sweep import job_error

        job_error(Path(hydra_cfg.runtime.output_dir), exc)
        return None
    except KeyboardInterrupt as exc:
        # 130 for Ctrl-C, 128 + N for another signal (143 for SIGTERM), as a shell reports them.
        code = 128 + int(getattr(exc, "signum", signal.SIGINT))
        print("interrupted: checkpoints and partial results are kept; run the same command again to resume", file=sys.stderr)
        raise SystemExit(code) from None
    # A number for sweepers that optimise the returned value.
    return outcome.metrics.get("test/acc") if outcome.metrics else None


def user_message(exc: RobustnessError) -> str:
    """The message and hint of one of our errors, as the user should read it.

    An error raised inside a DataLoader worker process reaches the main process re-created by
    PyTorch from text: 'Caught DataError in DataLoader worker process 0. Original Traceback
    (most recent call last): ... robustness.errors.DataError: <message>\n  fix: <hint>'.
    Only the part after the exception's name is ours; the worker's traceback is dropped.
    """
    text = str(exc)
    if "Original Traceback" in text and "DataLoader worker" in text:
        name = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        at = text.rfind(name)
        if at >= 0:
            text = text[at + len(name):]
    return text.strip()


def _fail(exc: RobustnessError, to_log: bool = True, exit_code: int | None = 2) -> None:
    """Print our error (and put it in the run's log file); exit with ``exit_code`` unless None."""
    message = user_message(exc)
    if to_log:  # into the run's log file only: the console gets the message once, below
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "error: %s", (message,), None))
    print(f"error: {message}", file=sys.stderr)
    if exit_code is not None:
        raise SystemExit(exit_code) from None


def quiet_third_party_noise() -> None:
    """Keep the libraries' advertising and repeated deprecation notes out of a researcher's log."""
    import warnings

    for pattern in (".*LeafSpec.*", ".*litlogger.*", ".*Consider setting `persistent_workers=True`.*",
                    ".*does not have many workers.*", ".*number of training batches.*smaller than the logging interval.*"):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_drop_tips)


def _drop_tips(record: logging.LogRecord) -> bool:
    text = record.getMessage()
    return not any(noise in text for noise in ("litlogger", "💡", "GPU available:", "TPU available:", "HPU available:"))


# Options with which Hydra creates no output directory.
_NO_OUTPUT_FLAGS = {"-h", "--help", "--hydra-help", "-c", "--cfg", "-i", "--info", "-sc", "--shell-completion", "-p", "--package", "--version"}


def _requested_output_dir(argv: list[str]) -> tuple[str, str] | None:
    """The output folder the command line asks for (where Hydra will create the run directory),
    and the key (or environment variable) that asks for it.

    Hydra creates that directory, and writes into it, before any of our code runs, so an
    unwritable place would surface as a traceback from inside Hydra. Only plain paths are
    judged here; anything with an interpolation or a sweep is left to Hydra and to
    ``stages.checks``.
    """
    if any(arg.split("=", 1)[0] in _NO_OUTPUT_FLAGS for arg in argv):
        return None
    multirun = any(arg in ("-m", "--multirun") for arg in argv)
    values: dict[str, str] = {}
    for arg in argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if sep and key in ("paths.output_dir", "hydra.run.dir", "hydra.sweep.dir"):
            values[key] = value.strip("'\"")
    if os.environ.get("ROBUSTNESS_OUTPUT_DIR"):
        values.setdefault("ROBUSTNESS_OUTPUT_DIR", os.environ["ROBUSTNESS_OUTPUT_DIR"])
    key = next((k for k in ("hydra.sweep.dir" if multirun else "hydra.run.dir", "paths.output_dir", "ROBUSTNESS_OUTPUT_DIR") if values.get(k)), None)
    value = values[key] if key else "outputs"
    if "${" in value or "," in value:
        return None
    return key or "paths.output_dir", value


def _check_output_dir(argv: list[str]) -> None:
    requested = _requested_output_dir(argv)
    if requested is None:
        return
    from robustness.io import path_length_problem

    key, value = requested
    target = Path(value).expanduser().absolute()
    long = path_length_problem(target)
    if long:
        _fail(ConfigError(f"{key} cannot be used as the output folder: {long}", f"choose a shorter {key}"), to_log=False)
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is a file, not a folder"
    else:
        try:  # a real write: permission bits say nothing for root or on a read-only mount
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as exc:
            problem = f"{existing} is not writable: {exc.strerror or exc}"
    if problem:
        _fail(ConfigError(
            f"cannot write to the output directory {target} ({problem})",
            "choose a writable place with paths.output_dir=... (or hydra.run.dir=...)",
        ), to_log=False)


def _check_launcher(argv: list[str]) -> None:
    """A submitit launcher needs its optional package; without it Hydra fails with a traceback."""
    for arg in argv:
        key, _, value = arg.lstrip("+").partition("=")
        if key == "hydra/launcher" and value.startswith("submitit"):
            try:
                import hydra_plugins.hydra_submitit_launcher  # noqa: F401
            except ImportError:
                _fail(ConfigError(
                    f"hydra/launcher={value} needs the hydra-submitit-launcher package, which is not installed",
                    'install the cluster extra: pip install -e ".[cluster]"',
                ), to_log=False)


def _follow_ddp(job: str) -> NoReturn:
    """A DDP rank Lightning started by running this command again: join rank 0's training, nothing else.

    Its command line is the user's (with Hydra's run directory added), which could name a sweep
    or a launcher: it is not run. Logs go to the console, prefixed with the rank, and beside rank 0's.
    """
    from robustness.stages.train import follow

    rank = os.environ.get("LOCAL_RANK", "?")
    quiet_third_party_noise()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    try:
        from robustness.io import read_json

        handlers.append(logging.FileHandler(Path(read_json(job)["output_dir"]) / f"train_ddp_rank{rank}.log", encoding="utf-8"))
    except (OSError, ValueError, KeyError):
        pass
    logging.basicConfig(level=logging.INFO, format=f"[%(asctime)s][rank {rank}][%(name)s][%(levelname)s] - %(message)s", handlers=handlers, force=True)
    try:
        follow(Path(job), CONFIG_DIR)
    except RobustnessError as exc:
        _fail(exc)
    raise SystemExit(0)


def main() -> None:
    if os.environ.get("LOCAL_RANK", "0") != "0":  # perhaps a DDP rank that the training stage had Lightning start
        from robustness.stages.common import FOLLOWER_JOB_ENV

        job = os.environ.get(FOLLOWER_JOB_ENV)
        if job:
            _follow_ddp(job)
    _check_launcher(sys.argv[1:])
    _check_output_dir(sys.argv[1:])
    asked = os.environ.get("HYDRA_FULL_ERROR")
    if asked == "1":  # the user asked for Hydra's own reports, tracebacks included
        _main()
        return
    # Hydra prints what it cannot compose (a misspelt experiment or key) and exits 1; told to
    # re-raise instead, it lets that reach the user as our error and fix, with exit 2.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        _main()
    except (HydraException, OmegaConfBaseException) as exc:
        _fail(composition_error(exc), to_log=False)
    finally:
        if asked is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = asked


if __name__ == "__main__":
    main()
