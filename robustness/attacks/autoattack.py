"""``attack=autoattack``: AutoAttack (Croce and Hein, ICML 2020) through its reference implementation.

The ensemble (standard version: APGD-CE, targeted APGD-DLR, targeted FAB, Square) comes from the
authors' package ``pyautoattack`` (the PyPI release of github.com/fra31/auto-attack), imported
only when the attack is built, so the project runs without it; install it with the optional
extra ``autoattack``. It is a fixed-epsilon attack in the l-inf or l2 ball, untargeted only
(the ensemble chooses its own target classes), and it keeps the clean image wherever no
component attack succeeds, so the base's success decision is exactly AutoAttack's own.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from robustness.attacks.base import FixedEpsilonAttack, Perturbed, check_attack_classes, check_nonnegative, clean_label
from robustness.errors import ConfigError, InputError
from robustness.registry import register

NORMS = {"linf": "Linf", "l2": "L2"}
VERSIONS = ("standard", "plus", "rand", "custom")
COMPONENTS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
INSTALL_HINT = 'pip install -e ".[autoattack]" (or: pip install pyautoattack)'


def _reference() -> Any:
    try:
        import pyautoattack
    except ImportError:
        raise ConfigError("attack=autoattack needs the package pyautoattack, which is not installed", INSTALL_HINT) from None
    return pyautoattack


@register("attack", "autoattack")
@dataclass
class AutoAttack(FixedEpsilonAttack):
    """``attack=autoattack``: the reference AutoAttack ensemble at radius ``eps`` in ``norm``.

    ``steps`` is 0 for every image: the reference implementation does not report iterations.
    """

    eps: float = 8 / 255
    norm: str = "linf"
    version: str = "standard"
    seed: int = 0
    batch_size: int = 500
    attacks: tuple[str, ...] | None = None  # version=custom only: which components run, in order

    def __post_init__(self) -> None:
        check_nonnegative("eps", self.eps)
        if self.norm not in NORMS:
            raise ConfigError(f"unknown attack.norm '{self.norm}' for autoattack", f"choose one of: {', '.join(NORMS)}")
        if self.version not in VERSIONS:
            raise ConfigError(f"unknown attack.version '{self.version}'", f"choose one of: {', '.join(VERSIONS)}")
        if self.attacks is not None:
            self.attacks = tuple(str(a) for a in self.attacks)
            unknown = [a for a in self.attacks if a not in COMPONENTS]
            if unknown or not self.attacks:
                raise ConfigError(f"unknown AutoAttack component(s) {unknown or '(none given)'}", f"choose among: {', '.join(COMPONENTS)}")
        if (self.version == "custom") != (self.attacks is not None):
            raise ConfigError(
                "attack.attacks goes with attack.version=custom, and only with it",
                "e.g. attack.version=custom 'attack.attacks=[apgd-ce,apgd-t]', or attack.version=standard attack.attacks=null",
            )
        if int(self.batch_size) != self.batch_size or self.batch_size < 1:
            raise ConfigError(f"attack.batch_size must be a positive integer, got {self.batch_size}", "e.g. attack.batch_size=500")
        _reference()  # a missing package is a config error now, not a failure after training

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor | None, target: Tensor | None) -> Perturbed:
        if target is not None:
            raise InputError(
                "autoattack is untargeted: its ensemble picks its own target classes",
                "call it without target, or use a targeted attack such as pgd_linf or deepfool",
            )
        with torch.no_grad():
            logits = torch.cat([model(chunk) for chunk in x.split(self.batch_size)])
        check_attack_classes(model, x, y, None, logits.shape[1])
        label = clean_label(logits, y)
        runner = _reference().AutoAttack(
            model,
            attacks=None if self.attacks is None else list(self.attacks),
            eps=float(self.eps),
            norm=NORMS[self.norm],
            seed=self.seed,
            version=self.version,
            device=x.device,
        )
        with _frozen(model), _quiet():
            x_adv, _ = runner.run_standard_evaluation(x, label, batch_size=int(self.batch_size))
        steps = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return Perturbed(x_adv.detach().clamp_(0.0, 1.0), steps, label)


@contextlib.contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """The reference FAB calls .backward(): frozen weights keep gradients out of the model."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The reference logs every sub-attack at debug and its sanity checks at warning level;
    keep them out of the run's log unless its logger was configured on purpose."""
    logger = logging.getLogger("auto-attack")
    level = logger.level
    if level == logging.NOTSET:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
