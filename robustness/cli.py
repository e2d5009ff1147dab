"""The Hydra entry point: ``python -m robustness [experiment=NAME] [key=value ...]``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from robustness.errors import RobustnessError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
log = logging.getLogger("robustness")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def _main(cfg: DictConfig) -> float | None:
    from robustness.pipeline import run

    hydra_cfg = HydraConfig.get()
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("experiment=")]
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    tag = hydra_cfg.job.override_dirname if multirun else ""
    if multirun and cfg.logger.get("name") == "wandb" and not cfg.logger.get("group"):
        # One W&B group per sweep, one run per job.
        with open_dict(cfg):
            cfg.logger.group = f"{cfg.get('experiment_name')}-{Path(hydra_cfg.sweep.dir).name}"
    try:
        outcome = run(cfg, hydra_cfg.runtime.output_dir, overrides=overrides, tag=tag)
    except RobustnessError as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted: checkpoints and partial results are kept; run the same command again to resume", file=sys.stderr)
        raise SystemExit(130) from None
    # A number for sweepers that optimise the returned value.
    return outcome.metrics.get("test/acc") if outcome.metrics else None


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
