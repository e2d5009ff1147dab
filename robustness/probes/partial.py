"""The one cache of a probe's partial results: each finished part kept as soon as it is done.

Every probe that works through items (chunks of images, image pairs, attacks) keeps each finished
part here, so that an interrupted probe resumes where it stopped and another run that needs the
same parts (Table 2 after Figures 5-8, Figure 4 after Figure 2) finds them. A set of parts lives
in ``<root>/<name>-<fingerprint>/``, the fingerprint taken of everything its numbers depend on
(options, seed, images, the model's weights), so a changed setting or a retrained model never
meets a stale part. Parts are dicts of tensors and plain values, written atomically and read with
``weights_only=True``; one that cannot be read is computed again.

A part computed by :meth:`PartialResults.get` keeps torch's random streams as its computation left
them, and reading it puts them back: the parts after it (a PGD random start, a Monte-Carlo probe)
draw what they would have drawn had it been computed, so a resumed run gives the uninterrupted
run's numbers, not numbers that depend on where it was interrupted.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from robustness import fingerprint
from robustness.io import atomic_torch_save

log = logging.getLogger("robustness")

Part = dict[str, Any]


class PartialResults:
    """The parts of one computation, named by ``identity``; ``root=None`` keeps nothing."""

    def __init__(self, root: str | Path | None, name: str, identity: Mapping[str, Any]) -> None:
        self.folder = None if root is None else Path(root) / f"{name}-{fingerprint.of_config(dict(identity))}"

    def path(self, part: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{part}.pt"

    def load(self, part: str, valid: Callable[[Any], bool] = lambda value: isinstance(value, dict)) -> Part | None:
        """A saved part, or None where there is none (or it cannot be read, or ``valid`` refuses it)."""
        read = self._read(part, valid)
        return None if read is None else read[0]

    def _read(self, part: str, valid: Callable[[Any], bool]) -> tuple[Part, dict[str, Tensor]] | None:
        """A saved part and the random streams kept with it (empty for a part saved without them)."""
        path = self.path(part)
        if path is None or not path.is_file():
            return None
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
            streams = {k: value.pop(k) for k in list(value) if k in _STREAM_KEYS} if isinstance(value, dict) else {}
            if not valid(value):
                raise TypeError("not the kind of part this probe saves")
        except Exception as exc:  # noqa: BLE001 - writes are atomic, so this is a damaged or foreign file
            log.warning("recomputing the partial result %s: it cannot be read (%s)", path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return None
        return value, streams

    def save(self, part: str, value: Part, streams: Mapping[str, Tensor] | None = None) -> Part:
        """Keep ``value`` (tensors moved to the CPU), with ``streams`` beside it, and return it."""
        kept = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in value.items()}
        path = self.path(part)
        if path is not None:
            atomic_torch_save({**kept, **(streams or {})}, path)
        return kept

    def get(self, part: str, compute: Callable[[], Part], valid: Callable[[Any], bool] = lambda value: isinstance(value, dict)) -> Part:
        """The saved part, with the random streams put back as its computation left them; or
        ``compute()``, saved with the streams it leaves."""
        read = self._read(part, valid)
        if read is not None:
            value, streams = read
            _restore_streams(streams)
            return value
        value = compute()
        return self.save(part, value, _current_streams())


# torch's random streams a part keeps: the CPU generator's, and the current GPU's where one is in use.
_CPU_STREAM, _CUDA_STREAM = _STREAM_KEYS = ("_random_stream_cpu", "_random_stream_cuda")


def _current_streams() -> dict[str, Tensor]:
    streams = {_CPU_STREAM: torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        streams[_CUDA_STREAM] = torch.cuda.get_rng_state()
    return streams


def _restore_streams(streams: Mapping[str, Tensor]) -> None:
    if _CPU_STREAM in streams:
        torch.set_rng_state(streams[_CPU_STREAM])
    if _CUDA_STREAM in streams and torch.cuda.is_available():
        torch.cuda.set_rng_state(streams[_CUDA_STREAM])


def _tensors_only(value: Any) -> bool:
    return isinstance(value, dict) and all(torch.is_tensor(v) for v in value.values())


def run_in_chunks(
    parts: PartialResults,
    num_items: int,
    chunk_size: int,
    compute_chunk: Callable[[int, int], Mapping[str, Tensor]],
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Tensor]:
    """``compute_chunk(start, stop)`` over ``range(num_items)`` in chunks, each kept in ``parts``.

    Returns every key's chunks concatenated along dimension 0 (on the CPU).
    """
    chunks = []
    for start in range(0, num_items, chunk_size):
        stop = min(start + chunk_size, num_items)
        chunks.append(parts.get(f"{start:06d}-{stop:06d}", lambda: dict(compute_chunk(start, stop)), _tensors_only))
        if progress is not None:
            progress(stop, num_items)
    if not chunks:
        return {}
    return {k: torch.cat([chunk[k] for chunk in chunks]) for k in chunks[0]}
