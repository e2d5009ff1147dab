"""Errors a user can act on.

Every error raised for bad input, missing data or an unusable artefact derives from
:class:`RobustnessError`. The entry point prints such errors as one readable message
(what was wrong, and how to fix it) instead of a traceback.
"""

from __future__ import annotations


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
