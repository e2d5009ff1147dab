"""The store (issue 13): one identity per model and result, nothing lost, wrong input refused early."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import (
    cli_in_process,
    compose,
    fast_overrides,
    hydra_initialized,
    run_outcome,
    stored_model,
)

from robustness.data.digits import DigitsDataModule
from robustness.errors import ConfigError, StoreError
from robustness.models.smallcnn import smallcnn
from robustness.stages import compose_experiment, run, variants
from robustness.store import ModelStore

INFO = DigitsDataModule.info
QUICK = ["trainer=cpu", "trainer.max_epochs=1", "dataset.train_fraction=0.2", "model.width=8"]
SMALLCNN = {"name": "smallcnn", "width": 8, "activation": "relu", "batch_norm": True}


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "robustness", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return smallcnn(INFO, width=8)


# --------------------------------------------------------------------------------------------
# 1. identity


def test_two_configs_never_share_an_entry_and_the_same_config_is_reused(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    first = run_outcome("train", [*QUICK, "optim.lr=1e-2"], tmp_path / "a", artifacts_dir=store_dir)
    other = run_outcome("train", [*QUICK, "optim.lr=1e-3"], tmp_path / "b", artifacts_dir=store_dir)
    seed1 = run_outcome("train", [*QUICK, "optim.lr=1e-2", "seed=1"], tmp_path / "c", artifacts_dir=store_dir)
    keys = {first.metrics["fingerprint"], other.metrics["fingerprint"], seed1.metrics["fingerprint"]}
    assert len(keys) == 3 and all(len(k) == 64 for k in keys)  # full sha256, never cut short
    store = ModelStore(store_dir, "digits", "smallcnn")
    assert set(store.entries()) == keys
    again = run_outcome("train", [*QUICK, "optim.lr=1e-2"], tmp_path / "d", artifacts_dir=store_dir)
    assert again.metrics == first.metrics  # reused, not retrained
    assert set(store.entries()) == keys


def test_identity_covers_every_option_that_changes_the_weights() -> None:
    base = compose("train", QUICK)
    key = variants.of_training_config(base).key
    for override in ("seed=3", "dataset.train_fraction=0.5", "dataset.batch_size=32", "model.activation=tanh", "optim.gamma=0.9",
                     "optim.weight_decay=0", "trainer.max_epochs=2", "trainer.precision=bf16-mixed", "regularizer=cure"):
        assert variants.of_training_config(compose("train", [*QUICK, override])).key != key, override
    for cosmetic in ("trainer.enable_progress_bar=false", "trainer.log_every_n_steps=3", "dataset.num_workers=1", "dataset.eval_batch_size=7",
                     "logger=csv"):
        assert variants.of_training_config(compose("train", [*QUICK, cosmetic])).key == key, cosmetic


def test_a_fine_tuned_model_changes_identity_with_its_parent() -> None:
    with hydra_initialized():
        probe = compose_experiment("fig2_boundary", QUICK)
        a = variants.resolve(probe, "adversarial", QUICK)
        b = variants.resolve(probe, "adversarial", [*QUICK, "model.activation=tanh"])
    assert a.parent is not None and a.parent.variant == "base"
    assert a.identity["init_from"] == a.parent.key
    assert b.parent.key != a.parent.key and b.key != a.key


def test_a_probe_never_loads_weights_trained_with_other_options(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    run_outcome("train", QUICK, tmp_path, artifacts_dir=store_dir)
    overrides = [*fast_overrides(store_dir), f"paths.data_dir={tmp_path / 'data'}", *QUICK, "store.train_missing=false",
                 "variants=[base]", "probe.resolution=5", "model.activation=tanh"]
    with hydra_initialized():
        cfg = compose_experiment("fig2_boundary", overrides)
        with pytest.raises(StoreError) as err:
            run(cfg, tmp_path / "out", overrides=overrides)
    message = str(err.value)
    assert "model.activation: 'relu' in the store, 'tanh' asked for" in message
    assert "store.train_missing=true" in err.value.hint


def test_a_probe_refuses_images_from_another_split(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    probe = [*QUICK, "variants=[base]", "probe.resolution=5"]
    run_outcome("fig3_regions", probe, tmp_path / "a", artifacts_dir=store_dir)  # trains base for this probe
    store = ModelStore(store_dir, "digits", "smallcnn")
    directory = store.version_dir(store.aliases()["base"])
    meta = json.loads((directory / "meta.json").read_text())
    meta["identity"]["dataset"]["options"]["test_fraction"] = 0.5  # as if trained on another split
    (directory / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"trained on another split .*options\.test_fraction: 0\.5 when trained, 0\.25 for this probe"):
        run_outcome("fig3_regions", probe, tmp_path / "b", artifacts_dir=store_dir)


# --------------------------------------------------------------------------------------------
# 2. nothing lost


def test_an_interrupted_save_leaves_the_old_complete_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import robustness.store as store_module

    store = ModelStore(tmp_path, "digits", "smallcnn")
    old, new = _model(1), _model(2)
    store.save("k", old, INFO, SMALLCNN)
    real = store_module.atomic_write_json

    def killed_at_meta(path, obj):  # SIGTERM arrives between model.pt and meta.json
        if Path(path).name == "meta.json":
            raise KeyboardInterrupt
        return real(path, obj)

    monkeypatch.setattr(store_module, "atomic_write_json", killed_at_meta)
    with pytest.raises(KeyboardInterrupt):
        store.save("k", new, INFO, SMALLCNN)
    monkeypatch.undo()
    loaded = store.load_into("k", smallcnn(INFO, width=8), INFO, SMALLCNN)
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), loaded.state_dict().values()))
    assert len([p for p in store.entry_dir("k").iterdir() if p.name.startswith("v-")]) == 1


def test_files_follow_the_users_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        directory = ModelStore(tmp_path, "digits", "smallcnn").save("k", _model(0), INFO, SMALLCNN)
    finally:
        os.umask(previous)
    for name in ("model.pt", "meta.json", "metrics.json"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o644, name


def test_the_store_lock_is_a_filelock_held_by_one_process(tmp_path: Path) -> None:
    from filelock import FileLock

    store = ModelStore(tmp_path, "digits", "smallcnn")
    with store.lock("k"):
        other = FileLock(str(store.entry_dir("k") / ".lock"))
        code = subprocess.run([sys.executable, "-c", f"from filelock import FileLock, Timeout\ntry:\n FileLock({str(other.lock_file)!r}).acquire(timeout=0.5)\nexcept Timeout:\n raise SystemExit(3)"]).returncode
    assert code == 3  # the other process timed out waiting for the lock


def test_nan_weights_are_refused_at_save_and_at_load(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, "digits", "smallcnn")
    bad = _model(0)
    with torch.no_grad():
        bad.net[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(StoreError, match=r"NaN or infinite value\(s\) in 'net.0.weight'"):
        store.save("k", bad, INFO, SMALLCNN)
    directory = store.save("k", _model(0), INFO, SMALLCNN)
    state = torch.load(directory / "model.pt", weights_only=True)
    state["net.0.bias"][0] = float("inf")
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (directory / "model.pt").write_bytes(buffer.getvalue())
    meta = json.loads((directory / "meta.json").read_text())
    from robustness import fingerprint

    meta["weights_sha256"] = fingerprint.of_bytes(buffer.getvalue())
    (directory / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="NaN or infinite"):
        store.load_into("k", smallcnn(INFO, width=8), INFO, SMALLCNN)


def test_a_shape_mismatch_names_the_first_key_and_both_shapes(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, "digits", "smallcnn")
    store.save("k", _model(0), INFO, SMALLCNN)
    with pytest.raises(StoreError, match=r"'net.0.weight' has shape \(8, 1, 3, 3\) in the file and \(16, 1, 3, 3\) in the model"):
        store.load_into("k", smallcnn(INFO, width=16), INFO, SMALLCNN)


def test_meta_json_of_the_wrong_shape_is_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, "digits", "smallcnn")
    directory = store.save("k", _model(0), INFO, SMALLCNN)
    for bad in ([1, 2], {"format": 2, "variant": "base"}, {**json.loads((directory / "meta.json").read_text()), "dataset": "digits"}):
        (directory / "meta.json").write_text(json.dumps(bad))
        with pytest.raises(StoreError, match="not a model description this project wrote"):
            store.load_into("k", smallcnn(INFO, width=8), INFO, SMALLCNN)


def test_a_damaged_cached_probe_result_is_recomputed_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    store_dir = tmp_path / "store"
    overrides = [*QUICK, "variants=[base]", "probe.resolution=5"]
    first = run_outcome("fig3_regions", overrides, tmp_path / "a", artifacts_dir=store_dir)
    (cached,) = list(store_dir.glob("digits/smallcnn/probes/random_plane-*/result/result.json"))
    for damage in ("{\"probe\": \"random_plane\", \"tab", json.dumps({"probe": "random_plane"})):
        cached.write_text(damage)
        with caplog.at_level(logging.WARNING, logger="robustness"):
            again = run_outcome("fig3_regions", overrides, tmp_path / "b", artifacts_dir=store_dir)
        assert f"the cached result {cached.parent} cannot be used" in caplog.text
        assert [a.rows for a in again.artefacts if a.kind == "table"] == [a.rows for a in first.artefacts if a.kind == "table"]
        caplog.clear()


def test_a_kept_probe_result_is_reused_without_loading_any_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-running a report whose results are kept loads no model (a Tiny-ImageNet report loaded
    ResNet-18 weights four times per section only to find each result kept)."""
    from robustness.store import ModelStore

    store_dir = tmp_path / "store"
    overrides = [*QUICK, "variants=[base]", "probe.resolution=5"]
    first = run_outcome("fig3_regions", overrides, tmp_path / "a", artifacts_dir=store_dir)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a kept result needs no weights")

    monkeypatch.setattr(ModelStore, "load_into", refuse)
    again = run_outcome("fig3_regions", overrides, tmp_path / "b", artifacts_dir=store_dir)
    assert [a.rows for a in again.artefacts if a.kind == "table"] == [a.rows for a in first.artefacts if a.kind == "table"]
    with pytest.raises(AssertionError, match="needs no weights"):  # another option: a result to compute, from the weights
        run_outcome("fig3_regions", [*overrides, "probe.resolution=7"], tmp_path / "c", artifacts_dir=store_dir)


def test_probes_run_on_a_read_only_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    import robustness.stages.probe as probe_stage

    store_dir = tmp_path / "store"
    overrides = [*QUICK, "variants=[base]", "probe.resolution=5"]
    run_outcome("train", [*QUICK, "trainer.max_epochs=3"], tmp_path, artifacts_dir=store_dir)  # as the probe would train it
    real = probe_stage.writable_problem
    monkeypatch.setattr(probe_stage, "writable_problem", lambda d: "read-only file system" if str(d).startswith(str(store_dir)) else real(d))
    with caplog.at_level(logging.WARNING, logger="robustness"):
        outcome = run_outcome("fig3_regions", [*overrides, "store.train_missing=false"], tmp_path / "ro", artifacts_dir=store_dir)
    assert "is not writable: caching this probe's results in" in caplog.text
    assert list((outcome.output_dir / "probe-cache").glob("random_plane-*/result/result.json"))
    assert not (store_dir / "digits" / "smallcnn" / "probes").exists()


# --------------------------------------------------------------------------------------------
# 3. refuse what is wrong before doing work


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=-1", "seed must be in [0, 4294967295], got -1"),
        ("optim.momentum=-1", "optim.momentum must lie in [0, 1), got -1"),
        ("trainer.max_epochs=0", "trainer.max_epochs must be >= 1, got 0"),
        pytest.param("trainer=gpu", "trainer=gpu asks for a GPU, and this machine has none",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")),
        ("optim.lr=inf", "optim.lr must be a finite number, got inf"),
    ],
)
def test_bad_training_values_are_refused_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                                     override: str, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    code, stderr = cli_in_process(["experiment=train", override, "logger=csv", f"paths.artifacts_dir={tmp_path / 'store'}",
                                   f"paths.output_dir={tmp_path / 'out'}"], capsys, monkeypatch)
    assert code == 2, stderr[-2000:]
    assert stderr.startswith(f"error: {message}"), stderr[-2000:]
    assert "fix: " in stderr and "Traceback" not in stderr
    assert stderr.count("error: ") == 1
    assert not (tmp_path / "store" / "digits").exists()  # nothing was trained


@pytest.mark.parametrize(
    ("experiment", "override", "message"),
    [
        ("robust_accuracy", "probe.eps=[0.0,inf]", "probe.eps.1 must be a finite number, got inf"),
        ("fig2_boundary", "probe.extent=inf", "probe.extent must be a finite number, got inf"),
        ("fig2_boundary", "probe.resolution=300", "probe.resolution of boundary_plane must be odd"),
    ],
)
def test_bad_probe_values_are_refused_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                                  experiment: str, override: str, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    code, stderr = cli_in_process([f"experiment={experiment}", override, "logger=csv", f"paths.artifacts_dir={tmp_path / 'store'}",
                                   f"paths.output_dir={tmp_path / 'out'}"], capsys, monkeypatch)
    assert code == 2, stderr[-2000:]
    assert stderr.startswith(f"error: {message}"), stderr[-2000:]
    assert not (tmp_path / "store" / "digits").exists()  # refused before any variant was trained


def test_an_unwritable_store_is_refused_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for place in (blocker, Path("/proc/robustness-store")):
        code, stderr = cli_in_process(["experiment=train", "logger=csv", f"paths.artifacts_dir={place}", f"paths.output_dir={tmp_path / 'out'}"],
                                      capsys, monkeypatch)
        assert code == 2, stderr[-2000:]
        assert stderr.startswith("error: cannot write to the model store"), stderr[-2000:]
        assert "fix: choose a writable store with paths.artifacts_dir=" in stderr


def test_a_submitit_launcher_without_its_package_is_a_clear_error(tmp_path: Path) -> None:
    script = (
        "import sys\nsys.modules['hydra_plugins.hydra_submitit_launcher'] = None\n"
        "sys.argv = ['robustness', '-m', 'hydra/launcher=submitit_local', 'experiment=train']\n"
        "from robustness.cli import main\nmain()\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("error: hydra/launcher=submitit_local needs the hydra-submitit-launcher package")
    assert 'pip install -e ".[cluster]"' in out.stderr


def test_stored_metadata_keeps_identity_and_source(tmp_path: Path) -> None:
    outcome = run_outcome("train", QUICK, tmp_path, artifacts_dir=tmp_path / "store")
    meta = json.loads((stored_model(tmp_path / "store", "base") / "meta.json").read_text())
    assert meta["fingerprint"] == outcome.metrics["fingerprint"]
    assert meta["identity"]["optim"]["lr"] == 1e-2 and meta["identity"]["seed"] == 0
    assert replace(INFO).name == meta["dataset"]["name"]


def test_a_published_model_is_probed_not_trained(tmp_path: Path) -> None:
    overrides = [*fast_overrides(tmp_path / "store"), "model=torchvision"]
    with hydra_initialized():
        cfg = compose_experiment("train", overrides)
        with pytest.raises(ConfigError, match="model=torchvision is a published model: it is probed, not trained"):
            run(cfg, tmp_path / "out", overrides=overrides)


@pytest.fixture(scope="module")
def layout_data(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """One data folder per dataset for this module's tests, each written once in its real layout."""
    from robustness.data import layouts

    written: dict[str, Path] = {}

    def data_dir(recipe: str) -> Path:
        if recipe not in written:
            written[recipe] = tmp_path_factory.mktemp(f"data-{recipe}")
            getattr(layouts, f"write_{recipe}")(written[recipe], per_class=1)
        return written[recipe]

    return data_dir


@pytest.mark.parametrize(("report", "recipe", "variant"), [
    ("report_cifar10", "cifar10", "adversarial"), ("report_cifar10", "cifar10", "cure"),
    ("report_tinyimagenet", "tinyimagenet", "adversarial"), ("report_tinyimagenet", "tinyimagenet", "pgd"),
    ("report_fashion_mnist", "fashion_mnist", "pgd"), ("report_fashion_mnist", "fashion_mnist", "cure"),
])
def test_a_training_command_trains_the_model_its_report_loads(report: str, recipe: str, variant: str, tmp_path: Path,
                                                              layout_data: Callable[[str], Path]) -> None:
    """Run on its own, a fine-tuning variant starts from its own recipe's base, not the digits one."""
    common = ["logger=csv", f"paths.artifacts_dir={tmp_path}", f"paths.data_dir={layout_data(recipe)}"]  # a fingerprint names the data's content
    with hydra_initialized():
        own = [f"recipe={recipe}", *common]
        direct = variants.resolve(compose_experiment("train", own), variant, own, own_overrides=own)
        extra = [*compose_experiment(report, common).report.overrides, *common]
        from_report = variants.resolve(compose_experiment("fig2_boundary", extra), variant, extra)
    assert direct.key == from_report.key, variants.fingerprint.identity_differences(direct.identity, from_report.identity)
