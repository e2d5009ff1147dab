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

from robustness.registry import METADATA_KEYS


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


# ---- what identifies a trained model, and a probe result -----------------------------------

# 2: the data's content and the model's files joined the identity.
IDENTITY_FORMAT = 2
# Dataset options that change where or how fast images are read, never which images or labels
# a model is trained on.
DATASET_KEYS_OUTSIDE_IDENTITY = frozenset({"eval_batch_size", "num_workers", "download"})
# Trainer options that change how a run looks or which hardware runs it, not what it computes.
TRAINER_KEYS_OUTSIDE_IDENTITY = frozenset({
    "accelerator", "deterministic", "enable_progress_bar", "enable_model_summary", "log_every_n_steps", "plugins", "default_root_dir",
})


def dataset_identity(dataset: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """What determines a dataset's splits and training images: its options and the seed that splits it."""
    return {"options": {k: v for k, v in dataset.items() if k not in DATASET_KEYS_OUTSIDE_IDENTITY}, "split_seed": int(seed)}


# Dataset options that choose which training images are used, not how the data is split.
TRAINING_ONLY_DATASET_KEYS = frozenset({"train_fraction", "batch_size", "augment"})


def split_identity(identity: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a :func:`dataset_identity` that decides the validation and test splits."""
    options = {k: v for k, v in dict(identity.get("options") or {}).items() if k not in TRAINING_ONLY_DATASET_KEYS}
    return {"options": options, "split_seed": identity.get("split_seed")}


def training_identity(config: Mapping[str, Any], init_fingerprint: str | None, data: Mapping[str, Any] | None = None,
                      model_files: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything that determines a trained model's weights, from a resolved training config.

    ``init_fingerprint`` is the fingerprint of the model the training starts from (the
    regularizer's ``init_from``), so a fine-tuned model changes identity with its parent.
    ``data`` names the data by content (``ImageDataModule.data_identity()``) and ``model_files``
    the files the model is built from beyond its config (``models.identity_of``: a weights file's
    digest), so that other bytes under the same config never share a fingerprint.
    """
    trainer = {k: v for k, v in dict(config.get("trainer") or {}).items() if k not in TRAINER_KEYS_OUTSIDE_IDENTITY}
    return {
        "format": IDENTITY_FORMAT,
        "dataset": dataset_identity(config["dataset"], config["seed"]),
        "data": dict(data or {}),
        "model": dict(config["model"]),
        "model_files": dict(model_files or {}),
        "regularizer": {k: v for k, v in dict(config["regularizer"]).items() if k not in METADATA_KEYS},
        "init_from": init_fingerprint,
        "optim": dict(config["optim"]),
        "trainer": trainer,
        "seed": int(config["seed"]),
    }


def identity_differences(saved: Mapping[str, Any], wanted: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two identities, with both values, in key order."""
    differences: list[str] = []
    for key in sorted(set(saved) | set(wanted), key=str):
        a, b = saved.get(key, "<absent>"), wanted.get(key, "<absent>")
        dotted = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            differences += identity_differences(a, b, f"{dotted}.")
        elif a != b:
            differences.append(f"{dotted}: {a!r} in the store, {b!r} asked for")
    return differences
