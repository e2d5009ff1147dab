"""Model builders: ``build_model(cfg.model, info)``; every model takes [0, 1] pixels."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig
from torch import nn

from robustness.data.base import DatasetInfo
from robustness.errors import ConfigError
from robustness.registry import MODELS, resolve, split_name


def build_model(model_cfg: DictConfig | dict[str, Any], info: DatasetInfo) -> nn.Module:
    name, kwargs = split_name(model_cfg, "model")
    builder = resolve(MODELS, name, "model")
    try:
        return builder(info, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad option for model '{name}': {exc}", f"see conf/model/{name}.yaml for its options") from None
