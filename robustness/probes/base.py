"""What a probe receives and returns.

A probe is a module with ``compute(ctx: ProbeContext) -> ProbeResult``. It never plots: its
result is saved, reloaded and drawn by the reporter of the same name in
``robustness.reporting``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from robustness.errors import ConfigError, StoreError
from robustness.io import atomic_torch_save, atomic_write_json, read_json


class ProbeOptions:
    """Mixin for a probe's options dataclass: built from the probe's config node, where an
    unknown key or a value of the wrong type is a ConfigError naming the valid options."""

    probe: ClassVar[str] = ""

    @classmethod
    def from_cfg(cls, cfg: Mapping[str, Any]) -> Any:
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(cfg) - known - {"name"})
        if unknown:
            raise ConfigError(
                f"unknown option(s) for probe {cls.probe}: {', '.join(unknown)}",
                f"valid options: {', '.join(sorted(known))} (see conf/probe/{cls.probe}.yaml)",
            )
        # A null in the config means "the default".
        values = cls.normalise({key: cfg[key] for key in known if key in cfg and cfg[key] is not None})
        options = cls(**values)
        try:
            options.validate()
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"an option of probe {cls.probe} has the wrong type: {exc}", f"see conf/probe/{cls.probe}.yaml") from None
        return options

    @classmethod
    def normalise(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Convert raw config values (lists from YAML, ...) before construction."""
        return values

    def validate(self) -> None:
        """Check ranges; raise ConfigError with a hint."""


@dataclass
class TrainingRecord:
    """How a variant came to be, as the store knows it.

    starts_from:     the variant its training started from, "random init", or "published"
    metrics:         what its training recorded (``metrics.json`` in the store; empty when published)
    start_model:     that starting variant's model in eval mode, when it is one of the store's
    adversarial_set: the adversarial set its training used (tensors ``x`` and ``y``), if any
    """

    starts_from: str = "published"
    metrics: dict[str, Any] = field(default_factory=dict)
    start_model: nn.Module | None = None
    adversarial_set: dict[str, Tensor] | None = None


@dataclass
class ProbeContext:
    """Everything a probe may use.

    options:  the probe's own config node (``cfg.probe``), as a plain dict
    models:   variant name -> model in eval mode on ``device``, in the order asked for
    data:     the data module (already set up); ``data.info`` has class names and shape
    attack:   the ``attack`` config node as a plain dict (build it with registry.build_attack)
    work_dir: a folder for partial results, so an interrupted probe resumes where it stopped
    progress: call ``progress(done, total, what)`` to report progress
    training: ``training(name)`` is the variant's :class:`TrainingRecord` (loaded when asked for)
    shared_dir: a folder for one model's partial results that runs of the same probe on other
              lists of variants reuse (Figure 4's planes reuse Figure 2's base and adversarial):
              whatever is kept there must be named by everything it depends on, the model's
              weights included; None: keep them in ``work_dir``
    """

    options: dict[str, Any]
    models: dict[str, nn.Module]
    data: Any
    attack: dict[str, Any]
    device: torch.device
    seed: int
    work_dir: Path
    progress: Callable[[int, int, str], None] = lambda done, total, what: None
    training: Callable[[str], TrainingRecord] = lambda name: TrainingRecord()
    shared_dir: Path | None = None


@dataclass
class ProbeResult:
    """A probe's output: arrays, tables (lists of row dicts) and JSON-able metadata."""

    probe: str
    arrays: dict[str, Tensor] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        arrays = {k: torch.as_tensor(np.asarray(v)) if not torch.is_tensor(v) else v.detach().cpu() for k, v in self.arrays.items()}
        atomic_torch_save(arrays, directory / "arrays.pt")
        atomic_write_json(directory / "result.json", {"probe": self.probe, "tables": self.tables, "meta": self.meta})
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "ProbeResult":
        directory = Path(directory)
        try:
            header = read_json(directory / "result.json")
            arrays = torch.load(directory / "arrays.pt", map_location="cpu", weights_only=True)
        except FileNotFoundError as exc:
            raise StoreError(f"no probe result in {directory}: {exc.filename} is missing", "run the probe's experiment first") from None
        except Exception as exc:  # noqa: BLE001 - truncated JSON, damaged arrays: the file is unusable either way
            raise StoreError(f"the probe result in {directory} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
                             "it is recomputed when the probe runs again (or delete that folder)") from None
        shape_ok = (isinstance(header, dict) and isinstance(header.get("probe"), str) and isinstance(header.get("tables"), dict)
                    and isinstance(header.get("meta"), dict) and isinstance(arrays, dict))
        if not shape_ok:
            raise StoreError(f"the probe result in {directory} is not one this project wrote (missing or mistyped keys)",
                             "it is recomputed when the probe runs again (or delete that folder)")
        return cls(probe=header["probe"], arrays=arrays, tables=header["tables"], meta=header["meta"])
