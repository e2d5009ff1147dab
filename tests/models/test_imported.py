"""model=import: a researcher's own architecture, named by ``module:callable``.

The networks below are defined in this file, as a researcher's would be in theirs; the command-line
tests import them by name (``test_imported:TinyNet``) with this folder on PYTHONPATH. Outputs are
compared with the same network built by hand, normalisation written out in the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from robustness.data.cifar import CIFAR10DataModule
from robustness.data.digits import DigitsDataModule
from robustness.errors import ConfigError, StoreError
from robustness.models import identity_of, imported, zoo
from robustness.stages import variants
from robustness.registry import build

DIGITS = DigitsDataModule.info
CIFAR = CIFAR10DataModule.info
HERE = Path(__file__).resolve().parent
TARGET = f"{Path(__file__).stem}:TinyNet"


class TinyNet(nn.Module):
    """A researcher's own small CNN: it asks for the class count and the channels by name."""

    def __init__(self, num_classes: int, in_channels: int, width: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def open_ended(**options: object) -> nn.Module:
    """Takes anything: gets neither num_classes nor in_channels, only what kwargs says."""
    return nn.Sequential(nn.Flatten(), nn.Linear(int(options.get("pixels", 64)), int(options.get("classes", 10))))


def not_a_module(num_classes: int) -> str:
    return f"a string for {num_classes} classes"


def fails_inside(num_classes: int) -> nn.Module:
    raise RuntimeError("the constructor itself is broken")


class Holder:
    """A factory reached through a class: ``module:Holder.make``."""

    @staticmethod
    def make(num_classes: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))


def _node(**options: object) -> dict:
    return {"name": "import", "target": TARGET, "kwargs": {"width": 4}, **options}


def _by_hand(net: nn.Module, info=DIGITS):
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return lambda x: net((x - mean) / std)


# --------------------------------------------------------------------------- in process


def test_the_callable_gets_the_dataset_facts_it_names_and_kwargs_win() -> None:
    assert imported.call_arguments(TinyNet, {"width": 8}, DIGITS) == {"num_classes": 10, "in_channels": 1, "width": 8}
    assert imported.call_arguments(TinyNet, {"num_classes": 3}, CIFAR) == {"num_classes": 3, "in_channels": 3}
    assert imported.call_arguments(open_ended, {"pixels": 64}, DIGITS) == {"pixels": 64}  # a catch-all gets neither
    assert imported.resolve_target(f"{Path(__file__).stem}:Holder.make") is Holder.make
    assert imported.parse_target("a.b.c:D.e") == ("a.b.c", ["D", "e"])


def test_the_model_is_the_network_behind_the_datasets_normalisation(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = build("model", _node(), info=DIGITS).eval()
    assert isinstance(model.net, TinyNet) and model.net.head.out_features == 10 and model.net.features[0].in_channels == 1
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _by_hand(model.net)(x), rtol=0, atol=0)
        other = build("model", _node(mean=[0.0], std=[1.0]), info=DIGITS).eval()
        other.net.load_state_dict(model.net.state_dict())
        torch.testing.assert_close(other(x), model.net(x), rtol=0, atol=0)  # a network that takes [0, 1] pixels as they are


def test_weights_load_from_a_plain_or_wrapped_state_dict_and_the_digest_is_of_the_bytes_loaded(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = TinyNet(10, 1, width=4).eval()
    net.features[1].running_mean.uniform_(-0.2, 0.2)  # a file without the statistics could not pass for this one
    torch.save(net.state_dict(), tmp_path / "plain.pt")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "wrapped.pt")
    x = torch.rand(4, 1, 8, 8)
    for name in ("plain.pt", "wrapped.pt"):
        model = build("model", _node(weights=name, models_dir=str(tmp_path)), info=DIGITS).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), _by_hand(net)(x), rtol=0, atol=0)
        assert model.loaded_weights == {"weights": str(tmp_path / name), "weights_sha256": hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()}

    node = _node(weights="plain.pt", models_dir=str(tmp_path))
    model = build("model", node, info=DIGITS)
    loaded = hashlib.sha256((tmp_path / "plain.pt").read_bytes()).hexdigest()
    assert identity_of(node) == {"weights_sha256": loaded}
    source = zoo.external_source(node, DIGITS, model)
    assert source["kind"] == "import" and source["target"] == TARGET and source["kwargs"] == {"width": 4}
    assert source["weights_sha256"] == loaded and source["mean"] == list(DIGITS.mean)
    # the file is replaced after loading: the record keeps the digest of what was loaded, the identity follows the file
    torch.save(TinyNet(10, 1, width=4).state_dict(), tmp_path / "plain.pt")
    assert zoo.external_source(node, DIGITS, model)["weights_sha256"] == loaded
    assert identity_of(node)["weights_sha256"] == hashlib.sha256((tmp_path / "plain.pt").read_bytes()).hexdigest() != loaded
    assert identity_of({"name": "smallcnn", "width": 8}) == {}


def test_a_published_variant_of_model_import_resolves_and_needs_its_weights(tmp_path: Path) -> None:
    cfg = {"model": {"name": "smallcnn"}, "paths": {"models_dir": str(tmp_path)},
           "external_variants": {"mine": {"name": "import", "target": TARGET, "weights": "w.pt"}}}
    assert variants.external_variant(cfg, "mine") == {"name": "import", "target": TARGET, "weights": "w.pt", "models_dir": str(tmp_path)}
    assert not zoo.is_external({"name": "import"})  # trained like our own models, not "probed, not trained"
    with pytest.raises(ConfigError, match="needs its weights file"):
        zoo.external_source({"name": "import", "target": TARGET}, DIGITS)


@pytest.mark.parametrize(
    "node, error, expected",
    [
        ({"target": "no_such_package.nets:Net"}, ConfigError, "no module named 'no_such_package' can be imported"),
        ({"target": f"{Path(__file__).stem}:TinyNett"}, ConfigError, f"'{Path(__file__).stem}' has no attribute 'TinyNett'"),
        ({"target": "test_imported.TinyNet"}, ConfigError, "is not of the form package.module:callable"),
        ({"target": None}, ConfigError, "model=import needs model.target"),
        ({"target": f"{Path(__file__).stem}:not_a_module", "kwargs": {}}, ConfigError, "returned a builtins.str, not a torch.nn.Module"),
        ({"target": f"{Path(__file__).stem}:fails_inside", "kwargs": {}}, ConfigError, "raised RuntimeError: the constructor itself is broken"),
        ({"kwargs": {"depth": 3}}, ConfigError, "cannot be called with (num_classes=10, in_channels=1, depth=3)"),
        ({"kwargs": {"num_classes": 3}}, ConfigError, "has 3 classes, the dataset digits has 10"),
    ],
)
def test_bad_targets_are_config_errors_naming_what_is_wrong(node: dict, error: type, expected: str) -> None:
    with pytest.raises(error) as err:
        build("model", {**_node(), **node}, info=DIGITS)
    assert expected in err.value.message, err.value.message
    assert err.value.hint


def test_a_misspelt_attribute_suggests_the_close_name() -> None:
    with pytest.raises(ConfigError) as err:
        imported.resolve_target(f"{Path(__file__).stem}:TinyNett")
    assert f"{Path(__file__).stem}:TinyNet" in err.value.hint


def test_weights_that_do_not_fit_or_hold_nan_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    torch.save(TinyNet(10, 1, width=6).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(ConfigError) as err:
        build("model", _node(weights="wide.pt", models_dir=str(tmp_path)), info=DIGITS)
    assert "'features.0.weight' has shape (6, 1, 3, 3) in the file and (4, 1, 3, 3) in the model" in err.value.message
    state = TinyNet(10, 1, width=4).state_dict()
    state["head.bias"][2] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(StoreError, match=r"hold 1 NaN or infinite value\(s\) in 'head.bias'"):
        build("model", _node(weights="nan.pt", models_dir=str(tmp_path)), info=DIGITS)
    with pytest.raises(StoreError, match="does not exist"):
        build("model", _node(weights="absent.pt", models_dir=str(tmp_path)), info=DIGITS)


# --------------------------------------------------------------------------- through the command line


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0", "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "robustness", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


QUICK = ["experiment=train", "model=import", "trainer=cpu", "trainer.max_epochs=1", "dataset.train_fraction=0.2", "logger=csv",
         "trainer.enable_progress_bar=false"]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.target=no_such_package.nets:Net"], "error: model.target 'no_such_package.nets:Net': no module named 'no_such_package' can be imported"),
        ([f"model.target={Path(__file__).stem}:TinyNett"], f"error: model.target '{Path(__file__).stem}:TinyNett': '{Path(__file__).stem}' has no attribute 'TinyNett'"),
        (["model.target=test_imported.TinyNet"], "error: model.target 'test_imported.TinyNet' is not of the form package.module:callable"),
        ([f"model.target={Path(__file__).stem}:not_a_module"], f"error: model.target '{Path(__file__).stem}:not_a_module' returned a builtins.str, not a torch.nn.Module"),
        ([f"model.target={TARGET}", "model.weights=wide.pt"], "'features.0.weight' has shape (6, 1, 3, 3) in the file and (4, 1, 3, 3) in the model"),
    ],
    ids=["module missing", "attribute missing", "malformed", "not a module", "weights do not fit"],
)
def test_the_cli_refuses_a_bad_import_before_any_training(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                                          overrides: list[str], expected: str) -> None:
    from helpers import cli_in_process

    torch.save(TinyNet(10, 1, width=6).state_dict(), tmp_path / "wide.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(HERE))  # as the user's PYTHONPATH would name their package
    code, stderr = cli_in_process([*QUICK, *overrides, f"paths.models_dir={tmp_path}", f"paths.artifacts_dir={tmp_path / 'store'}",
                                   f"paths.output_dir={tmp_path / 'out'}"], capsys, monkeypatch)
    assert code == 2, stderr[-3000:]
    assert expected in stderr and "fix: " in stderr, stderr[-3000:]
    assert "Traceback" not in stderr
    assert not list((tmp_path / "store").rglob("model.pt")) and not list((tmp_path / "store").rglob("last.ckpt"))


def test_the_cli_trains_an_imported_class_and_stores_its_target_and_kwargs(tmp_path: Path) -> None:
    completed = _cli([*QUICK, f"model.target={TARGET}", "model.kwargs={width:6}", f"paths.artifacts_dir={tmp_path / 'store'}",
                      f"paths.output_dir={tmp_path / 'out'}"], tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (meta_path,) = (tmp_path / "store" / "digits" / "import").glob("entries/*/v-*/meta.json")
    meta = json.loads(meta_path.read_text())
    assert meta["model"]["target"] == TARGET and meta["model"]["kwargs"] == {"width": 6}
    state = torch.load(meta_path.parent / "model.pt", weights_only=True)
    assert state["net.features.0.weight"].shape == (6, 1, 3, 3) and state["net.head.weight"].shape == (10, 6)


def test_published_weights_holding_nan_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    """Issue 32: '+external_variants.tv={name:torchvision,arch:resnet18,weights:nan.pt}' with
    experiment=robust_accuracy computed a table from a model with a NaN weight."""
    import torchvision

    state = torchvision.models.resnet18(num_classes=10).state_dict()
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    completed = _cli(["experiment=robust_accuracy", "dataset=colour_digits", "variants=[tv]", "trainer=cpu", "logger=csv",
                      "'+external_variants.tv={name:torchvision,arch:resnet18,weights:nan.pt}'".strip("'"),
                      f"paths.models_dir={tmp_path}", f"paths.artifacts_dir={tmp_path / 'store'}", f"paths.output_dir={tmp_path / 'out'}"], tmp_path)
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "hold 1 NaN or infinite value(s) in 'layer2.0.conv1.weight'" in completed.stderr and "fix: " in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not list((tmp_path / "out").rglob("*.csv"))  # no table was written


def _imagefolder(tmp_path: Path) -> Path:
    from robustness.data import layouts

    return layouts.write_imagefolder(tmp_path / "data", per_class=6, seed=0, test_per_class=3, class_names=("ant", "bee", "cow", "doe"), size=16)


def test_a_published_import_variant_is_probed_as_it_is_and_recorded_with_its_digest(tmp_path: Path) -> None:
    root = _imagefolder(tmp_path)
    torch.manual_seed(5)
    torch.save(TinyNet(4, 3, width=8).state_dict(), tmp_path / "mine.pt")
    completed = _cli(["experiment=robust_accuracy", "dataset=imagefolder", f"dataset.root={root}", "variants=[mine]", "trainer=cpu", "logger=csv",
                      "debug=rehearsal", f"+external_variants.mine={{name:import,target:{TARGET},kwargs:{{width:8}},weights:mine.pt}}",
                      f"paths.models_dir={tmp_path}", f"paths.artifacts_dir={tmp_path / 'store'}", f"paths.output_dir={tmp_path / 'out'}",
                      f"paths.data_dir={tmp_path / 'cache'}"], tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (table,) = (tmp_path / "out").rglob("robust_accuracy.csv")
    assert "mine" in table.read_text()
    (record,) = (tmp_path / "store" / "imagefolder").rglob("external.json")
    source = json.loads(record.read_text())["source"]
    assert source["kind"] == "import" and source["target"] == TARGET and source["kwargs"] == {"width": 8}
    assert source["weights_sha256"] == hashlib.sha256((tmp_path / "mine.pt").read_bytes()).hexdigest()
    assert not list((tmp_path / "store").rglob("model.pt"))  # nothing was trained


@pytest.mark.slow
def test_the_whole_reduced_report_on_generated_pngs_with_a_class_from_this_file(tmp_path: Path) -> None:
    """Issue 28's acceptance: `python -m robustness experiment=report dataset=imagefolder dataset.root=DIR
    model=import model.target=...` trains every variant of the generic recipe from the class above
    and writes the whole report (reduced by debug=rehearsal) on PNG class folders."""
    from omegaconf import OmegaConf

    root = _imagefolder(tmp_path)
    completed = _cli(["experiment=report", "dataset=imagefolder", f"dataset.root={root}", "model=import", f"model.target={TARGET}",
                      "model.kwargs={width:8}", "debug=rehearsal", "trainer=cpu", "logger=csv", f"paths.artifacts_dir={tmp_path / 'store'}",
                      f"paths.output_dir={tmp_path / 'out'}", f"paths.data_dir={tmp_path / 'cache'}"], tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = min((tmp_path / "out").rglob("report.md"), key=lambda path: len(path.parts))  # fig4_cure is a report of its own inside
    assert (report.parent / "report.html").is_file()
    text = report.read_text()
    sections = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "report" / "seed.yaml").sections
    headings = {line[3:] for line in text.splitlines() if line.startswith("## ")}
    assert {section.title for section in sections.values()} <= headings, headings
    assert "Scorecard" in text and "recipe=generic" in text and f"model.target={TARGET}" in text

    # every variant was trained from the imported class on the folder's images, and stored as such
    store = tmp_path / "store" / "imagefolder" / "import"
    aliases = json.loads((store / "aliases.json").read_text())
    assert set(aliases) == {"base", "adversarial", "pgd", "cure"}
    for variant, key in aliases.items():
        (meta_path,) = (store / "entries" / key).glob("v-*/meta.json")
        meta = json.loads(meta_path.read_text())
        assert meta["model"]["target"] == TARGET and meta["model"]["kwargs"] == {"width": 8}, variant
        assert meta["dataset"]["class_names"] == ["ant", "bee", "cow", "doe"] and meta["dataset"]["image_shape"] == [3, 16, 16]
        state = torch.load(meta_path.parent / "model.pt", weights_only=True)
        assert state["net.features.0.weight"].shape == (8, 3, 3, 3) and state["net.head.weight"].shape == (4, 8), variant
