"""The model store: where trained variants live, how they are saved atomically and loaded safely.

Layout: ``<artifacts_dir>/<dataset>/<model>/<variant>/`` holding

- ``model.pt``      the model's state_dict, loadable with ``torch.load(weights_only=True)``
- ``meta.json``     dataset facts and model config the weights belong to (checked on load)
- ``config.yaml``   the resolved config of the run that trained it
- ``metrics.json``  its final metrics
- ``cache/``        tensors derived from this variant (e.g. an adversarial set), see :meth:`save_tensors`
- ``resume/``       Lightning checkpoints of an unfinished run (removed once the run completes)

A multirun job writes to ``<variant>@<tag>`` (tag = the job's overrides) so jobs of one sweep
never write over each other.
"""

from __future__ import annotations

import io
import time
import json
import pickle
import re
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from robustness.data.base import DatasetInfo
from robustness import fingerprint
from robustness.errors import StoreError
from robustness.io import atomic_torch_save, atomic_write_json, atomic_write_text, read_json

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
FORMAT_VERSION = 1


def safe_tag(text: str) -> str:
    """A file-name-safe version of a multirun job's override string."""
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", text)[:120]


_CONSISTENT_READ_ATTEMPTS = 5


def load_weights(path: Path | io.BytesIO, what: str) -> Any:
    """``torch.load`` with ``weights_only=True``, turning every failure into a StoreError."""
    label = what if isinstance(path, io.BytesIO) else f"{what} at {path}"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise StoreError(f"{what} not found at {path}") from None
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "not allowed" in str(exc):
            raise StoreError(
                f"{label} contains pickled Python objects, not just tensors; refusing to load it "
                "because unpickling could run arbitrary code",
                "only load checkpoints saved by this project (state_dicts of tensors), or re-save it as a plain state_dict",
            ) from None
        raise StoreError(f"{label} is corrupted ({exc})", "delete it and re-create it") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise StoreError(
            f"{label} is truncated or corrupted and cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})",
            "delete that file and re-run the training command that produced it",
        ) from None


class ModelStore:
    """Trained model variants for one (dataset, model) pair."""

    def __init__(self, root: str | Path, dataset: str, model: str, tag: str = "") -> None:
        self.root = Path(root).expanduser().resolve()
        self.dataset = dataset
        self.model = model
        self.tag = safe_tag(tag) if tag else ""

    # ---- paths -------------------------------------------------------------------------
    def variant_dir(self, variant: str, tagged: bool = False) -> Path:
        name = f"{variant}@{self.tag}" if tagged and self.tag else variant
        return self.root / self.dataset / self.model / name

    def has(self, variant: str, tagged: bool = False) -> bool:
        directory = self.variant_dir(variant, tagged)
        return (directory / MODEL_FILE).is_file() and (directory / META_FILE).is_file()

    def resume_dir(self, variant: str) -> Path:
        return self.variant_dir(variant, tagged=True) / "resume"

    # ---- models ------------------------------------------------------------------------
    def save(
        self,
        variant: str,
        model: nn.Module,
        info: DatasetInfo,
        model_cfg: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
        config_yaml: str | None = None,
    ) -> Path:
        """Write a trained variant; each file is replaced atomically, the weights last but one, meta last."""
        directory = self.variant_dir(variant, tagged=True)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        atomic_torch_save(state, directory / MODEL_FILE)
        if config_yaml is not None:
            atomic_write_text(directory / "config.yaml", config_yaml)
        atomic_write_json(directory / "metrics.json", dict(metrics or {}))
        # meta.json last, holding the weights' digest: a save that died half-way (new weights,
        # old meta) is detected on load instead of serving weights its metadata does not describe.
        meta = self._meta(info, model_cfg, variant)
        meta["weights_sha256"] = fingerprint.of_file(directory / MODEL_FILE)
        atomic_write_json(directory / META_FILE, meta)
        return directory

    def _meta(self, info: DatasetInfo, model_cfg: Mapping[str, Any], variant: str) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "variant": variant,
            "dataset": asdict(info),
            "model": dict(model_cfg),
        }

    def load_into(self, variant: str, model: nn.Module, info: DatasetInfo, model_cfg: Mapping[str, Any], tagged: bool = False) -> nn.Module:
        """Load a variant's weights into ``model`` after checking they belong to this dataset and model."""
        directory = self.variant_dir(variant, tagged)
        if not self.has(variant, tagged):
            raise StoreError(f"the store has no '{variant}' model for {self.dataset}/{self.model} (looked in {directory})")
        # A concurrent save (a multirun sibling retraining this variant) replaces model.pt a few
        # milliseconds before meta.json: read both again until the digest agrees, then fail.
        for attempt in range(_CONSISTENT_READ_ATTEMPTS):
            try:
                meta = read_json(directory / META_FILE)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise StoreError(f"{directory / META_FILE} is corrupted ({exc})", "delete the variant folder and retrain it") from None
            self.check_meta(meta, info, model_cfg, directory)
            data = (directory / MODEL_FILE).read_bytes()
            state = load_weights(io.BytesIO(data), f"the '{variant}' checkpoint at {directory / MODEL_FILE}")
            if meta.get("weights_sha256") in (None, fingerprint.of_bytes(data)):
                break
            time.sleep(0.05 * (attempt + 1))
        else:
            raise StoreError(
                f"the '{variant}' weights in {directory} are not the ones its meta.json describes (an interrupted save?)",
                "delete that variant folder and train it again",
            )
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise StoreError(f"{directory / MODEL_FILE} is not a state_dict of tensors", "delete it and retrain the variant")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise StoreError(
                f"the '{variant}' checkpoint in {directory} does not fit the configured model ({first})",
                "train it again with the current model config, or select the model it was trained with",
            ) from None
        return model

    @staticmethod
    def check_meta(meta: Mapping[str, Any], info: DatasetInfo, model_cfg: Mapping[str, Any], where: Path) -> None:
        saved = meta.get("dataset", {})
        problems = []
        if saved.get("name") != info.name:
            problems.append(f"it was trained on dataset '{saved.get('name')}', not '{info.name}'")
        if saved.get("num_classes") != info.num_classes:
            problems.append(f"it has {saved.get('num_classes')} classes, the dataset has {info.num_classes}")
        if tuple(saved.get("image_shape", ())) != tuple(info.image_shape):
            problems.append(f"it expects images of shape {tuple(saved.get('image_shape', ()))}, the dataset has {tuple(info.image_shape)}")
        saved_model = meta.get("model", {})
        if saved_model.get("name") != model_cfg.get("name"):
            problems.append(f"it is a '{saved_model.get('name')}' model, the config asks for '{model_cfg.get('name')}'")
        if problems:
            raise StoreError(
                f"the checkpoint in {where} does not match the configuration: " + "; ".join(problems),
                "point paths.artifacts_dir at the right store, or retrain the variant for this dataset and model",
            )

    def metrics(self, variant: str, tagged: bool = False) -> dict[str, Any]:
        path = self.variant_dir(variant, tagged) / "metrics.json"
        return read_json(path) if path.is_file() else {}

    # ---- cached tensors ----------------------------------------------------------------
    def tensors_path(self, variant: str, name: str) -> Path:
        return self.variant_dir(variant, tagged=True) / "cache" / f"{safe_tag(name)}.pt"

    def save_tensors(self, variant: str, name: str, tensors: Mapping[str, Tensor]) -> Path:
        """Cache a dict of tensors beside a variant (atomically)."""
        return atomic_torch_save({k: v.detach().cpu() for k, v in tensors.items()}, self.tensors_path(variant, name))

    def load_tensors(self, variant: str, name: str) -> dict[str, Tensor] | None:
        """A cached dict of tensors, or None when absent."""
        path = self.tensors_path(variant, name)
        if not path.is_file():
            return None
        return load_weights(path, f"cached tensors '{name}'")
