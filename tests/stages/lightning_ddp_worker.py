"""Launched by tests/test_distributed.py: a few DDP steps of the real training module on CPU.

Lightning's DDP launcher starts the second rank by running this script again; each rank then
writes its parameters so the test can check that the ranks agree.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

from robustness.data.digits import DigitsDataModule
from robustness.models.smallcnn import smallcnn
from robustness.registry import build
from robustness.training.module import ClassifierModule


def main(out_dir: str, regularizer_name: str) -> None:
    pl.seed_everything(0, workers=True, verbose=False)
    datamodule = DigitsDataModule(data_dir=out_dir, batch_size=32, seed=0, train_fraction=0.3)
    datamodule.setup()
    model = smallcnn(datamodule.info, width=8)
    regularizer_cfg = {"name": "none", "variant": "base"} if regularizer_name == "none" else {"name": "cure", "variant": "cure", "lam": 1.0, "h": 0.5}
    module = ClassifierModule(model, 10, build("regularizer", regularizer_cfg), lr=1e-2)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)
    # Parameters, not buffers: batch-norm running statistics are per-rank under DDP.
    state = {k: v.detach().clone() for k, v in model.named_parameters()}
    torch.save(state, Path(out_dir) / f"{regularizer_name}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
