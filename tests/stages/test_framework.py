"""The spine: entry point, config groups, training into the store, loading it back safely."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import cli_in_process, compose, hydra_initialized, resume_checkpoints, run_outcome, stored_model
from robustness.errors import ConfigError, StoreError
from robustness.registry import build
from robustness.store import ModelStore

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "robustness", *args], cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_help_lists_groups_and_options() -> None:
    out = cli("--help")
    assert out.returncode == 0, out.stderr
    for group in ("dataset:", "model:", "regularizer:", "attack:", "probe:", "trainer:", "logger:", "experiment:"):
        assert group in out.stdout
    for option in ("digits", "cifar10", "tinyimagenet", "smallcnn", "resnet18", "train", "report_digits"):
        assert option in out.stdout


@pytest.mark.parametrize(("args", "error", "fix"), [
    (["experiment=table99"], "there is no experiment 'table99'",
     "one variant trains with experiment=train regularizer=NAME recipe=DATASET; or choose among: curvature_profile, fig2_boundary, "),
    (["experiment=fig2_boundry"], "there is no experiment 'fig2_boundry'", "did you mean experiment=fig2_boundary? one variant trains with "),
    (["experiment=train", "model=resnet99"], "there is no model 'resnet99'", "did you mean model=resnet50? choose among: import, pooledcnn, "),
    (["dataset=imagenet22k"], "there is no dataset 'imagenet22k'", "choose among: arrays, cifar10, colour_digits, digits, "),
    (["experiment=train", "optim.learning_rate=3"], "optim.learning_rate is not a setting of this run",
     "check its spelling (add --cfg job to the command to print every setting); to add a new key, write +optim.learning_rate=..."),
    (["experiment=train", "probe.eps=[0.1"], "cannot read the command line: ", "quote values that hold brackets"),
    (["experiment=train", "+optim.lr=2"], "the configuration cannot be composed: Could not append to config. An item is already at 'optim.lr'.",
     "python -m robustness --help"),
    (["-m", "experiment=train", "optim.lr=1e-3,1e-2", "optim.learnin=3"], "optim.learnin is not a setting of this run", "+optim.learnin=..."),
])
def test_what_hydra_cannot_compose_is_our_error_and_fix(tmp_path: Path, args: list[str], error: str, fix: str,
                                                         capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelt experiment, group option or key, and an override that cannot be parsed: exit 2, before any work."""
    monkeypatch.chdir(tmp_path)
    code, stderr = cli_in_process([*args, f"paths.artifacts_dir={tmp_path / 'store'}"], capsys, monkeypatch)
    assert code == 2, stderr[-3000:]
    assert stderr.startswith(f"error: {error}"), stderr[-3000:]
    assert "\n  fix: " in stderr and fix in stderr.split("\n  fix: ", 1)[1], stderr[-3000:]
    assert "Traceback" not in stderr and not (tmp_path / "store").exists()
    assert os.environ.get("HYDRA_FULL_ERROR") == "0"  # the process's own setting is back


def test_train_digits_end_to_end_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    artifacts = tmp_path / "store"
    outcome = run_outcome("train", ["trainer.max_epochs=3"], tmp_path, artifacts_dir=artifacts)
    assert outcome.metrics["test/acc"] > 0.9  # chance is 0.1
    variant_dir = stored_model(artifacts, "base")
    assert {"model.pt", "meta.json", "config.yaml", "metrics.json"} <= {p.name for p in variant_dir.iterdir()}
    assert resume_checkpoints(artifacts) == []  # resume checkpoints are dropped once the run completes

    cfg = compose("train", ["logger=csv"])
    dm = build("dataset", cfg.dataset, data_dir=str(tmp_path / "data"), seed=0)
    dm.setup()
    store = ModelStore(artifacts, "digits", "smallcnn")
    model = store.load_into(store.aliases()["base"], build("model", cfg.model, info=dm.info), dm.info, OmegaConf.to_container(cfg.model))
    x, y = dm.split_tensors("test")
    accuracy = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert accuracy == pytest.approx(outcome.metrics["test/acc"], abs=1e-6)


def test_wandb_offline_run_directory_is_written(tmp_path: Path) -> None:
    outcome = run_outcome("train", ["trainer.max_epochs=1", "dataset.train_fraction=0.2"], tmp_path, artifacts_dir=tmp_path / "store", logger="wandb")
    runs = list((outcome.output_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))


def test_multirun_jobs_write_separate_artefacts(tmp_path: Path) -> None:
    out = cli(
        "-m", "experiment=train", "optim.lr=1e-3,1e-2", "trainer.max_epochs=1", "dataset.train_fraction=0.2",
        "logger=csv", "trainer.enable_progress_bar=false", f"paths.artifacts_dir={tmp_path / 'store'}", f"paths.output_dir={tmp_path / 'out'}",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    store = ModelStore(tmp_path / "store", "digits", "smallcnn")
    variants = sorted(store.aliases())
    assert len(variants) == 2 and all(v.startswith("base@") for v in variants)
    assert "optim.lr=0.001" in variants[0] and "optim.lr=0.01" in variants[1]
    assert len(set(store.entries())) == 2 and set(store.aliases().values()) == set(store.entries())  # one entry per job, by fingerprint
    weights = [torch.load(stored_model(tmp_path / "store", v) / "model.pt", weights_only=True) for v in variants]
    assert not torch.equal(weights[0]["net.0.weight"], weights[1]["net.0.weight"])


def test_same_seed_same_split_and_initialisation(tmp_path: Path) -> None:
    cfg = compose("train", ["logger=csv"])
    a = build("dataset", cfg.dataset, data_dir=str(tmp_path), seed=3)
    b = build("dataset", cfg.dataset, data_dir=str(tmp_path), seed=3)
    c = build("dataset", cfg.dataset, data_dir=str(tmp_path), seed=4)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.split_tensors("test")[0], b.split_tensors("test")[0])
    assert not torch.equal(a.split_tensors("test")[0], c.split_tensors("test")[0])
    # Stratified: each class keeps its share of the whole set in every split (to one image).
    splits = {s: torch.bincount(a.split_tensors(s)[1], minlength=10) for s in ("train", "val", "test")}
    totals = sum(splits.values())
    for counts in splits.values():
        expected = totals * counts.sum() / totals.sum()
        assert (counts - expected).abs().max() <= 1.0


class TestStore:
    @pytest.fixture()
    def trained(self, tmp_path: Path):
        cfg = compose("train", ["logger=csv"])
        dm = build("dataset", cfg.dataset, data_dir=str(tmp_path), seed=0)
        dm.setup()
        model = build("model", cfg.model, info=dm.info)
        store = ModelStore(tmp_path / "store", "digits", "smallcnn")
        store.save("base", model, dm.info, {"name": "smallcnn"}, {"test/acc": 0.5}, "seed: 0\n")
        return store, model, dm.info, cfg

    def test_round_trip_is_exact(self, trained) -> None:
        store, model, info, cfg = trained
        loaded = store.load_into("base", build("model", cfg.model, info=info), info, {"name": "smallcnn"})
        for (k, v), (_, w) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(v, w), k
        assert store.metrics("base") == {"test/acc": 0.5}

    def test_mismatched_dataset_or_model_is_refused(self, trained) -> None:
        store, model, info, cfg = trained
        from dataclasses import replace

        other = replace(info, name="cifar10", num_classes=10)
        with pytest.raises(StoreError, match="trained on dataset 'digits', not 'cifar10'"):
            store.load_into("base", model, other, {"name": "smallcnn"})
        with pytest.raises(StoreError, match="'smallcnn' model, the config asks for 'resnet18'"):
            store.load_into("base", model, info, {"name": "resnet18"})
        fewer = replace(info, num_classes=5)
        with pytest.raises(StoreError, match="it has 10 classes, the dataset has 5"):
            store.load_into("base", model, fewer, {"name": "smallcnn"})

    def test_truncated_checkpoint_is_reported(self, trained) -> None:
        store, model, info, _ = trained
        path = store.version_dir("base") / "model.pt"
        path.write_bytes(path.read_bytes()[:200])
        with pytest.raises(StoreError, match="truncated or corrupted"):
            store.load_into("base", model, info, {"name": "smallcnn"})

    def test_weights_not_described_by_meta_are_refused(self, trained) -> None:
        store, model, info, _ = trained
        state = torch.load(store.version_dir("base") / "model.pt", weights_only=True)
        state["net.0.bias"] += 1.0  # as if a save had replaced the weights but died before meta.json
        torch.save(state, store.version_dir("base") / "model.pt")
        with pytest.raises(StoreError, match="not the ones its meta.json describes"):
            store.load_into("base", model, info, {"name": "smallcnn"})

    def test_checkpoint_with_pickled_code_is_refused(self, trained, tmp_path: Path) -> None:
        store, model, info, _ = trained
        marker = tmp_path / "pwned"

        class Exploit:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        torch.save({"payload": Exploit()}, store.version_dir("base") / "model.pt")
        with pytest.raises(StoreError, match="refusing to load"):
            store.load_into("base", model, info, {"name": "smallcnn"})
        assert not marker.exists()

    def test_missing_variant_names_the_command(self, tmp_path: Path) -> None:
        from robustness.stages import compose_experiment, variants

        with hydra_initialized():
            cfg = compose_experiment("train", ["logger=csv", "store.train_missing=false", f"paths.artifacts_dir={tmp_path}"])
            with pytest.raises(StoreError, match="python -m robustness experiment=train recipe=digits regularizer=cure dataset=digits model=smallcnn"):
                variants.ensure_trained(variants.resolve(cfg, "cure"), tmp_path)


def test_bad_learning_rate_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="learning rate must be > 0"):
        run_outcome("train", ["optim.lr=0"], tmp_path, artifacts_dir=tmp_path / "store")


def test_a_skipped_non_finite_step_leaves_weights_and_batch_norm_statistics_untouched() -> None:
    import pytorch_lightning as pl

    from robustness.data.digits import DigitsDataModule
    from robustness.models.smallcnn import smallcnn
    from robustness.training.module import ClassifierModule
    from robustness.training.regularizer import Regularizer, StepOutput

    class PoisonedBatches(Regularizer):
        """Plain cross-entropy, except that every batch's loss is NaN after the real forward."""

        def training_loss(self, model, x, y, epoch):
            out = super().training_loss(model, x, y, epoch)
            return StepOutput(out.loss * float("nan"), out.logits, out.logs)

    datamodule = DigitsDataModule(data_dir="unused", batch_size=64, seed=0, train_fraction=0.2)
    datamodule.setup()
    model = smallcnn(datamodule.info, width=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    module = ClassifierModule(model, 10, PoisonedBatches(), max_bad_steps=1000)
    trainer = pl.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=datamodule)
    assert module.skipped_steps == 3
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), f"{key} changed during skipped steps"
