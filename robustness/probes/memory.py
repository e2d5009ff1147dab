"""How much memory a probe needs, judged before it starts.

Each probe's options say what its peak holds (:meth:`ProbeOptions.memory_need`): a part that no
batch size changes (a grid's labels and coordinates, the probed images, per-image results) and a
part per batch item (one image or grid point through the model, with its activations and, for
gradients, their backward). Against the memory this machine has free, :func:`fit_batch`

- refuses what cannot fit even one item at a time, before any work, with the estimate and the
  option that shrinks it (a smaller resolution, fewer images);
- lowers the batch (the probe's ``batch_size`` or ``chunk_size``) where the configured one would
  not fit: the same numbers in more pieces.

The estimates are deliberately on the high side (every activation of a forward kept at once), so
a refusal means the run could not have finished, not that it might have.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from robustness.errors import ConfigError

log = logging.getLogger("robustness")

FLOAT = 4  # bytes of a float32
LONG = 8  # bytes of an int64 (labels) or a float64
# Of the memory reported free, what a probe may plan to use: the rest is headroom for the
# models, Python and the allocator's fragmentation.
USABLE_SHARE = 0.85


@dataclass(frozen=True)
class MemoryNeed:
    """A probe's peak memory: ``fixed + batch * per_item`` bytes.

    fixed:     bytes held whatever the batch (grids, images, results)
    per_item:  bytes per batch item (an image or grid point through the model)
    batch:     items per batch as configured
    batch_key: the option that sets ``batch`` (``batch_size`` or ``chunk_size``)
    fixed_what: what the fixed part holds, as a message names it
    fixed_fix: how to shrink the fixed part, given the bytes that may be used; as a fix line says it
    """

    fixed: int
    per_item: int
    batch: int
    batch_key: str
    fixed_what: str
    fixed_fix: Callable[[int], str]

    @property
    def total(self) -> int:
        return self.fixed + self.batch * self.per_item


def grid_need(resolution: int) -> int:
    """Bytes of a ``resolution`` x ``resolution`` plane grid: both coordinates (float32) and labels (int64) per point."""
    return int(resolution) ** 2 * (2 * FLOAT + LONG)


def largest_odd_grid(usable: int, other: int = 0) -> int:
    """The largest odd resolution whose grid fits in ``usable - other`` bytes (at least 3)."""
    room = max(0, usable - other)
    side = int(math.isqrt(room // (2 * FLOAT + LONG)))
    side -= 1 - side % 2
    return max(3, side)


def size_text(count: float) -> str:
    """Bytes in the largest unit that keeps a number of at least 1 (``1.6 GB``)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{int(count)} bytes"


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Memory free for new tensors on ``device``: the GPU's free memory, or on the CPU the smaller
    of the system's available memory and what this process's cgroup still allows."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    candidates = [_meminfo_available()]
    candidates.append(_cgroup_room())
    known = [c for c in candidates if c is not None]
    if known:
        return min(known)
    try:  # not Linux: all physical memory is the best the standard library tells
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: judge nothing


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


@torch.no_grad()
def activation_bytes(model: nn.Module, example: Tensor) -> int:
    """Bytes of every module output in one forward of one image: an upper bound on what a forward
    keeps alive at once (a backward keeps about as much again)."""
    total = 0

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if torch.is_tensor(tensor):
                total += tensor.numel() * tensor.element_size()

    handles = [module.register_forward_hook(count) for module in model.modules() if not list(module.children())]
    try:
        model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    return int(total)


def fit_batch(need: MemoryNeed, probe: str, device: torch.device | str = "cpu", available: int | None = None) -> int:
    """The batch to run with: the configured one where it fits, else the largest that does.

    Raises a ConfigError naming the estimate and the fix when even one item at a time cannot fit.
    """
    free = available_bytes(device) if available is None else int(available)
    usable = int(free * USABLE_SHARE)
    where = f"{size_text(free)} free on {'the GPU' if torch.device(device).type == 'cuda' else 'this machine'}"
    if need.fixed + need.per_item > usable:
        if need.fixed > usable // 2 or need.per_item <= usable // 2:
            raise ConfigError(
                f"probe {probe} needs about {size_text(need.fixed + need.per_item)} of memory "
                f"({need.fixed_what}: {size_text(need.fixed)}), and {where}",
                need.fixed_fix(usable),
            )
        raise ConfigError(
            f"probe {probe} needs about {size_text(need.per_item)} per item of a batch, and {where}",
            "use smaller images or a smaller model",
        )
    if need.total <= usable:
        return need.batch
    batch = max(1, (usable - need.fixed) // max(1, need.per_item))
    log.warning("probe %s: %s=%d would need about %s with %s; running %d at a time instead (the same numbers)",
                probe, need.batch_key, need.batch, size_text(need.total), where, batch)
    return int(batch)


def attack_gradient_rows(attack_cfg: Any) -> int:
    """How many logit rows an attack differentiates at once per image: DeepFool its
    ``num_candidates`` - 1 nearest boundaries, every other attack one (a loss, or a margin)."""
    candidates = attack_cfg.get("num_candidates") if hasattr(attack_cfg, "get") else None
    return max(1, int(candidates) - 1) if candidates else 1


def gradient_bytes(image_shape: Sequence[int], activation: int, rows: int = 1) -> int:
    """One image through a forward kept for a backward (``activation`` bytes, and about as much
    again for the backward's own tensors), with ``rows`` gradients sent back in one sweep: each
    further row a layer's worth of gradient at a time, bounded here by the whole forward's bytes."""
    return image_bytes(image_shape) + 3 * activation + 2 * max(0, int(rows) - 1) * activation


def image_bytes(image_shape: Sequence[int]) -> int:
    """Bytes of one float32 image."""
    return int(math.prod(int(s) for s in image_shape)) * FLOAT
