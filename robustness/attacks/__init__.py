"""Batched attacks in pixel space [0, 1]; all share ``attack(model, x, y=None, target=None) -> AttackResult``
and are either a :class:`MinimisationAttack` or a :class:`FixedEpsilonAttack` (see ``base``).

Probes reach attacks through the ``attack`` config group (``registry.build("attack", ...)``); the
classes are exported here for code that composes attacks directly (training, geometry).
"""

from robustness.attacks.base import AttackResult, FixedEpsilonAttack, MinimisationAttack
from robustness.attacks.deepfool import DeepFool, deepfool
from robustness.attacks.pgd import FGSM, PGD, PGDL2, PGDLinf, pgd
from robustness.attacks.runner_up import RunnerUp

__all__ = ["AttackResult", "FixedEpsilonAttack", "MinimisationAttack", "DeepFool", "deepfool", "PGDLinf", "PGDL2", "FGSM", "PGD", "pgd", "RunnerUp"]

# The remaining attack modules register themselves on import.
from robustness.attacks import autoattack, colour  # noqa: E402,F401
