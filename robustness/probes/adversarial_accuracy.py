"""Probe ``adversarial_accuracy``: clean and robust accuracy of each variant over a list of eps.

Two kinds of attack are handled (the ``attack`` group decides):

- eps-bounded (its config has an ``eps`` key: pgd_linf, pgd_l2, fgsm): for every eps the attack
  runs again with that eps; an image counts as robust when it is classified correctly both
  clean and after the attack. With ``relative_step`` set, the attack's ``step_size`` becomes
  ``relative_step * eps`` so one config suits every radius.
- minimal-perturbation (deepfool, runner_up): the attack runs once; an image counts as robust
  at eps when it is classified correctly and the attack either failed to change its label or
  needed a perturbation of ``norm`` larger than eps.

Only correctly classified images are attacked: the others are non-robust at every eps.
Per-variant results are kept in ``ctx.work_dir`` so an interrupted run resumes per variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Any

import torch
from torch import Tensor, nn

from robustness.errors import ConfigError
from robustness.io import atomic_torch_save
from robustness.probes.base import ProbeContext, ProbeOptions, ProbeResult
from robustness.tensors import predict
from robustness.registry import build
from robustness import fingerprint
from robustness.store import load_weights
from robustness.registry import register

NORMS = ("l2", "linf")


@dataclass(frozen=True)
class Options(ProbeOptions):
    """See conf/probe/adversarial_accuracy.yaml for their meaning."""

    probe: ClassVar[str] = "adversarial_accuracy"

    eps: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.5)
    split: str = "test"
    n_images: int = 500
    batch_size: int = 256
    norm: str = "l2"
    relative_step: float | None = None

    @classmethod
    def normalise(cls, values: dict[str, Any]) -> dict[str, Any]:
        if "eps" in values:
            raw = values["eps"]
            values["eps"] = tuple(float(e) for e in (raw if isinstance(raw, (list, tuple)) else [raw]))
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
        if self.relative_step is not None and not self.relative_step > 0:
            raise ConfigError(f"probe.relative_step must be > 0, got {self.relative_step}", "e.g. probe.relative_step=0.25, or null to keep the attack's step_size")


def perturbation_norm(delta: Tensor, norm: str) -> Tensor:
    """Per-image l2 or l-infinity norm of a batch of perturbations."""
    flat = delta.flatten(1)
    return flat.norm(dim=1) if norm == "l2" else flat.abs().amax(dim=1)


def _attack_batches(attack: Any, model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> Tensor:
    """Adversarial images for ``x`` (on x's device), attacked ``batch_size`` at a time."""
    out = [attack(model, xb, yb).x_adv.detach() for xb, yb in zip(x.split(batch_size), y.split(batch_size))]
    return torch.cat(out) if out else x.clone()


def robust_masks(model: nn.Module, x: Tensor, y: Tensor, attack_cfg: dict[str, Any], options: Options) -> tuple[Tensor, Tensor, Tensor]:
    """``(correct, robust, distance)`` for one model.

    correct:  (n,) clean prediction is right
    robust:   (len(eps), n) still right under the attack at each eps
    distance: (n,) perturbation norm the minimal attack needed (inf where it failed or was not
              run); all-NaN for eps-bounded attacks
    """
    batch = int(options.batch_size)
    correct = predict(model, x, batch) == y
    robust = torch.zeros(len(options.eps), len(y), dtype=torch.bool, device=y.device)
    distance = torch.full((len(y),), float("nan"), device=x.device)
    idx = correct.nonzero().flatten()
    if "eps" in attack_cfg:
        for row, eps in enumerate(options.eps):
            if eps == 0.0 or len(idx) == 0:
                robust[row] = correct  # a zero-radius ball holds only the image itself
                continue
            cfg = {**attack_cfg, "eps": eps}
            if options.relative_step is not None and "step_size" in cfg:  # fgsm has none: its step is eps
                cfg["step_size"] = options.relative_step * eps
            x_adv = _attack_batches(build("attack", cfg), model, x[idx], y[idx], batch)
            robust[row, idx] = predict(model, x_adv, batch) == y[idx]
        return correct, robust, distance
    distance.fill_(float("inf"))
    if len(idx):
        x_adv = _attack_batches(build("attack", attack_cfg), model, x[idx], y[idx], batch)
        fooled = predict(model, x_adv, batch) != y[idx]
        norms = perturbation_norm(x_adv - x[idx], options.norm)
        distance[idx] = torch.where(fooled, norms, torch.full_like(norms, float("inf")))
    eps = torch.tensor(options.eps, device=x.device).unsqueeze(1)
    robust = correct.unsqueeze(0) & (distance.unsqueeze(0) > eps)
    return correct, robust, distance


@register("probe", "adversarial_accuracy")
def compute(ctx: ProbeContext) -> ProbeResult:
    options = Options.from_cfg(ctx.cfg)
    attack_cfg = dict(ctx.attack)
    if "name" not in attack_cfg:
        raise ConfigError("the attack config has no 'name'", "pick one with attack=pgd_linf (or deepfool, runner_up, ...)")
    x, y = ctx.data.split_tensors(options.split, limit=int(options.n_images))
    x, y = x.to(ctx.device), y.to(ctx.device)
    bounded = "eps" in attack_cfg
    norm = str(attack_cfg.get("norm", "linf" if attack_cfg["name"] in ("pgd_linf", "fgsm") else "l2")) if bounded else options.norm

    rows: list[dict[str, Any]] = []
    arrays: dict[str, Tensor] = {"eps": torch.tensor(options.eps), "labels": y.cpu()}
    for done, (variant, model) in enumerate(ctx.models.items()):
        key = fingerprint.of_config({"options": options.__dict__, "attack": attack_cfg, "variant": variant, "n": len(y)})
        partial = ctx.work_dir / f"{variant}-{key}.pt"
        if partial.is_file():
            saved = load_weights(partial, f"partial adversarial_accuracy result of '{variant}'")
        else:
            correct, robust, distance = robust_masks(model, x, y, attack_cfg, options)
            saved = {"correct": correct.cpu(), "robust": robust.cpu(), "distance": distance.cpu()}
            atomic_torch_save(saved, partial)
        clean_acc = float(saved["correct"].float().mean())
        robust_acc = saved["robust"].float().mean(dim=1)
        for eps, acc in zip(options.eps, robust_acc.tolist()):
            rows.append({"variant": variant, "eps": eps, "clean_acc": clean_acc, "robust_acc": acc})
        arrays[f"{variant}/robust_acc"] = robust_acc
        arrays[f"{variant}/correct"] = saved["correct"]
        arrays[f"{variant}/distance"] = saved["distance"]
        ctx.progress(done + 1, len(ctx.models), f"robust accuracy of {variant}")

    meta = {
        "variants": list(ctx.models),
        "attack": attack_cfg,
        "attack_kind": "eps-bounded" if bounded else "minimal perturbation",
        "norm": norm,
        "eps": list(options.eps),
        "split": options.split,
        "n_images": len(y),
        "relative_step": options.relative_step,
        "dataset": ctx.data.info.name,
    }
    return ProbeResult(probe="adversarial_accuracy", arrays=arrays, tables={"robust_accuracy": rows}, meta=meta)
