"""Shared by the probes that measure something at each of the first N test images.

``hessian_norm``, ``min_perturbation``, ``curvature_profile`` and ``table1`` all take the same
images (the first ``num_images`` of a split, identical for every model variant), compute one
result per image in chunks, and keep each finished chunk in ``ctx.work_dir`` so that an
interrupted probe resumes where it stopped. A chunk's file name carries a fingerprint of
everything its numbers depend on (options, seed, images, model weights), so a changed setting
or a retrained model never picks up stale chunks.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import Tensor

from robustness import fingerprint as fingerprint_of
from robustness.errors import ConfigError
from robustness.io import atomic_torch_save
from robustness.probes.base import ProbeContext, ProbeOptions

log = logging.getLogger("robustness")

ChunkFn = Callable[[int, int], Mapping[str, Tensor]]


@dataclass(frozen=True)
class PerImageOptions(ProbeOptions):
    """Which images, and how many per chunk (see conf/probe/hessian_norm.yaml for the meaning)."""

    probe: ClassVar[str] = ""

    num_images: int = 100
    split: str = "test"
    chunk_size: int = 25

    def validate(self) -> None:
        require_positive_int(self.probe, "num_images", self.num_images, "the report uses 100")
        require_positive_int(self.probe, "chunk_size", self.chunk_size, "e.g. 25; a finished chunk is kept when a run is interrupted")
        if self.split not in ("train", "val", "test"):
            raise ConfigError(f"probe.split must be train, val or test, got '{self.split}'", "the report uses test images")

    def fingerprint(self, keys: tuple[str, ...]) -> dict[str, Any]:
        values = asdict(self)
        return {key: values[key] for key in keys}


def require_positive_int(probe: str, key: str, value: Any, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"probe.{key} of {probe} must be a positive integer, got {value}", hint)


def load_images(ctx: ProbeContext, options: PerImageOptions) -> tuple[Tensor, Tensor]:
    """The first ``num_images`` images of the split and their labels, on ``ctx.device``."""
    x, y = ctx.data.split_tensors(options.split, limit=int(options.num_images))
    if len(x) == 0:
        raise ConfigError(f"the {options.split} split has no images", "pick another probe.split")
    return x.to(ctx.device), y.to(ctx.device)


def run_in_chunks(
    work_dir: str | Path,
    name: str,
    fingerprint: Mapping[str, Any],
    num_items: int,
    chunk_size: int,
    compute_chunk: ChunkFn,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Tensor]:
    """``compute_chunk(start, stop)`` over ``range(num_items)`` in chunks, each kept on disk.

    Returns every key's chunks concatenated along dimension 0 (on the CPU). Chunks already saved
    under ``work_dir/name-<fingerprint>/`` are loaded instead of recomputed.
    """
    key = fingerprint_of.of_config(dict(fingerprint))
    folder = Path(work_dir) / f"{name}-{key}"
    parts: list[dict[str, Tensor]] = []
    bounds = [(start, min(start + chunk_size, num_items)) for start in range(0, num_items, chunk_size)]
    for start, stop in bounds:
        path = folder / f"{start:06d}-{stop:06d}.pt"
        if path.is_file():
            try:
                part = torch.load(path, map_location="cpu", weights_only=True)
                if not isinstance(part, dict) or not all(torch.is_tensor(v) for v in part.values()):
                    raise TypeError("not a dict of tensors")
            except Exception as exc:  # noqa: BLE001 - writes are atomic, so this is a damaged or foreign file
                log.warning("recomputing the partial result %s: it cannot be read (%s)", path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                part = None
        else:
            part = None
        if part is None:
            part = {k: v.detach().cpu() for k, v in compute_chunk(start, stop).items()}
            atomic_torch_save(part, path)
        parts.append(part)
        if progress is not None:
            progress(stop, num_items, name)
    if not parts:
        return {}
    return {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
