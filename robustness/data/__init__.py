"""Data modules; every dataset yields images in [0, 1] and knows its class names."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from robustness.data.base import DatasetInfo, ImageDataModule
from robustness.errors import ConfigError
from robustness.registry import DATASETS, resolve, split_name


def build_datamodule(dataset_cfg: DictConfig | dict[str, Any], data_dir: str, seed: int) -> ImageDataModule:
    """The data module named by a ``dataset`` config node, reading from ``data_dir``."""
    name, kwargs = split_name(dataset_cfg, "dataset")
    cls = resolve(DATASETS, name, "dataset")
    try:
        return cls(data_dir=data_dir, seed=seed, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad option for dataset '{name}': {exc}", f"see conf/dataset/{name}.yaml for its options") from None


__all__ = ["DatasetInfo", "ImageDataModule", "build_datamodule"]
