"""Probe ``robust_accuracy``: clean and robust accuracy of each variant over a list of eps.

Two kinds of attack are handled, told apart by type (:mod:`robustness.attacks.base`):

- fixed-epsilon (:class:`FixedEpsilonAttack`: pgd_linf, pgd_l2, fgsm, colour, autoattack): for
  every eps the attack runs again at that radius (``attack.with_eps``); an image counts as robust
  when it is classified correctly clean and the attack did not succeed. With ``relative_step``
  set, attacks with a step size take ``relative_step * eps`` so one config suits every radius.
- minimisation (:class:`MinimisationAttack`: deepfool, runner_up): the attack runs once; an image
  counts as robust at eps when it is classified correctly and the attack either failed or needed
  a perturbation of ``norm`` larger than eps.

``extra_attacks`` lists fixed-epsilon attacks reported beside the main one at the same radii
(RobustBench reports AutoAttack beside PGD): each row names its attack.

Only correctly classified images are attacked: the others are non-robust at every eps.
Per-variant results are kept in ``ctx.work_dir`` so an interrupted run resumes per variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor, nn

from robustness.attacks.base import Attack, AttackResult, FixedEpsilonAttack
from robustness.errors import ConfigError
from robustness.io import atomic_torch_save
from robustness.probes.base import ProbeContext, ProbeOptions, ProbeResult
from robustness.tensors import inference_copy, predict
from robustness.registry import build
from robustness import fingerprint
from robustness.store import load_weights
from robustness.registry import register

NORMS = ("l2", "linf")


@dataclass(frozen=True)
class Options(ProbeOptions):
    """See conf/probe/robust_accuracy.yaml for their meaning."""

    probe: ClassVar[str] = "robust_accuracy"

    eps: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5)
    split: str = "test"
    n_images: int = 500
    batch_size: int = 256
    norm: str = "l2"
    relative_step: float | None = None
    extra_attacks: tuple[dict[str, Any], ...] = ()

    @classmethod
    def normalise(cls, values: dict[str, Any]) -> dict[str, Any]:
        if "eps" in values:
            raw = values["eps"]
            values["eps"] = tuple(float(e) for e in (raw if isinstance(raw, (list, tuple)) else [raw]))
        if "extra_attacks" in values:
            raw = values["extra_attacks"]
            if not isinstance(raw, (list, tuple)) or not all(isinstance(node, Mapping) for node in raw):
                raise ConfigError(
                    "probe.extra_attacks must be a list of attack configs",
                    "e.g. probe.extra_attacks='[{name: autoattack}]'",
                )
            values["extra_attacks"] = tuple(dict(node) for node in raw)
        return values

    def validate(self) -> None:
        if not self.eps:
            raise ConfigError("probe.eps is empty", "give a list of radii, e.g. probe.eps=[0,0.1,0.2]")
        bad = [e for e in self.eps if not e >= 0]
        if bad:
            raise ConfigError(f"probe.eps must be >= 0, got {bad[0]}", "give non-negative radii, e.g. probe.eps=[0,0.1,0.2]")
        if int(self.n_images) <= 0:
            raise ConfigError(f"probe.n_images must be positive, got {self.n_images}", "e.g. probe.n_images=500")
        if int(self.batch_size) <= 0:
            raise ConfigError(f"probe.batch_size must be positive, got {self.batch_size}", "e.g. probe.batch_size=256")
        if self.norm not in NORMS:
            raise ConfigError(f"unknown probe.norm '{self.norm}'", f"choose one of: {', '.join(NORMS)}")
        for node in self.extra_attacks:
            if "name" not in node:
                raise ConfigError("an entry of probe.extra_attacks has no 'name'", "e.g. probe.extra_attacks='[{name: autoattack}]'")
        if self.relative_step is not None and not self.relative_step > 0:
            raise ConfigError(f"probe.relative_step must be > 0, got {self.relative_step}", "e.g. probe.relative_step=0.25, or null to keep the attack's step_size")


def perturbation_norm(delta: Tensor, norm: str) -> Tensor:
    """Per-image l2 or l-infinity norm of a batch of perturbations."""
    flat = delta.flatten(1)
    return flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)


def _attack_batches(attack: Attack, model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> AttackResult:
    """The attack on ``x`` (results on x's device), ``batch_size`` images at a time."""
    # The attack runs on a folded copy of the model: the same function, faster (tensors.inference_copy).
    folded = inference_copy(model, x[:1], for_gradients=True) if len(x) else model
    parts = [attack(folded, xb, yb).detach() for xb, yb in zip(x.split(batch_size), y.split(batch_size))]
    if not parts:
        return AttackResult.unattacked(x)
    return AttackResult(*(torch.cat([getattr(p, f) for p in parts]) for f in ("x_adv", "success", "norm", "steps")))


def robust_masks(model: nn.Module, x: Tensor, y: Tensor, attack: Attack, options: Options) -> tuple[Tensor, Tensor, Tensor]:
    """``(correct, robust, distance)`` for one model.

    correct:  (n,) clean prediction is right
    robust:   (len(eps), n) still right under the attack at each eps
    distance: (n,) perturbation norm the minimisation attack needed (inf where it failed or was
              not run); all-NaN for fixed-epsilon attacks
    """
    batch = int(options.batch_size)
    correct = predict(model, x, batch) == y
    robust = torch.zeros(len(options.eps), len(y), dtype=torch.bool, device=y.device)
    distance = torch.full((len(y),), float("nan"), device=x.device)
    idx = correct.nonzero().flatten()
    if isinstance(attack, FixedEpsilonAttack):
        for row, eps in enumerate(options.eps):
            if eps == 0.0 or len(idx) == 0:
                robust[row] = correct  # a zero-radius ball holds only the image itself
                continue
            result = _attack_batches(attack.with_eps(eps, options.relative_step), model, x[idx], y[idx], batch)
            robust[row, idx] = ~result.success.to(y.device)
        return correct, robust, distance
    distance.fill_(float("inf"))
    if len(idx):
        result = _attack_batches(attack, model, x[idx], y[idx], batch)
        norms = perturbation_norm(result.x_adv - x[idx], options.norm)
        distance[idx] = torch.where(result.success.to(norms.device), norms, torch.full_like(norms, float("inf")))
    eps = torch.tensor(options.eps, device=x.device).unsqueeze(1)
    robust = correct.unsqueeze(0) & (distance.unsqueeze(0) > eps)
    return correct, robust, distance


def _build_attacks(main: dict[str, Any], options: Options) -> dict[str, tuple[dict[str, Any], Attack]]:
    """Attack label -> (config, attack): the ``attack`` group's first, then ``extra_attacks``."""
    attacks: dict[str, tuple[dict[str, Any], Attack]] = {}
    for position, cfg in enumerate([main, *options.extra_attacks]):
        attack = build("attack", cfg)
        if not isinstance(attack, Attack):
            raise ConfigError(f"attack '{cfg['name']}' is not an attack of robustness.attacks.base", "use one of the attack group")
        label = str(cfg["name"])
        if position and not isinstance(attack, FixedEpsilonAttack):
            raise ConfigError(
                f"probe.extra_attacks entry '{label}' is a minimisation attack",
                "extra attacks run at the probe's eps: list fixed-epsilon ones (pgd_linf, pgd_l2, fgsm, autoattack)",
            )
        if label in attacks:
            raise ConfigError(f"attack '{label}' is listed twice", "drop the duplicate from probe.extra_attacks")
        attacks[label] = (cfg, attack)
    return attacks


def _norm_of(attack: Attack, options: Options) -> str:
    return attack.norm if isinstance(attack, FixedEpsilonAttack) else options.norm


@register("probe", "robust_accuracy")
def compute(ctx: ProbeContext) -> ProbeResult:
    options = Options.from_cfg(ctx.options)
    attack_cfg = dict(ctx.attack)
    if "name" not in attack_cfg:
        raise ConfigError("the attack config has no 'name'", "pick one with attack=pgd_linf (or deepfool, runner_up, ...)")
    attacks = _build_attacks(attack_cfg, options)  # every config error before any work
    x, y = ctx.data.split_tensors(options.split, limit=int(options.n_images))
    x, y = x.to(ctx.device), y.to(ctx.device)

    rows: list[dict[str, Any]] = []
    arrays: dict[str, Tensor] = {"eps": torch.tensor(options.eps), "labels": y.cpu()}
    for done, (variant, model) in enumerate(ctx.models.items()):
        for label, (cfg, attack) in attacks.items():
            key = fingerprint.of_config({"options": options.__dict__, "attack": cfg, "variant": variant, "n": len(y)})
            partial = ctx.work_dir / f"{variant}-{label}-{key}.pt"
            if partial.is_file():
                saved = load_weights(partial, f"partial robust_accuracy result of '{variant}' under {label}")
            else:
                correct, robust, distance = robust_masks(model, x, y, attack, options)
                saved = {"correct": correct.cpu(), "robust": robust.cpu(), "distance": distance.cpu()}
                atomic_torch_save(saved, partial)
            clean_acc = float(saved["correct"].float().mean())
            robust_acc = saved["robust"].float().mean(dim=1)
            for eps, acc in zip(options.eps, robust_acc.tolist()):
                rows.append({"variant": variant, "attack": label, "eps": eps, "clean_acc": clean_acc, "robust_acc": acc})
            # The main attack keeps the array names it always had; extra attacks are prefixed.
            prefix = variant if label == attack_cfg["name"] else f"{variant}/{label}"
            arrays[f"{prefix}/robust_acc"] = robust_acc
            arrays[f"{prefix}/correct"] = saved["correct"]
            arrays[f"{prefix}/distance"] = saved["distance"]
        ctx.progress(done + 1, len(ctx.models), f"robust accuracy of {variant}")

    main = attacks[attack_cfg["name"]][1]
    meta = {
        "variants": list(ctx.models),
        "attack": attack_cfg,
        "attack_kind": "fixed epsilon" if isinstance(main, FixedEpsilonAttack) else "minimisation",
        "norm": _norm_of(main, options),
        "attacks": {label: {"config": cfg, "norm": _norm_of(attack, options)} for label, (cfg, attack) in attacks.items()},
        "eps": list(options.eps),
        "split": options.split,
        "n_images": len(y),
        "relative_step": options.relative_step,
        "dataset": ctx.data.info.name,
    }
    return ProbeResult(probe="robust_accuracy", arrays=arrays, tables={"robust_accuracy": rows}, meta=meta)
