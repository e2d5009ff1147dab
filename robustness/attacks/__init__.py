"""Batched attacks in pixel space [0, 1]; all share ``(model, x, y) -> AttackResult``.

Probes reach attacks through the ``attack`` config group (``registry.build("attack", ...)``); the
classes are exported here for code that composes attacks directly (training, geometry).
"""

from robustness.attacks.base import AttackResult
from robustness.attacks.deepfool import DeepFool, deepfool
from robustness.attacks.pgd import FGSM, PGDL2, PGDLinf, pgd
from robustness.attacks.runner_up import RunnerUp

__all__ = ["AttackResult", "DeepFool", "deepfool", "PGDLinf", "PGDL2", "FGSM", "pgd", "RunnerUp"]
