"""Lightning DDP on CPU (gloo): two ranks train base and CURE and end with identical parameters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("lightning_ddp_worker.py")


@pytest.mark.parametrize("regularizer", ["none", "cure"])
def test_ddp_ranks_end_with_identical_parameters(tmp_path: Path, regularizer: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(WORKER.parents[2]), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, str(WORKER), str(tmp_path), regularizer], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rank0 = torch.load(tmp_path / f"{regularizer}_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / f"{regularizer}_rank1.pt", weights_only=True)
    initial = _initial_state()
    changed = 0
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), f"rank 0 and rank 1 disagree on {key}"
        if value.is_floating_point() and not torch.equal(value, initial[key]):
            changed += 1
    assert changed > 0  # the ranks did train, not merely stay at the shared initialisation


def _initial_state() -> dict[str, torch.Tensor]:
    import pytorch_lightning as pl

    from robustness.data.digits import DigitsDataModule
    from robustness.models.smallcnn import smallcnn

    pl.seed_everything(0, workers=True, verbose=False)
    return dict(smallcnn(DigitsDataModule.info, width=8).named_parameters())
