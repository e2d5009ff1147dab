"""The one way the project names things by their content: configs, tensors, weights and files.

Every digest is a full SHA-256 in hex. Nothing is cut short: a name that identifies a model or a
result must not collide, and a long folder name costs nothing.

- :func:`of_config` for anything JSON-like (a config, a recipe, a probe's options);
- :func:`of_tensors` for tensors (shape, dtype and values);
- :func:`of_state` for a model's weights and buffers, by name;
- :func:`of_bytes` / :func:`of_file` for bytes as stored on disk.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn


def canonical_json(obj: Any) -> str:
    """``obj`` as JSON with sorted keys and no whitespace: equal configs give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default, allow_nan=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if torch.is_tensor(value):
        return {"tensor": of_tensors(value)}
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return repr(value)


def of_config(obj: Any) -> str:
    """The digest of a JSON-like value (a config, a recipe, options)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def _update_with_tensor(digest: "hashlib._Hash", tensor: Tensor) -> None:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    if flat.numel():
        digest.update(flat.view(torch.uint8).numpy().tobytes())


def of_tensors(*tensors: Tensor) -> str:
    """The digest of tensors' shapes, dtypes and exact values, in order."""
    digest = hashlib.sha256()
    for tensor in tensors:
        _update_with_tensor(digest, tensor)
    return digest.hexdigest()


def of_state(state: Mapping[str, Tensor] | nn.Module) -> str:
    """The digest of a model's weights and buffers (a state_dict or the module itself), by name."""
    if isinstance(state, nn.Module):
        state = state.state_dict()
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + b"\0")
        _update_with_tensor(digest, state[name])
    return digest.hexdigest()


def of_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def of_file(path: str | Path) -> str:
    """The digest of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def of_parts(parts: Iterable[str]) -> str:
    """The digest of several digests (or other strings) taken together, in order."""
    return of_config(list(parts))
