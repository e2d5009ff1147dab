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
Each model's finished attacks are kept (:mod:`robustness.probes.partial`), so an interrupted run resumes per model and attack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from robustness import fingerprint
from robustness.attacks.base import Attack, AttackResult, FixedEpsilonAttack
from robustness.errors import ConfigError
from robustness.probes.base import (
    Progress,
    ProbeContext,
    ProbeOptions,
    ProbeResult,
    attack_node,
    fitted,
    no_progress,
    prepare_inputs,
    probe_options,
    run_seed,
    seeded,
)
from robustness.probes.memory import LONG, MemoryNeed, attack_gradient_rows, gradient_bytes, image_bytes, size_text
from robustness.probes.partial import PartialResults
from robustness.probes.per_image import first, load_images
from robustness.registry import build, register
from robustness.tensors import inference_copy, predict

NORMS = ("l2", "linf")


@probe_options("robust_accuracy")
class RobustAccuracyOptions(ProbeOptions):
    """See conf/probe/robust_accuracy.yaml for their meaning."""

    eps: tuple[float, ...]
    split: str
    n_images: int
    batch_size: int
    norm: str
    relative_step: float | None
    extra_attacks: tuple[dict[str, Any], ...]

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

    def memory_need(self, image_shape: Sequence[int], num_classes: int, activation: int, num_images: int | None,
                    gradient_rows: int = 1) -> MemoryNeed:
        held = int(self.n_images) if num_images is None else int(num_images)
        # The images and one attacked copy of them, the masks per radius; a batch through the attack.
        per_image = 2 * image_bytes(image_shape) + (len(self.eps) + 2) * LONG
        return MemoryNeed(
            fixed=held * per_image,
            per_item=gradient_bytes(image_shape, activation, min(int(gradient_rows), max(1, num_classes - 1))),
            batch=int(self.batch_size),
            batch_key="batch_size",
            fixed_what=f"{held} images of shape {tuple(image_shape)}",
            fixed_fix=lambda usable: f"attack fewer images (probe.n_images); {size_text(usable)} can hold about {usable // max(1, per_image)}",
        )


class RobustAccuracyResult(ProbeResult):
    """``rows``: per model, attack and radius the clean and the robust accuracy; :meth:`curve`: a
    model's robust accuracy per radius (``eps``) under the main attack."""

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.tables["robust_accuracy"]

    def curve(self, model: str = "model") -> tuple[Tensor, Tensor]:
        return self.arrays["eps"], self.arrays[f"{model}/robust_acc"]


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


def robust_masks(model: nn.Module, x: Tensor, y: Tensor, attack: Attack, options: RobustAccuracyOptions) -> tuple[Tensor, Tensor, Tensor]:
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


def _build_attacks(main: dict[str, Any], options: RobustAccuracyOptions) -> dict[str, tuple[dict[str, Any], Attack]]:
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


def _norm_of(attack: Attack, options: RobustAccuracyOptions) -> str:
    return attack.norm if isinstance(attack, FixedEpsilonAttack) else options.norm


def robust_accuracy(models: Any, images: Tensor, labels: Tensor, *, attack: str | dict[str, Any] | None = None, dataset: str = "images",
                    seed: int | None = None, cache_dir: str | Path | None = None, progress: Progress = no_progress, **options: Any) -> RobustAccuracyResult:
    """Clean and robust accuracy of each model on the first ``n_images`` images at every radius in ``eps``.

    attack: any attack of the ``attack`` group, by name or as a node (default: ``conf/config.yaml``'s,
            deepfool; ``experiment=robust_accuracy`` uses pgd_linf). Fixed-epsilon attacks run at
            each radius, a minimisation attack once.
    options: those of ``conf/probe/robust_accuracy.yaml`` (its values are the defaults).
    seed: seeds attacks with a random start (default: ``conf/config.yaml``'s seed).
    cache_dir: where each model's finished attacks are kept (None: nothing is kept).
    """
    settings = RobustAccuracyOptions.from_cfg(options)
    attack_cfg = attack_node(attack)
    attacks = _build_attacks(attack_cfg, settings)  # every config error before any work
    named, x, y, classes = prepare_inputs(models, images, labels)
    x, y = first(x, y, settings.n_images)
    settings = fitted(settings, named, x, classes, gradient_rows=attack_gradient_rows(attack_cfg))
    rows: list[dict[str, Any]] = []
    arrays: dict[str, Tensor] = {"eps": torch.tensor(settings.eps), "labels": y.cpu()}
    # The batch only splits the work: it does not name the partial results.
    identity = {k: v for k, v in settings.as_dict().items() if k != "batch_size"}
    with seeded(run_seed(seed), x.device):
        for done, (variant, model) in enumerate(named.items()):
            parts = PartialResults(None if cache_dir is None else Path(cache_dir), "robust_accuracy", {
                "options": identity, "attacks": [cfg for cfg, _ in attacks.values()], "images": fingerprint.of_tensors(x, y), "model": fingerprint.of_state(model),
            })
            for label, (cfg, attack_fn) in attacks.items():
                def measure(attack_fn: Attack = attack_fn) -> dict[str, Tensor]:
                    correct, robust, distance = robust_masks(model, x, y, attack_fn, settings)
                    return {"correct": correct, "robust": robust, "distance": distance}

                saved = parts.get(label, measure)
                clean_acc = float(saved["correct"].float().mean())
                robust_acc = saved["robust"].float().mean(dim=1)
                for eps, acc in zip(settings.eps, robust_acc.tolist()):
                    rows.append({"variant": variant, "attack": label, "eps": eps, "clean_acc": clean_acc, "robust_acc": acc})
                # The main attack keeps the array names it always had; extra attacks are prefixed.
                prefix = variant if label == attack_cfg["name"] else f"{variant}/{label}"
                arrays[f"{prefix}/robust_acc"] = robust_acc
                arrays[f"{prefix}/correct"] = saved["correct"]
                arrays[f"{prefix}/distance"] = saved["distance"]
            progress(done + 1, len(named), f"robust accuracy of {variant}")

    main = attacks[attack_cfg["name"]][1]
    meta = {
        "variants": list(named),
        "attack": attack_cfg,
        "attack_kind": "fixed epsilon" if isinstance(main, FixedEpsilonAttack) else "minimisation",
        "norm": _norm_of(main, settings),
        "attacks": {label: {"config": cfg, "norm": _norm_of(attack_fn, settings)} for label, (cfg, attack_fn) in attacks.items()},
        "eps": list(settings.eps),
        "split": settings.split,
        "n_images": len(y),
        "relative_step": settings.relative_step,
        "dataset": dataset,
    }
    return RobustAccuracyResult(probe="robust_accuracy", arrays=arrays, tables={"robust_accuracy": rows}, meta=meta)


@register("probe", "robust_accuracy", options=RobustAccuracyOptions)
def compute(ctx: ProbeContext) -> ProbeResult:
    options = RobustAccuracyOptions.from_cfg(ctx.options)
    x, y = load_images(ctx, options.split, options.n_images)
    return robust_accuracy(ctx.models, x, y, attack=ctx.attack, dataset=ctx.data.info.name, **ctx.common(), **ctx.options)
