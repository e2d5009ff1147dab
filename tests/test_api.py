"""The Python API: the store in one call, the data in one call, every public name documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import robustness
from robustness.data.colour_digits import ColourDigitsDataModule
from robustness.data.digits import DigitsDataModule, load_digit_splits
from robustness.errors import ConfigError, StoreError
from robustness.models.smallcnn import smallcnn
from robustness.store import ModelStore

REPO = Path(__file__).resolve().parents[1]
SMALLCNN = {"name": "smallcnn", "width": 4, "activation": "relu", "batch_norm": True}


def stored(root: Path, alias: str, seed: int, model_cfg: dict = SMALLCNN, accuracy: float = 0.5, info=DigitsDataModule.info) -> dict[str, torch.Tensor]:
    """Save a randomly initialised model under ``alias``, as a training run would; its weights."""
    torch.manual_seed(seed)
    options = {k: v for k, v in model_cfg.items() if k != "name"}
    network = smallcnn(info, **options)
    with torch.no_grad():  # batch-norm statistics that are not the defaults, so a load that skipped buffers shows
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    store = ModelStore(root, info.name, model_cfg["name"])
    key = f"{seed:064d}"
    store.save(key, network, info, model_cfg, {"test/acc": accuracy}, variant=alias.split("@")[0])
    store.set_alias(alias, key)
    return network.state_dict()


def test_load_model_returns_the_stored_weights_in_eval_mode(tmp_path: Path) -> None:
    weights = stored(tmp_path, "base", 1)
    stored(tmp_path, "cure@regularizer.lam=8", 2)
    model = robustness.load_model("base", dataset="digits", store=tmp_path)
    assert not model.training
    state = model.state_dict()
    assert state.keys() == weights.keys() and all(torch.equal(state[k], weights[k]) for k in weights)
    other = robustness.load_model("cure@regularizer.lam=8", dataset="digits", model="smallcnn", store=str(tmp_path))
    assert not torch.equal(other.state_dict()["net.0.weight"], state["net.0.weight"])
    x, _ = robustness.load_data("digits", n=3)
    assert model(x).shape == (3, 10)


def test_load_model_refuses_what_it_cannot_decide_and_names_the_choices(tmp_path: Path) -> None:
    stored(tmp_path, "base", 1)
    with pytest.raises(StoreError, match=r"no variant 'bse' for digits\n  fix: stored variants: base"):
        robustness.load_model("bse", dataset="digits", store=tmp_path)
    with pytest.raises(StoreError, match=r"holds no models for dataset 'cifar10' \(it has: digits\)"):
        robustness.load_model("base", dataset="cifar10", store=tmp_path)
    with pytest.raises(StoreError, match="is empty or missing"):
        robustness.load_model("base", dataset="digits", store=tmp_path / "nowhere")
    # The same alias under two model folders: which one is for the caller to say.
    torch.manual_seed(0)
    info = DigitsDataModule.info
    second = ModelStore(tmp_path, "digits", "wide")
    second.save("9" * 64, smallcnn(info, width=8), info, {**SMALLCNN, "width": 8}, {"test/acc": 0.9}, variant="base")
    second.set_alias("base", "9" * 64)
    with pytest.raises(ConfigError, match=r"stored for several models: smallcnn, wide\n  fix: pick one with model='smallcnn'"):
        robustness.load_model("base", dataset="digits", store=tmp_path)
    assert robustness.load_model("base", dataset="digits", model="wide", store=tmp_path).state_dict()["net.0.weight"].shape[0] == 8


def test_list_variants_lists_every_alias_with_its_accuracy_and_date(tmp_path: Path) -> None:
    stored(tmp_path, "base", 1, accuracy=0.91)
    stored(tmp_path, "cure@regularizer.lam=8", 2, accuracy=0.87)
    colour = ColourDigitsDataModule.info
    stored(tmp_path, "base", 3, {**SMALLCNN}, accuracy=0.8, info=colour)
    variants = robustness.list_variants(tmp_path)
    rows = [(v.dataset, v.model, v.alias, v.fingerprint, v.clean_accuracy) for v in variants]
    assert rows == [
        ("colour_digits", "smallcnn", "base", f"{3:064d}", 0.8),
        ("digits", "smallcnn", "base", f"{1:064d}", 0.91),
        ("digits", "smallcnn", "cure@regularizer.lam=8", f"{2:064d}", 0.87),
    ]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", v.date) for v in variants)
    text = str(variants).splitlines()
    assert text[0].split() == ["alias", "fingerprint", "dataset", "model", "clean_accuracy", "date"] and len(text) == 4
    assert robustness.list_variants(tmp_path / "empty") == []


def test_load_data_gives_the_splits_the_models_were_trained_on() -> None:
    x, y = robustness.load_data("digits")
    expected_x, expected_y = load_digit_splits(0)["test"]
    assert torch.equal(x, expected_x) and torch.equal(y, expected_y)
    x, y = robustness.load_data("digits", split="train", n=5, seed=1)
    assert torch.equal(x, load_digit_splits(1)["train"][0][:5]) and len(y) == 5
    x, _ = robustness.load_data("colour_digits", n=2)
    assert x.shape == (2, 3, 8, 8) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    with pytest.raises(ConfigError, match="unknown dataset 'digit'"):
        robustness.load_data("digit")
    with pytest.raises(ConfigError, match="split must be train, val or test"):
        robustness.load_data("digits", split="tset")
    with pytest.raises(ConfigError, match="n must be a positive integer"):
        robustness.load_data("digits", n=0)
    with pytest.raises(ConfigError, match="unknown option"):
        robustness.load_data("digits", val_fractoin=0.2)


def test_every_public_name_is_documented_with_its_signature_and_an_example() -> None:
    text = (REPO / "docs" / "API.md").read_text()
    for name in robustness.__all__:
        if name == "__version__":
            continue
        assert f"### `robustness.{name}" in text, f"docs/API.md has no section for robustness.{name}"
        assert getattr(robustness, name) is getattr(robustness.api, name)
    documented = set(re.findall(r"### `robustness\.(\w+)", text))
    assert documented == set(robustness.__all__) - {"__version__"}, "docs/API.md documents names the package does not export"
    # The package lists the API's names itself (they load lazily); the two lists are one list.
    assert sorted(robustness.__all__) == sorted(["__version__", *robustness.api.__all__])


# ---------------------------------------------------------------- run() and report()


def test_run_raises_what_the_command_line_prints(tmp_path: Path) -> None:
    import subprocess
    import sys

    with pytest.raises(ConfigError, match="the learning rate must be > 0, got 0") as caught:
        robustness.run("experiment=train", "optim.lr=0", f"paths.artifacts_dir={tmp_path / 'store'}", output_dir=tmp_path / "out")
    cli = subprocess.run([sys.executable, "-m", "robustness", "experiment=train", "optim.lr=0", f"paths.artifacts_dir={tmp_path / 'store'}",
                          f"paths.output_dir={tmp_path / 'cli'}"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert cli.returncode == 2 and f"error: {caught.value}" in cli.stderr  # the same message, and its fix line
    # What Hydra cannot compose: the command line's error and fix (tests/stages/test_framework.py), raised.
    with pytest.raises(ConfigError, match="there is no experiment 'table99'\n  fix: one variant trains with experiment=train "):
        robustness.run("experiment=table99")
    with pytest.raises(ConfigError, match=r"optim.learning_rate is not a setting of this run\n  fix: .*\+optim.learning_rate=\.\.\."):
        robustness.run("experiment=train", "optim.learning_rate=3")
    with pytest.raises(ConfigError, match="overrides only, not command-line flags: -m"):
        robustness.run("-m", "experiment=train", "seed=0,1")


@pytest.mark.slow
def test_run_trains_into_the_store_and_probes_with_the_same_numbers_as_the_function(tmp_path: Path) -> None:
    store = tmp_path / "store"
    common = [f"paths.artifacts_dir={store}", "logger=none", "trainer.enable_progress_bar=false"]
    from robustness import tracking

    root = tracking._RUN_ROOT
    trained = robustness.run("experiment=train", "regularizer=none", "trainer.max_epochs=2", *common, output_dir=tmp_path / "train")
    assert trained.task == "train" and trained.output_dir == tmp_path / "train"
    assert tracking._RUN_ROOT == root  # later W&B runs of this process go where their own runs say
    (listed,) = robustness.list_variants(store)
    assert listed.alias == "base" and listed.clean_accuracy == pytest.approx(trained.metrics["test/acc"]) and listed.fingerprint == trained.metrics["fingerprint"]

    options = {"resolution": 11, "stats_resolution": 9, "num_images": 4}
    probed = robustness.run("experiment=fig3_regions", "variants=[base]", "store.train_missing=false", "store.train_overrides=['trainer.max_epochs=2']",
                            *(f"probe.{k}={v}" for k, v in options.items()), *common, output_dir=tmp_path / "probe")
    staged = probed.results["random_plane"]
    model = robustness.load_model("base", dataset="digits", store=store)
    x, y = robustness.load_data("digits", n=4)
    called = robustness.random_plane({"base": model}, x, y, class_names=[str(i) for i in range(10)], dataset="digits", **options)
    assert called.tables == staged.tables
    assert called.arrays.keys() == staged.arrays.keys() and all(torch.equal(called.arrays[k], staged.arrays[k]) for k in called.arrays)


def fitted_digits_models() -> dict[str, torch.nn.Module]:
    from robustness.testing import train_digits_smallcnn

    return {"base": train_digits_smallcnn(width=8, epochs=2, seed=0)[0], "cure": train_digits_smallcnn(width=8, epochs=2, seed=1)[0]}


@pytest.mark.slow
def test_report_runs_the_seed_sections_on_given_models_without_a_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    models = fitted_digits_models()
    x, y = robustness.load_data("digits", n=40)
    sections = ["fig3_regions", "table1_curvature", "fig9_perceptual"]
    out = robustness.report(models, (x, y), "out", sections=sections, overrides=["probe.num_images=5"], dataset="digits")
    assert out.task == "report" and out.output_dir == tmp_path / "out"
    text = (tmp_path / "out" / "report.md").read_text()
    headings = re.findall(r"^## (.*)$", text, re.MULTILINE)
    assert [h.split(" - ")[0] for h in headings] == ["Scorecard", "Figure 3", "Table 1", "Figure 9", "Appendix: methods"]
    assert "Not run: the perceptual probe recolours images" in text  # grey digits: the section says why
    assert (tmp_path / "out" / "report.html").is_file() and not (tmp_path / "artifacts").exists()  # no store touched
    # Each section measured the given models its experiment names: fig3 names base (not cure), table1 both.
    regions, table = out.results["random_plane"], out.results["table1"]
    assert regions.meta["variants"] == ["base"] and table.meta["variants"] == ["base", "cure"]
    # The same numbers as the probe function with the experiment's settings (fig3_regions: the YAML's).
    direct = robustness.random_plane({"base": models["base"]}, x, y, num_images=5, class_names=[str(i) for i in range(10)], dataset="digits")
    assert direct.tables == regions.tables
    # A second report reuses the cached results: the same tables, nothing recomputed.
    calls: list[int] = []
    import robustness.probes.table1 as table1_module

    monkeypatch.setattr(table1_module, "measure_hessian_norm", lambda *a, **k: calls.append(1))
    again = robustness.report(models, (x, y), "out", sections=["table1_curvature"], overrides=["probe.num_images=5"], dataset="digits")
    assert calls == [] and again.results["table1"].tables == table.tables


def test_report_refuses_bad_input_before_any_work(tmp_path: Path) -> None:
    models = {"base": smallcnn(DigitsDataModule.info, width=4).eval()}
    x, y = robustness.load_data("digits", n=4)
    with pytest.raises(robustness.errors.InputError, match="data must be a pair"):
        robustness.report(models, x, tmp_path)
    with pytest.raises(ConfigError, match=r"unknown report section\(s\) \['fig99'\]\n  fix: choose among: training_shift, fig2_boundary"):
        robustness.report(models, (x, y), tmp_path, sections=["fig99"])
    with pytest.raises(robustness.errors.InputError, match="3 class names for models with 10 classes"):
        robustness.report(models, (x, y), tmp_path, class_names=["a", "b", "c"])
    with pytest.raises(robustness.errors.InputError, match="training mode"):
        robustness.report({"base": smallcnn(DigitsDataModule.info, width=4)}, (x, y), tmp_path)
    assert not list(tmp_path.iterdir())
