"""Every experiment composes and passes the config checks; every option of every group builds.

This is the test on the real config (lightning-hydra-template's test_configs, for this project):
a typo in a YAML file, an option a component no longer takes, or a default that only Python
knows fails here rather than an hour into a GPU run.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import hydra_initialized
from robustness.data.base import DatasetInfo
from robustness.registry import build, choices, lookup
from robustness.stages import compose_experiment
from robustness.stages.checks import _probe_options, check_config
from robustness.stages.common import apply_debug
from robustness.stages.variants import recipe_settings

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
@pytest.mark.parametrize("debug", [False, True], ids=["as-is", "rehearsal"])
def test_every_experiment_composes_and_passes_the_checks(name: str, debug: bool, tmp_path: Path) -> None:
    overrides = [f"paths.artifacts_dir={tmp_path / 'store'}", "logger=csv", *(["debug=rehearsal"] if debug else [])]
    with hydra_initialized():
        cfg = compose_experiment(name, overrides)
        apply_debug(cfg)
        check_config(cfg, tmp_path / "out")
    assert cfg.task in ("train", "probe", "report")


@pytest.mark.parametrize("group", ["dataset", "regularizer", "attack", "probe"])
def test_every_option_of_every_group_builds(group: str, tmp_path: Path) -> None:
    names = _options(group)
    assert names and set(names) <= set(choices(group)) | {"table1"}
    for name in names:
        with hydra_initialized():
            cfg = compose_experiment("train", [f"{group}={name}", f"paths.artifacts_dir={tmp_path}"])
            settings = recipe_settings(cfg, str(cfg.regularizer.variant)) if group == "regularizer" else []
            if settings[:1] == [f"regularizer={name}"]:  # as `experiment=train regularizer=NAME` trains it: with its recipe's settings
                cfg = compose_experiment("train", [*settings, f"paths.artifacts_dir={tmp_path}"])
        if group == "dataset":
            component = build("dataset", cfg.dataset, data_dir=str(tmp_path), seed=0)
        elif group == "probe":
            component = _probe_options(cfg)
            assert component is not None, f"probe {name} has no options class"
        else:
            component = build(group, cfg[group])
        assert component is not None, name


def test_every_model_builds_for_each_image_shape() -> None:
    for name in choices("model"):
        if name in ("robustbench", "torchvision", "import"):  # published models need their weights file (tests/models/test_zoo.py), model=import its target (tests/models/test_imported.py)
            continue
        node = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
        for shape, classes in (((1, 8, 8), 10), ((3, 32, 32), 10), ((3, 64, 64), 200)):
            info = DatasetInfo("shape", classes, shape, tuple(map(str, range(classes))), (0.5,) * shape[0], (0.25,) * shape[0])
            model = build("model", node, info=info)
            import torch

            with torch.no_grad():
                assert model.eval()(torch.rand(2, *shape)).shape == (2, classes), (name, shape)


def test_probe_yaml_files_set_every_option_so_python_holds_no_second_default() -> None:
    for name in _options("probe"):
        with hydra_initialized():
            cfg = compose_experiment("train", [f"probe={name}"])
        options = _probe_options(cfg)
        missing = [f.name for f in fields(options) if f.name not in cfg.probe]
        assert not missing, f"conf/probe/{name}.yaml does not set {missing}: their only default is in Python"
        lookup("reporter", name)  # every probe has its reporter


def test_a_composed_experiment_is_reused_as_a_copy_until_hydra_reads_another_config(tmp_path: Path) -> None:
    import shutil

    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with hydra_initialized():
        first = compose_experiment("train", ["seed=3"])
        first.seed = 99  # the caller's own copy
        again = compose_experiment("train", ["seed=3"])
        assert again.seed == 3 and again is not first
        assert compose_experiment("train", ["seed=4"]).seed == 4  # other overrides, another config
    # The same experiment name in another config folder, with other contents: composed afresh.
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf, symlinks=False)
    (conf / "experiment" / "train.yaml").write_text("# @package _global_\ntask: train\nseed: 11\n")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        assert compose_experiment("train").seed == 11
    with hydra_initialized():
        assert compose_experiment("train").seed == 0


def test_every_regularizer_names_and_colours_its_variant_for_the_reports() -> None:
    # Reports take a variant's title and colour from its regularizer's `display` node, never from
    # a table in reporting/; the display never reaches the regularizer or the fingerprint.
    from robustness import fingerprint

    colours = set()
    for path in sorted((REPO / "conf" / "regularizer").glob("*.yaml")):
        node = OmegaConf.to_container(OmegaConf.load(path))
        display = node.get("display") or {}
        assert isinstance(display.get("title"), str) and display["title"], path.name
        assert re.fullmatch(r"#[0-9a-f]{6}", str(display.get("colour", ""))), path.name
        colours.add(display["colour"])
        plain = {k: v for k, v in node.items() if k != "display"}
        config = {"dataset": {}, "model": {}, "regularizer": node, "optim": {}, "trainer": {}, "seed": 0}
        assert fingerprint.training_identity(config, None)["regularizer"] == plain
    assert len(colours) == len(list((REPO / "conf" / "regularizer").glob("*.yaml")))


@pytest.mark.parametrize(("recipe", "kind", "expected"), [
    ("cifar10", "SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 5.0e-4}),
    ("fashion_mnist", "AdamW", {"lr": 3.0e-3, "weight_decay": 5.0e-4}),
])
def test_a_recipes_optimiser_is_the_one_training_builds(recipe: str, kind: str, expected: dict) -> None:
    """What the training stage hands the module (cfg.optim, as stages/train.py passes it) makes the
    recipe's optimiser and schedule (the rehearsals in the suite train with AdamW only)."""
    from torch import nn

    from robustness.stages.common import to_python
    from robustness.training.module import ClassifierModule

    with hydra_initialized():
        cfg = compose_experiment("train", [f"recipe={recipe}"])
    optimisers = ClassifierModule(nn.Linear(4, 10), 10, **to_python(cfg.optim)).configure_optimizers()
    optimiser, scheduler = optimisers["optimizer"], optimisers["lr_scheduler"]["scheduler"]
    assert type(optimiser).__name__ == kind
    assert {k: optimiser.defaults[k] for k in expected} == expected
    assert scheduler.gamma == cfg.optim.gamma and optimisers["lr_scheduler"]["interval"] == "epoch"
