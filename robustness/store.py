"""The model store: one entry per training identity, saved as a unit, loaded safely.

A trained model is identified by its *fingerprint*: the digest of everything that determines its
weights (see :func:`robustness.stages.identity.training_identity`). Layout::

    <artifacts_dir>/<dataset>/<model>/
        entries/<fingerprint>/
            current                  the name of the live version folder (replaced atomically)
            v-<time>-<pid>/          one complete save: model.pt, meta.json, config.yaml, metrics.json
            resume/last.ckpt         Lightning's checkpoint of an unfinished run of this identity
            cache/                   tensors derived from this model (an adversarial set, a teacher)
            .lock                    taken while the entry is trained or saved
        aliases.json                 variant name (``base``, ``cure@optim.lr=0.001``) -> fingerprint
        probes/<probe>-<key>/        probe results (partial and final)

Saving writes a new version folder completely, then switches ``current`` to it with one
``os.replace``: a reader sees the old complete model or the new complete one, and a save killed
half-way leaves the old one live. A save the machine refuses (full disk, file-size limit, a
read-only mount) removes its version folder and raises ``WriteError``; the old one stays live. ``meta.json`` holds the weights' digest, so a version whose
files disagree (copied by hand, say) is refused on load.

Aliases are for people and for error messages: a probe finds its models by fingerprint, computed
from the config that would train them, so two trainings with different configs never share an
entry and a probe never loads weights trained with other options.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import time
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from filelock import FileLock
from torch import Tensor, nn

from robustness import fingerprint
from robustness.data.base import DatasetInfo
from robustness.errors import StoreError
from robustness.io import atomic_torch_save, atomic_write_json, atomic_write_text, read_json, write_error

MODEL_FILE = "model.pt"
META_FILE = "meta.json"
CURRENT_FILE = "current"
ALIASES_FILE = "aliases.json"
FORMAT_VERSION = 2
_META_FIELDS = {"format": int, "variant": str, "fingerprint": str, "dataset": dict, "model": dict, "weights_sha256": str}
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


def check_finite_state(state: Mapping[str, Tensor], what: str) -> None:
    """Refuse weights holding NaN or infinite values, naming the first such tensor."""
    for name, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise StoreError(
                f"{what} hold {bad} NaN or infinite value(s) in '{name}'",
                "the training diverged: lower optim.lr (or the regularizer's weight) and train again",
            )


def fit_state(model: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """``model.load_state_dict(state)``, with a mismatch named by its first key and both shapes."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        first = missing[0] if missing else unexpected[0]
        raise StoreError(
            f"{what} do not fit the configured model: {len(missing)} key(s) missing, {len(unexpected)} unexpected (first: '{first}')",
            "select the model config they were trained with, or train them again for this one",
        )
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise StoreError(
                f"{what} do not fit the configured model: '{key}' has shape {tuple(state[key].shape)} in the file "
                f"and {tuple(value.shape)} in the model",
                "select the model config they were trained with, or train them again for this one",
            )
    model.load_state_dict(state)


class ModelStore:
    """The store's entries for one (dataset, model) pair."""

    def __init__(self, root: str | Path, dataset: str, model: str, writer: bool = True) -> None:
        self.root = Path(root).expanduser().resolve()
        self.dataset = dataset
        self.model = model
        # False for the ranks of a DDP training other than rank 0: they read, rank 0 writes.
        self.writer = writer

    def reader(self) -> "ModelStore":
        """The same store, for a process that must never write to it."""
        return ModelStore(self.root, self.dataset, self.model, writer=False)

    def _check_writer(self, what: str) -> None:
        if not self.writer:
            raise StoreError(f"a process that only reads the store tried to {what} (DDP ranks other than 0 never write)",
                             "report this: only rank 0 of a training saves")

    # ---- paths -------------------------------------------------------------------------
    @property
    def folder(self) -> Path:
        return self.root / self.dataset / self.model

    def entry_dir(self, key: str) -> Path:
        return self.folder / "entries" / key

    def version_dir(self, key: str) -> Path | None:
        """The live version folder of an entry, or None when the entry has no complete save."""
        pointer = self.entry_dir(key) / CURRENT_FILE

        def read_pointer() -> str | None:
            try:
                return pointer.read_text(encoding="utf-8").strip()
            except (FileNotFoundError, NotADirectoryError):
                return None

        name = read_pointer()
        # A concurrent save can retire the version we were pointed at between the two reads; the
        # pointer then names a newer, complete one, so follow it rather than report "no model".
        for _ in range(_CONSISTENT_READ_ATTEMPTS):
            if not name or "/" in name:
                return None
            directory = self.entry_dir(key) / name
            if (directory / MODEL_FILE).is_file() and (directory / META_FILE).is_file():
                return directory
            again = read_pointer()
            if again == name:
                return None
            name = again
        return None

    def has(self, key: str) -> bool:
        return self.version_dir(key) is not None

    def resume_dir(self, key: str) -> Path:
        return self.entry_dir(key) / "resume"

    def probes_dir(self) -> Path:
        return self.folder / "probes"

    def lock(self, key: str) -> FileLock:
        """The lock one process holds while it trains or saves an entry (others wait, then reuse it)."""
        path = self.entry_dir(key) / ".lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(path))

    # ---- aliases -----------------------------------------------------------------------
    def aliases(self) -> dict[str, str]:
        path = self.folder / ALIASES_FILE
        try:
            data = read_json(path)
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            return {}  # a damaged index only loses names; entries stay reachable by fingerprint
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def set_alias(self, name: str, key: str) -> None:
        self._check_writer(f"name '{name}'")
        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.folder / f".{ALIASES_FILE}.lock")):
            aliases = self.aliases()
            aliases[name] = key
            atomic_write_json(self.folder / ALIASES_FILE, aliases)

    # ---- models ------------------------------------------------------------------------
    def save(
        self,
        key: str,
        model: nn.Module | Mapping[str, Tensor],
        info: DatasetInfo,
        model_cfg: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
        config_yaml: str | None = None,
        *,
        variant: str | None = None,
        identity: Mapping[str, Any] | None = None,
        source: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write a complete new version of entry ``key``, then make it the live one.

        ``identity`` is what the fingerprint ``key`` was computed from (kept for diffs in error
        messages), ``source`` where weights not trained here came from.
        """
        self._check_writer(f"save '{variant or key}'")
        raw = model.state_dict() if isinstance(model, nn.Module) else model
        state = {k: v.detach().cpu().clone() for k, v in raw.items()}
        check_finite_state(state, f"the weights of '{variant or key}'")
        entry = self.entry_dir(key)
        name = f"v-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}-{os.getpid()}"
        version = entry / name
        try:
            version.mkdir(parents=True)
        except OSError as exc:
            raise (write_error(exc, version) or exc) from None
        try:
            atomic_torch_save(state, version / MODEL_FILE)
            if config_yaml is not None:
                atomic_write_text(version / "config.yaml", config_yaml)
            atomic_write_json(version / "metrics.json", dict(metrics or {}))
            meta = {
                "format": FORMAT_VERSION,
                "variant": variant or key,
                "fingerprint": key,
                "dataset": asdict(info),
                "model": dict(model_cfg),
                "weights_sha256": fingerprint.of_file(version / MODEL_FILE),
                "identity": dict(identity or {}),
                "source": dict(source or {}),
            }
            atomic_write_json(version / META_FILE, meta)
            previous = self.version_dir(key)
            atomic_write_text(entry / CURRENT_FILE, name + "\n")
        except BaseException:
            shutil.rmtree(version, ignore_errors=True)
            raise
        if previous is not None and previous != version:
            shutil.rmtree(previous, ignore_errors=True)
        return version

    def meta(self, key: str) -> dict[str, Any]:
        directory = self._live(key)
        return self._read_meta(directory)

    def _live(self, key: str) -> Path:
        directory = self.version_dir(key)
        if directory is None:
            raise StoreError(f"the store has no model {key} for {self.dataset}/{self.model} (looked in {self.entry_dir(key)})")
        return directory

    @staticmethod
    def _read_meta(directory: Path) -> dict[str, Any]:
        path = directory / META_FILE
        try:
            meta = read_json(path)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{path} is corrupted ({exc})", "delete the entry's folder and train the model again") from None
        problems = [] if isinstance(meta, dict) else [f"it holds a {type(meta).__name__}, not an object"]
        if not problems:
            for field, kind in _META_FIELDS.items():
                if not isinstance(meta.get(field), kind) or isinstance(meta.get(field), bool):
                    problems.append(f"'{field}' should be a {kind.__name__}, found {type(meta.get(field)).__name__}")
        if problems:
            raise StoreError(f"{path} is not a model description this project wrote: " + "; ".join(problems),
                             "delete the entry's folder and train the model again")
        return meta

    def load_into(self, key: str, model: nn.Module, info: DatasetInfo, model_cfg: Mapping[str, Any], what: str | None = None) -> nn.Module:
        """Load entry ``key``'s weights into ``model`` after checking they belong to this dataset and model."""
        label = what or f"the '{key}' weights"
        # A concurrent save switches 'current' between our reads: read again until the digest agrees.
        for attempt in range(_CONSISTENT_READ_ATTEMPTS):
            directory = self._live(key)
            try:
                meta = self._read_meta(directory)
                data = (directory / MODEL_FILE).read_bytes()
            except FileNotFoundError:  # replaced and removed by a concurrent save
                time.sleep(0.05 * (attempt + 1))
                continue
            self.check_meta(meta, info, model_cfg, directory)
            if meta["weights_sha256"] == fingerprint.of_bytes(data):
                break
            time.sleep(0.05 * (attempt + 1))
        else:
            # Say what is wrong with the file when it can be told (truncated, pickled code), else that it was replaced.
            load_weights(io.BytesIO(data), f"{label} at {directory / MODEL_FILE}")
            raise StoreError(
                f"{label} in {directory} are not the ones its meta.json describes (a hand-copied or damaged file?)",
                "delete that entry's folder and train the model again",
            )
        state = load_weights(io.BytesIO(data), f"{label} at {directory / MODEL_FILE}")
        if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
            raise StoreError(f"{directory / MODEL_FILE} is not a state_dict of tensors", "delete the entry and train the model again")
        check_finite_state(state, label)
        fit_state(model, state, f"{label} in {directory}")
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
        else:
            differing = [k for k in sorted(set(saved_model) | set(model_cfg)) if saved_model.get(k) != model_cfg.get(k)]
            if differing:
                key = differing[0]
                problems.append(f"it was built with model.{key}={saved_model.get(key)!r}, the config asks for {model_cfg.get(key)!r}")
        if problems:
            raise StoreError(
                f"the checkpoint in {where} does not match the configuration: " + "; ".join(problems),
                "point paths.artifacts_dir at the right store, or train the model for this dataset and model config",
            )

    def metrics(self, key: str) -> dict[str, Any]:
        directory = self.version_dir(key)
        path = directory / "metrics.json" if directory else None
        return read_json(path) if path is not None and path.is_file() else {}

    def entries(self) -> Iterator[str]:
        root = self.folder / "entries"
        if root.is_dir():
            for child in sorted(root.iterdir()):
                if self.has(child.name):
                    yield child.name

    def record_external(self, key: str, variant: str, source: Mapping[str, Any]) -> Path:
        """Record a published model a run used (its source and weights digest); its weights stay in their own file."""
        self._check_writer(f"record '{variant}'")
        path = self.entry_dir(key) / "external.json"
        atomic_write_json(path, {"format": FORMAT_VERSION, "variant": variant, "fingerprint": key, "source": dict(source)})
        self.set_alias(variant, key)
        return path

    # ---- cached tensors ----------------------------------------------------------------
    def tensors_path(self, key: str, name: str) -> Path:
        return self.entry_dir(key) / "cache" / f"{name}.pt"

    def save_tensors(self, key: str, name: str, tensors: Mapping[str, Tensor]) -> Path:
        """Cache a dict of tensors beside an entry (atomically); a reader keeps them to itself."""
        if not self.writer:
            return self.tensors_path(key, name)
        return atomic_torch_save({k: v.detach().cpu() for k, v in tensors.items()}, self.tensors_path(key, name))

    def load_tensors(self, key: str, name: str) -> dict[str, Tensor] | None:
        """A cached dict of tensors, or None when absent or unreadable (it is then rebuilt)."""
        path = self.tensors_path(key, name)
        if not path.is_file():
            return None
        try:
            return load_weights(path, f"cached tensors '{name}'")
        except StoreError:
            return None
