"""Published models as variants: weights saved in each zoo's layout load through the real code
and give the in-memory model's outputs exactly; unsafe, mismatched or missing files are clear
errors; attacks work through a loaded model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from torch import nn

from robustness import fingerprint
from robustness.attacks.deepfool import deepfool
from robustness.data.cifar import CIFAR10DataModule
from robustness.data.digits import DigitsDataModule
from robustness.data.tinyimagenet import TinyImageNetDataModule
from robustness.errors import ConfigError, StoreError
from robustness.models import zoo
from robustness.stages import variants
from robustness.models.normalize import Normalize, PixelClassifier
from robustness.registry import build, choices
from robustness.tensors import predict

CIFAR = CIFAR10DataModule.info


def _random_resnet(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(1)
    net = torchvision.models.resnet18(num_classes=num_classes)
    # Random running statistics too, so that a file missing them could not pass for a loaded one.
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return net.eval()


def _torchvision_node(models_dir: Path, weights: str, **options) -> dict:
    return {"name": "torchvision", "arch": "resnet18", "weights": weights, "models_dir": str(models_dir), **options}


def _reference(net: nn.Module, mean=CIFAR.mean, std=CIFAR.std) -> nn.Module:
    return PixelClassifier(Normalize(mean, std), net).eval()


def test_zoo_builders_are_registered_and_their_configs_compose() -> None:
    assert {"robustbench", "torchvision"} <= set(choices("model"))
    conf_dir = Path(__file__).resolve().parents[2] / "conf" / "model"
    for name in zoo.EXTERNAL_MODELS:
        node = OmegaConf.merge({"paths": {"models_dir": "/zoo"}}, {"model": OmegaConf.load(conf_dir / f"{name}.yaml")}).model
        assert zoo.is_external(node)
        assert node.models_dir == "/zoo" and node.allow_unpickling is False
    rb = OmegaConf.merge({"paths": {"models_dir": "/zoo"}}, {"model": OmegaConf.load(conf_dir / "robustbench.yaml")}).model
    assert rb.download is False
    assert variants.variant_node(rb, "rb_engstrom") == {
        "name": "robustbench", "entry": "Engstrom2019Robustness", "threat_model": "L2", "dataset": None,
        "models_dir": "/zoo", "download": False, "allow_unpickling": False,
    }
    with pytest.raises(ConfigError, match=r"variant 'rb_cure' is not one of model=robustbench's variants \(rb_standard, rb_engstrom, rb_rony\)"):
        variants.variant_node(rb, "rb_cure")


def test_external_variants_resolve_from_the_composed_config(catalogue, tmp_path: Path) -> None:
    from helpers import compose

    cfg = compose("robust_accuracy", ["dataset=cifar10", "model=robustbench", f"paths.models_dir={tmp_path}", "variants=[rb_standard,rb_engstrom]"])
    nodes = {variant: variants.external_variant(cfg, variant) for variant in cfg.variants}
    assert nodes["rb_standard"]["entry"] == "Standard" and nodes["rb_engstrom"]["entry"] == "Engstrom2019Robustness"
    assert {node["models_dir"] for node in nodes.values()} == {str(tmp_path)}
    net = _NormalisedNet().eval()
    _save_in_zoo_layout(tmp_path, "cifar10", "L2", "Standard", net)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(build("model", nodes["rb_standard"], info=CIFAR).eval()(x), net(x))

    # Published variants beside trained ones: a top-level table of full model nodes.
    mixed = compose("robust_accuracy", [
        "dataset=cifar10", "model=resnet18", f"paths.models_dir={tmp_path}",
        "+external_variants.rb_standard={name:robustbench,entry:Standard,threat_model:L2}",
    ])
    assert variants.external_variant(mixed, "base") is None
    assert variants.external_variant(mixed, "rb_standard") == {"name": "robustbench", "entry": "Standard", "threat_model": "L2", "models_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match="not a published model"):
        variants.external_variant({"model": {"name": "resnet18"}, "external_variants": {"bad": {"name": "resnet18"}}}, "bad")


def test_torchvision_weights_load_into_the_model_with_normalisation_in_front(tmp_path: Path) -> None:
    net = _random_resnet()
    (tmp_path / "cifar10").mkdir()
    torch.save(net.state_dict(), tmp_path / "cifar10" / "mine.pt")
    # The usual training wrappers: a DataParallel prefix inside a checkpoint dict.
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "wrapped.pt")

    x = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        expected = _reference(net)(x)
        for weights in ("cifar10/mine.pt", str(tmp_path / "wrapped.pt")):
            model = build("model", _torchvision_node(tmp_path, weights), info=CIFAR).eval()
            assert isinstance(model.normalize, Normalize)
            assert torch.equal(model(x), expected)
        # Statistics other than the dataset's are the ones in front of the network.
        imagenet = build("model", _torchvision_node(tmp_path, "cifar10/mine.pt", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]), info=CIFAR).eval()
        assert torch.equal(imagenet(x), _reference(net, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(x))
        assert not torch.allclose(imagenet(x), expected)


def test_a_pickled_weights_file_loads_only_with_the_opt_in(tmp_path: Path) -> None:
    net = _random_resnet()
    torch.save({"args": argparse.Namespace(lr=0.1), "state_dict": net.state_dict()}, tmp_path / "pickled.pt")
    node = _torchvision_node(tmp_path, "pickled.pt")
    with pytest.raises(StoreError, match=r"pickled Python objects \(it needs argparse\.Namespace\)") as refused:
        build("model", node, info=CIFAR)
    assert "model.allow_unpickling=true" in refused.value.hint
    model = build("model", {**node, "allow_unpickling": True}, info=CIFAR).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), _reference(net)(x))


def test_a_weights_file_for_another_class_count_names_both_counts(tmp_path: Path) -> None:
    torch.save(_random_resnet(num_classes=100).state_dict(), tmp_path / "c100.pt")
    with pytest.raises(ConfigError, match=r"have 100 classes \(key 'fc\.weight'\), the dataset cifar10 has 10"):
        build("model", _torchvision_node(tmp_path, "c100.pt"), info=CIFAR)


def test_torchvision_bad_names_shapes_and_files_are_config_errors(tmp_path: Path) -> None:
    torch.save(_random_resnet().state_dict(), tmp_path / "w.pt")
    with pytest.raises(ConfigError, match="no classification architecture 'resnet19'") as unknown:
        build("model", {**_torchvision_node(tmp_path, "w.pt"), "arch": "resnet19"}, info=CIFAR)
    assert "resnet18" in unknown.value.hint
    # One-channel 8x8 digits cannot go through a three-channel ImageNet network.
    with pytest.raises(ConfigError, match=r"does not take digits's images of shape \(1, 8, 8\)"):
        build("model", _torchvision_node(tmp_path, "w.pt"), info=DigitsDataModule.info)
    with pytest.raises(ConfigError, match="needs a weights file"):
        build("model", _torchvision_node(tmp_path, None), info=CIFAR)
    with pytest.raises(StoreError, match="does not exist"):
        build("model", _torchvision_node(tmp_path, "absent.pt"), info=CIFAR)
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "w.pt").read_bytes()[:1000])
    with pytest.raises(StoreError, match="truncated or corrupted"):
        build("model", _torchvision_node(tmp_path, "truncated.pt"), info=CIFAR)
    torch.save(torchvision.models.resnet34(num_classes=10).state_dict(), tmp_path / "r34.pt")
    with pytest.raises(StoreError, match=r"do not fit the architecture: keys .* unexpected \(e\.g\. layer1\.2\."):
        build("model", _torchvision_node(tmp_path, "r34.pt"), info=CIFAR)


# ---- RobustBench ------------------------------------------------------------------------


class _NormalisedNet(nn.Module):
    """Shaped like a RobustBench zoo architecture: [0, 1] pixels in, its own normalisation
    constants as buffers of a parameter-free layer (zoo files often leave them out)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.normalize = Normalize((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
        self.model = torchvision.models.resnet18(num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))


@pytest.fixture()
def catalogue(monkeypatch: pytest.MonkeyPatch) -> dict:
    """RobustBench's catalogue in its own shape, holding architectures that build in a second
    (the zoo's WideResNets take ten on these cores); everything past the look-up is the real code."""
    entries = {
        "cifar10": {
            "Linf": {"Standard": {"model": _NormalisedNet, "gdrive_id": "id-linf"}},
            "L2": {
                "Standard": {"model": _NormalisedNet, "gdrive_id": "id-l2"},
                "Ensemble2020": {"model": _NormalisedNet, "gdrive_id": ["a", "b"]},
            },
        },
        "cifar100": {"Linf": {"Standard": {"model": lambda: _NormalisedNet(100), "gdrive_id": "id-c100"}}},
    }
    monkeypatch.setattr(zoo, "robustbench_catalogue", lambda: entries)
    return entries


def _rb_node(models_dir: Path, **options) -> dict:
    return {"name": "robustbench", "entry": "Standard", "threat_model": "L2", "models_dir": str(models_dir), **options}


def _save_in_zoo_layout(models_dir: Path, dataset: str, threat: str, entry: str, net: nn.Module, pickled: bool = False) -> Path:
    path = models_dir / dataset / threat / f"{entry}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"module.{k}": v for k, v in net.state_dict().items() if not k.startswith("normalize.")}
    torch.save({"state_dict": state, **({"args": argparse.Namespace(eps=0.5)} if pickled else {})}, path)
    return path


def test_robustbench_weights_load_from_the_zoo_layout_without_extra_normalisation(catalogue, tmp_path: Path) -> None:
    torch.manual_seed(2)
    net = _NormalisedNet().eval()
    path = _save_in_zoo_layout(tmp_path, "cifar10", "L2", "Standard", net)
    model = build("model", _rb_node(tmp_path, threat_model="l2"), info=CIFAR).eval()
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))
    assert isinstance(model, _NormalisedNet)  # as the zoo made it: no second Normalize in front

    source = zoo.external_source(_rb_node(tmp_path), CIFAR)
    assert source["weights"] == str(path.resolve())
    assert source["weights_sha256"] == fingerprint.of_file(path)
    assert (source["kind"], source["dataset"], source["threat_model"], source["entry"]) == ("robustbench", "cifar10", "L2", "Standard")
    # The Linf entry of the same name is another file: the layout keeps them apart.
    with pytest.raises(StoreError, match=r"not at .*cifar10/Linf/Standard\.pt") as missing:
        build("model", _rb_node(tmp_path, threat_model="Linf"), info=CIFAR)
    assert "model.download=true" in missing.value.hint


def test_a_pickled_zoo_file_is_refused_without_the_opt_in(catalogue, tmp_path: Path) -> None:
    net = _NormalisedNet().eval()
    _save_in_zoo_layout(tmp_path, "cifar10", "L2", "Standard", net, pickled=True)
    with pytest.raises(StoreError, match="refusing to unpickle") as refused:
        build("model", _rb_node(tmp_path), info=CIFAR)
    assert "model.allow_unpickling=true" in refused.value.hint
    model = build("model", _rb_node(tmp_path, allow_unpickling=True), info=CIFAR).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), net(x))


def test_robustbench_class_count_dataset_and_name_errors(catalogue, tmp_path: Path) -> None:
    tiny = TinyImageNetDataModule.info
    with pytest.raises(ConfigError, match=r"no models for dataset 'tinyimagenet' \(it has: cifar10, cifar100\)"):
        build("model", _rb_node(tmp_path), info=tiny)
    _save_in_zoo_layout(tmp_path, "cifar100", "Linf", "Standard", _NormalisedNet(100))
    with pytest.raises(ConfigError, match=r"'Standard' \(cifar100, Linf\) has 100 classes, the dataset cifar10 has 10"):
        build("model", _rb_node(tmp_path, dataset="cifar100", threat_model="Linf"), info=CIFAR)
    with pytest.raises(ConfigError, match="no model 'Standart'") as misspelt:
        build("model", _rb_node(tmp_path, entry="Standart"), info=CIFAR)
    assert "Standard" in misspelt.value.hint
    with pytest.raises(ConfigError, match="no threat model 'L1'"):
        build("model", _rb_node(tmp_path, threat_model="L1"), info=CIFAR)
    with pytest.raises(ConfigError, match="an ensemble of 2 files"):
        build("model", _rb_node(tmp_path, entry="Ensemble2020"), info=CIFAR)


def test_without_robustbench_the_error_gives_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "robustbench", None)  # import fails as if it were not installed
    monkeypatch.setitem(sys.modules, "robustbench.model_zoo", None)
    with pytest.raises(ConfigError, match="needs the robustbench package, which is not installed") as absent:
        build("model", _rb_node(tmp_path), info=CIFAR)
    assert absent.value.hint == "pip install robustbench"


def test_deepfool_through_a_loaded_model_matches_the_in_memory_one(tmp_path: Path) -> None:
    net = _random_resnet()
    torch.save(net.state_dict(), tmp_path / "w.pt")
    loaded = build("model", _torchvision_node(tmp_path, "w.pt"), info=CIFAR).eval()
    reference = _reference(net)
    x = torch.rand(4, 3, 32, 32)
    ours = deepfool(loaded, x, max_iter=50)
    theirs = deepfool(reference, x, max_iter=50)
    assert bool(ours.success.all())
    assert torch.equal(ours.x_adv, theirs.x_adv) and torch.equal(ours.steps, theirs.steps)
    assert torch.all(predict(loaded, ours.x_adv) != predict(loaded, x))
    assert torch.allclose(ours.norm, (ours.x_adv - x).flatten(1).norm(dim=1), atol=1e-6)
    assert bool((ours.norm > 0).all())


def test_a_probe_runs_on_a_published_architecture_and_the_store_records_its_source(tmp_path: Path) -> None:
    """The whole probe stage on a torchvision ResNet-18 with generated weights, next to nothing trained."""
    import json

    from helpers import run_outcome
    from robustness.data import layouts
    from robustness.store import ModelStore

    layouts.write_cifar10(tmp_path / "data", per_class=2, seed=0)
    models_dir = tmp_path / "zoo"
    (models_dir / "cifar10").mkdir(parents=True)
    torch.save(_random_resnet().state_dict(), models_dir / "cifar10" / "resnet18_generated.pt")
    outcome = run_outcome(
        "robust_accuracy",
        ["dataset=cifar10", "model=resnet18", "trainer=cpu", "store.train_missing=false", f"paths.models_dir={models_dir}",
         "variants=[tv_generated]", "probe.n_images=4", "probe.eps=[0.0,0.05]", "attack=deepfool", "attack.max_iter=5",
         "+external_variants.tv_generated={name:torchvision,arch:resnet18,weights:cifar10/resnet18_generated.pt}"],
        tmp_path, artifacts_dir=tmp_path / "store",
    )
    (table,) = [a for a in outcome.artefacts if a.kind == "table" and a.rows]
    assert {row.get("variant") for row in table.rows} == {"tv_generated"}
    store = ModelStore(tmp_path / "store", "cifar10", "resnet18")
    key = store.aliases()["tv_generated"]
    record = json.loads((store.entry_dir(key) / "external.json").read_text())
    assert record["source"]["weights_sha256"] == fingerprint.of_file(models_dir / "cifar10" / "resnet18_generated.pt")
    assert record["source"]["kind"] == "torchvision"
