"""Probe ``min_perturbation``: the second column of the report's Table 1.

For each of the first ``num_images`` test images (the same images for every model) the
smallest l2 perturbation ``r`` found that changes the model's *predicted* label: the ``attack``
group (DeepFool in the experiments) gives ``r = x_adv - x``, then ``refine_steps`` bisection
steps along ``r`` shrink it to the smallest scale ``t r`` (``t`` in (0, 1]) whose label still
differs. Every image counts, correctly classified or not, so every model is measured on the
same images; an image whose attack fails has no perturbation (NaN) and is left out of the means,
which the table's ``found`` column counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from robustness import fingerprint
from robustness.attacks.base import Attack, MinimisationAttack
from robustness.errors import ConfigError, InputError
from robustness.probes.base import (
    Progress,
    ProbeContext,
    ProbeResult,
    attack_node,
    fitted,
    no_progress,
    prepare_inputs,
    probe_options,
    run_seed,
    seeded,
)
from robustness.probes.memory import LONG, MemoryNeed, attack_gradient_rows, gradient_bytes
from robustness.probes.partial import PartialResults, run_in_chunks
from robustness.probes.per_image import PerImageOptions, first, load_images
from robustness.registry import build, register
from robustness.stats import mean_and_stderr
from robustness.tensors import accuracy, inference_copy, l2_norm, predict


@probe_options("min_perturbation")
class MinPerturbationOptions(PerImageOptions):
    """The options of conf/probe/min_perturbation.yaml (table1 takes them too)."""

    refine_steps: int

    def validate(self) -> None:
        super().validate()
        if isinstance(self.refine_steps, bool) or not isinstance(self.refine_steps, int) or self.refine_steps < 0:
            raise ConfigError(f"probe.refine_steps must be an integer >= 0, got {self.refine_steps}", "0 keeps the attack's perturbation as it is; 20 bisects it to 1e-6 of its length")

    def attack_bytes(self, image_shape: Sequence[int], num_classes: int, activation: int, gradient_rows: int | None = None) -> int:
        """One image through a minimisation attack that differentiates ``gradient_rows`` logit
        differences at once (:func:`~robustness.probes.memory.attack_gradient_rows`; every class
        but one where unknown)."""
        rows = num_classes - 1 if gradient_rows is None else min(int(gradient_rows), num_classes - 1)
        return gradient_bytes(image_shape, activation, max(1, rows))

    def memory_need(self, image_shape: Sequence[int], num_classes: int, activation: int, num_images: int | None,
                    gradient_rows: int | None = None) -> MemoryNeed:
        per_image = self.attack_bytes(image_shape, num_classes, activation, gradient_rows)
        return self.images_need(image_shape, num_images, per_image, results_per_image=6 * LONG)


class MinPerturbationResult(ProbeResult):
    """``rows``: per model the mean smallest ``||r||_2`` (and ``||r||_2 / ||x||_2``) with standard
    errors over the images where the attack succeeded, how many it succeeded on, the accuracy;
    :meth:`per_image`: ``norm``, ``relative``, ``found``, ``label`` (the prediction changed),
    ``attack_norm`` (before bisection) and ``attack_steps``."""

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.tables["min_perturbation"]

    def per_image(self, model: str = "model") -> dict[str, Tensor]:
        prefix = f"{model}/"
        return {key[len(prefix):]: value for key, value in self.arrays.items() if key.startswith(prefix)}


@torch.no_grad()
def shrink_to_boundary(model: nn.Module, x: Tensor, label: Tensor, direction: Tensor, steps: int) -> Tensor:
    """Per image, the smallest found ``t`` in (0, 1] with ``predict(x + t direction) != label``.

    Assumes the label at ``t = 1`` already differs. Bisection keeps ``hi`` on the changed side,
    so ``x + hi * direction`` always has another label; after ``steps`` halvings ``hi`` exceeds a
    crossing by at most ``2**-steps``. With several crossings along the segment the result is one
    of them, not necessarily the first.
    """
    if steps < 0:
        raise InputError(f"bisection steps must be >= 0, got {steps}")
    view = (-1,) + (1,) * (x.dim() - 1)
    lo = torch.zeros(len(x), dtype=torch.float64, device=x.device)
    hi = torch.ones(len(x), dtype=torch.float64, device=x.device)
    for _ in range(int(steps)):
        mid = 0.5 * (lo + hi)
        changed = predict(model, x + mid.to(x.dtype).view(view) * direction) != label
        hi = torch.where(changed, mid, hi)
        lo = torch.where(changed, lo, mid)
    return hi


def minimal_perturbation(model: nn.Module, x: Tensor, attack: Attack, refine_steps: int = 20) -> dict[str, Tensor]:
    """Smallest label-changing perturbation per image: ``norm`` = ||r||_2, ``relative`` = ||r||_2/||x||_2.

    ``label`` is the prediction being changed, ``found`` marks images where the attack
    succeeded (elsewhere the norms are NaN), ``attack_norm`` is the attack's own ||r|| before
    refinement, ``attack_steps`` its iterations.
    """
    # The same function as the model, faster (tensors.inference_copy): folded for the attack,
    # frozen as well for the no-grad bisection.
    folded = inference_copy(model, x[:1], for_gradients=True) if len(x) else model
    label = predict(folded, x)
    result = attack(folded, x, label)
    found = result.success  # decided once by the attack's base, from its final logits
    direction = (result.x_adv - x).detach()
    scale = shrink_to_boundary(inference_copy(folded, x[:1]) if len(x) else model, x, label, direction, refine_steps)
    scale = torch.where(found, scale, torch.ones_like(scale))
    norm = l2_norm(direction).double() * scale
    nan = torch.full_like(norm, float("nan"))
    norm = torch.where(found, norm, nan)
    return {
        "label": label,
        "found": found,
        "norm": norm,
        "relative": norm / l2_norm(x).double(),
        "attack_norm": torch.where(found, l2_norm(direction).double(), nan),
        "attack_steps": result.steps.long(),
    }


def minimisation_attack(attack_cfg: dict[str, Any]) -> MinimisationAttack:
    """The ``attack`` node built, refused unless it minimises the perturbation (DeepFool, runner-up)."""
    attack = build("attack", attack_cfg)
    if not isinstance(attack, MinimisationAttack):
        raise ConfigError(f"the minimal perturbation needs a minimisation attack, and attack={attack_cfg.get('name')} is bounded by eps",
                          "use attack=deepfool or attack=runner_up")
    return attack


def measure_min_perturbation(model: nn.Module, x: Tensor, attack_cfg: dict[str, Any], options: MinPerturbationOptions,
                             cache_dir: Path | None, progress: Progress, what: str) -> dict[str, Tensor]:
    """:func:`minimal_perturbation` over all images with the ``attack`` node, chunk by chunk, each chunk kept in ``cache_dir``."""
    attack = minimisation_attack(attack_cfg)
    identity = {
        "refine_steps": int(options.refine_steps), "attack": dict(attack_cfg),
        "images": fingerprint.of_tensors(x), "model": fingerprint.of_state(model),
    }

    def chunk(start: int, stop: int) -> dict[str, Tensor]:
        return minimal_perturbation(model, x[start:stop], attack, int(options.refine_steps))

    parts = PartialResults(cache_dir, "min_perturbation", identity)
    return run_in_chunks(parts, len(x), int(options.chunk_size), chunk, lambda done, total: progress(done, total, f"min perturbation {what}"))


def min_perturbation_row(variant: str, measured: dict[str, Tensor]) -> dict[str, Any]:
    norm_mean, norm_stderr = mean_and_stderr(measured["norm"])
    relative_mean, relative_stderr = mean_and_stderr(measured["relative"])
    return {
        "variant": variant,
        "norm_mean": norm_mean,
        "norm_stderr": norm_stderr,
        "relative_mean": relative_mean,
        "relative_stderr": relative_stderr,
        "found": int(measured["found"].sum()),
        "images": int(len(measured["found"])),
    }


def attack_description(attack_cfg: dict[str, Any], refine_steps: int) -> str:
    options = ", ".join(f"{k}={v}" for k, v in attack_cfg.items() if k != "name")
    text = f"{attack_cfg.get('name', 'attack')}({options})"
    return text + (f", refined by {refine_steps} bisection steps along r" if refine_steps else "")


def min_perturbation(models: Any, images: Tensor, labels: Tensor, *, attack: str | dict[str, Any] | None = None, seed: int | None = None,
                     cache_dir: str | Path | None = None, progress: Progress = no_progress, **options: Any) -> MinPerturbationResult:
    """The smallest label-changing l2 perturbation at each of the first ``num_images`` images, per model.

    attack: a minimisation attack of the ``attack`` group, by name or as a node
            (``{"name": "deepfool", "max_iter": 20}``); default: ``conf/config.yaml``'s (deepfool).
    options: those of ``conf/probe/min_perturbation.yaml`` (its values are the defaults).
    """
    settings = MinPerturbationOptions.from_cfg(options)
    attack_cfg = attack_node(attack)
    minimisation_attack(attack_cfg)  # a wrong attack is refused before any work
    named, x, y, classes = prepare_inputs(models, images, labels)
    x, y = first(x, y, settings.num_images)
    settings = fitted(settings, named, x, classes, gradient_rows=attack_gradient_rows(attack_cfg))
    seed = run_seed(seed)
    arrays: dict[str, Tensor] = {"labels": y.cpu(), "image_norm": l2_norm(x).double().cpu()}
    rows = []
    with seeded(seed, x.device):
        for variant, model in named.items():
            measured = measure_min_perturbation(model, x, attack_cfg, settings, None if cache_dir is None else Path(cache_dir), progress, variant)
            arrays.update({f"{variant}/{key}": value for key, value in measured.items()})
            rows.append({**min_perturbation_row(variant, measured), "accuracy": accuracy(model, x, y)})
    meta = {
        "variants": list(named),
        "attack": attack_description(attack_cfg, int(settings.refine_steps)),
        "num_images": int(len(x)),
        "split": settings.split,
        "seed": int(seed),
    }
    return MinPerturbationResult("min_perturbation", arrays, {"min_perturbation": rows}, meta)


@register("probe", "min_perturbation", options=MinPerturbationOptions)
def compute(ctx: ProbeContext) -> ProbeResult:
    options = MinPerturbationOptions.from_cfg(ctx.options)
    x, y = load_images(ctx, options.split, options.num_images)
    return min_perturbation(ctx.models, x, y, attack=ctx.attack, **ctx.common(), **ctx.options)
