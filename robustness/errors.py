"""Errors a user can act on.

Every error raised for bad input, missing data or an unusable artefact derives from
:class:`RobustnessError`. The entry point prints such errors as one readable message
(what was wrong, and how to fix it) instead of a traceback.
"""

from __future__ import annotations

import difflib
import re


class RobustnessError(Exception):
    """Base class: a problem the user can fix; ``hint`` says how."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  fix: {hint}")


class ConfigError(RobustnessError, ValueError):
    """A configuration value is invalid (wrong range, wrong type, unknown name)."""


class NotApplicableError(ConfigError):
    """A probe does not apply to this data or model (a hue rotation of greyscale images): an
    error when the probe is run on its own, a section marked "not run" with the reason in a report."""


class DataError(RobustnessError):
    """A dataset is missing, incomplete or malformed on disk."""


class StoreError(RobustnessError):
    """A model or artefact in the store is missing, corrupted or does not match the config."""


class InputError(RobustnessError, ValueError):
    """Tensors handed to an attack, estimator or probe are not valid inputs."""


class WriteError(RobustnessError):
    """A file could not be written: the disk is full, a size limit was reached, permission was lost."""


class TrainingError(RobustnessError):
    """Training cannot continue (for example: too many consecutive non-finite losses)."""


def require(condition: bool, message: str, hint: str | None = None, kind: type[RobustnessError] = ConfigError) -> None:
    """Raise ``kind(message, hint)`` unless ``condition`` holds."""
    if not condition:
        raise kind(message, hint)


def composition_error(exc: Exception) -> ConfigError:
    """What Hydra or OmegaConf could not compose from the overrides given (a misspelt experiment,
    group option or key, an override that cannot be parsed), as our error and fix: the command
    line and :func:`robustness.run` say the same."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and exc.options:
        group, _, name = exc.missing_cfg_file.rpartition("/")
        close = difflib.get_close_matches(name, list(exc.options), n=1)
        hint = f"did you mean {group}={close[0]}? " if close else ""
        if group == "experiment":  # names like base_digits: one variant is trained by one experiment
            hint += "one variant trains with experiment=train regularizer=NAME recipe=DATASET; or "
        return ConfigError(f"there is no {group or 'config'} '{name}'", f"{hint}choose among: {', '.join(exc.options)}")
    text = str(exc).strip()
    cause = str(exc.__cause__).strip() if exc.__cause__ is not None else ""
    unknown = re.match(r"Could not override '([^']+)'", text)
    if unknown and "not in struct" in cause:
        key = unknown.group(1)
        return ConfigError(f"{key} is not a setting of this run",
                           f"check its spelling (add --cfg job to the command to print every setting); to add a new key, write +{key}=...")
    if isinstance(exc, OverrideParseException):
        return ConfigError(f"cannot read the command line: {text.splitlines()[0]}",
                           "write key=value, and quote values that hold brackets, commas or spaces, e.g. 'probe.eps=[0.0,0.1]'")
    detail = " ".join(line.strip() for line in [*text.splitlines(), *cause.splitlines()] if line.strip())
    return ConfigError(f"the configuration cannot be composed: {detail}",
                       "check the overrides against python -m robustness --help (groups and their options) and --cfg job (every setting)")
