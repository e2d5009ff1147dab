"""Name -> implementation tables for every config group.

A config file names its implementation with ``name:``; the remaining keys are keyword
arguments. The tables hold import paths so that importing the package stays cheap and a
missing optional module fails only when it is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from robustness.errors import ConfigError

DATASETS = {
    "digits": "robustness.data.digits:DigitsDataModule",
    "colour_digits": "robustness.data.colour_digits:ColourDigitsDataModule",
    "cifar10": "robustness.data.cifar:CIFAR10DataModule",
    "svhn": "robustness.data.svhn:SVHNDataModule",
    "tinyimagenet": "robustness.data.tinyimagenet:TinyImageNetDataModule",
}

MODELS = {
    "smallcnn": "robustness.models.smallcnn:smallcnn",
    "resnet18": "robustness.models.resnet:resnet18",
    "resnet50": "robustness.models.resnet:resnet50",
}

REGULARIZERS = {
    "none": "robustness.training.regularizer:NoRegularizer",
    "cure": "robustness.training.cure:CURE",
    "adversarial_finetune": "robustness.training.adversarial:AdversarialFinetune",
    "pgd": "robustness.training.adversarial:PGDTraining",
    "distillation": "robustness.training.distillation:Distillation",
}

ATTACKS = {
    "runner_up": "robustness.attacks.runner_up:RunnerUp",
    "deepfool": "robustness.attacks.deepfool:DeepFool",
    "pgd_linf": "robustness.attacks.pgd:PGDLinf",
    "pgd_l2": "robustness.attacks.pgd:PGDL2",
    "fgsm": "robustness.attacks.pgd:FGSM",
    "colour": "robustness.attacks.colour:ColourAttack",
}

# Each probe module defines ``compute(ctx: ProbeContext) -> ProbeResult``; each reporter module
# defines ``draw(result: ProbeResult, out_dir: Path) -> list[Artefact]``.
PROBES = {
    "boundary_plane": "robustness.probes.boundary_plane",
    "random_plane": "robustness.probes.random_plane",
    "hessian_norm": "robustness.probes.hessian_norm",
    "min_perturbation": "robustness.probes.min_perturbation",
    "curvature_profile": "robustness.probes.curvature_profile",
    "path_connectivity": "robustness.probes.path_connectivity",
    "perceptual": "robustness.probes.perceptual",
    "adversarial_accuracy": "robustness.probes.adversarial_accuracy",
    "table1": "robustness.probes.table1",
}

REPORTERS = {name: path.replace(".probes.", ".reporting.") for name, path in PROBES.items()}


def resolve(table: Mapping[str, str], name: str, group: str) -> Any:
    """Import the object registered under ``name``; unknown names list the valid ones."""
    if name not in table:
        raise ConfigError(
            f"unknown {group} '{name}'",
            f"choose one of: {', '.join(sorted(table))}",
        )
    module_name, _, attr = table[name].partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


def split_name(cfg: DictConfig | Mapping[str, Any], group: str) -> tuple[str, dict[str, Any]]:
    """Return (name, remaining keys as plain kwargs) of a group's config node."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    if "name" not in data:
        raise ConfigError(f"the {group} config has no 'name' key", f"add 'name: <one of the {group} options>'")
    name = data.pop("name")
    return name, data


def build_attack(cfg: DictConfig | Mapping[str, Any]) -> Any:
    """Instantiate the attack named by an ``attack`` config node."""
    name, kwargs = split_name(cfg, "attack")
    cls = resolve(ATTACKS, name, "attack")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad option for attack '{name}': {exc}", f"see conf/attack/{name}.yaml for its options") from None
