"""Probe ``perceptual``: colour changes that keep an image's shape, and what they do to each model.

Report section 3 (Figure 9): models that resist small l2 noise (adversarial, CURE) still call a
pepper recoloured from red to orange an orange. This probe measures that on a split's images --
all of them, or the first ``num_images`` where the config says so (the same images for every
model) -- with the hue rotation of :mod:`robustness.geometry.colour` (luma, hence shape, kept
exactly). ``items`` names what is measured and drawn, so that two experiments sharing this probe
each print their own figures and tables and a report shows each once:

``sweep`` (the hue sweep):

* **flip rate and accuracy**: at every ``angle_step`` degrees, accuracy over all images and the
  *flip rate*: the fraction of the images the model classifies correctly unrotated whose label
  changes;
* **smallest flipping rotation**: per correctly classified image, the rotation of smallest
  magnitude (either direction, up to ``max_angle``) that changes the label: a coarse scan every
  ``search_step`` degrees, then bisection to ``search_tol`` degrees. A flip confined to less
  than ``search_step`` between two scanned angles can be missed; the bisection result always
  flips, and the angle ``search_tol`` nearer to 0 does not;
* **l2 sizes**: the l2 norm of that recolouring next to the l2 norm of the smallest
  label-changing perturbation from the ``l2_attack`` (DeepFool refined by bisection, as in
  Table 1) for the same images: perceptually small changes that are l2-large;
* **colour attack**: success rate of the ``attack`` group (``attack=colour`` in the
  experiments) on the correctly classified images.

``figure9``: one image correctly classified by every model, its recoloured version, and each
model's top-k classes with probabilities on both. It is chosen from the sweep's predictions
(which are computed for it, but printed only with ``sweep``).

``region=dominant`` recolours only the pixels of each image's dominant hue (the report
recoloured the pepper's red, not its stalk); ``region=all`` the whole image.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from robustness import fingerprint
from robustness.errors import ConfigError, InputError, NotApplicableError
from robustness.geometry.colour import hue_rotate, region_mask
from robustness.probes.base import (
    Progress,
    ProbeContext,
    ProbeResult,
    attack_node,
    class_name,
    fitted,
    no_progress,
    per_item_bytes,
    prepare_inputs,
    probe_options,
    run_seed,
    seeded,
)
from robustness.probes.memory import LONG, MemoryNeed, gradient_bytes
from robustness.probes.min_perturbation import attack_description, minimal_perturbation
from robustness.probes.partial import PartialResults, run_in_chunks
from robustness.probes.per_image import PerImageOptions, first, load_images
from robustness.registry import build, register
from robustness.stats import mean_and_stderr
from robustness.tensors import inference_copy, l2_norm, predict

ITEMS = ("figure9", "sweep")


@probe_options("perceptual")
class PerceptualOptions(PerImageOptions):
    """See conf/probe/perceptual.yaml for the meaning of each option."""

    num_images: int | None  # None: every image (the whole split)
    items: tuple[str, ...]
    angle_step: float
    region: str
    soft_mask: bool
    mask_half_width: float
    search_step: float
    search_tol: float
    max_angle: float
    l2_attack: dict[str, Any] | None
    refine_steps: int
    figure_index: int | None
    figure_angle: float | None
    top_k: int

    def validate(self) -> None:
        # The shared checks, with the whole split (num_images None) standing in as a valid count.
        super(PerceptualOptions, replace(self, num_images=1 if self.num_images is None else self.num_images)).validate()
        if not self.items or any(item not in ITEMS for item in self.items):
            raise ConfigError(f"probe.items must be a non-empty list drawn from {list(ITEMS)}, got {list(self.items)}", "fig9_perceptual prints [figure9], perceptual_sweep [sweep]")
        if not 0.0 < float(self.angle_step) < 360.0:
            raise ConfigError(f"probe.angle_step must lie in (0, 360) degrees, got {self.angle_step}", "the report's sweep uses 15")
        if self.region not in ("all", "dominant"):
            raise ConfigError(f"probe.region must be 'all' or 'dominant', got '{self.region}'", "dominant recolours only the pixels of the image's main hue, as in Figure 9")
        if not 0.0 < float(self.mask_half_width) <= 180.0:
            raise ConfigError(f"probe.mask_half_width must lie in (0, 180] degrees, got {self.mask_half_width}")
        if not 0.0 < float(self.max_angle) <= 180.0:
            raise ConfigError(f"probe.max_angle must lie in (0, 180] degrees, got {self.max_angle}", "180 searches the whole hue circle in both directions")
        if not 0.0 < float(self.search_step) <= float(self.max_angle):
            raise ConfigError(f"probe.search_step must lie in (0, max_angle], got {self.search_step}", "e.g. 15: scan every 15 degrees, then bisect")
        if not 0.0 < float(self.search_tol) < float(self.search_step):
            raise ConfigError(f"probe.search_tol must lie in (0, search_step), got {self.search_tol}", "e.g. 0.1 degrees")
        if self.l2_attack is not None and "name" not in self.l2_attack:
            raise ConfigError("probe.l2_attack needs a 'name'", "e.g. probe.l2_attack={name: deepfool}, or null to skip the l2 comparison")
        if isinstance(self.refine_steps, bool) or not isinstance(self.refine_steps, int) or self.refine_steps < 0:
            raise ConfigError(f"probe.refine_steps must be an integer >= 0, got {self.refine_steps}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"probe.top_k must be a positive integer, got {self.top_k}", "Figure 9 shows the top 3")
        if self.figure_index is not None and (isinstance(self.figure_index, bool) or not isinstance(self.figure_index, int) or self.figure_index < 0):
            raise ConfigError(f"probe.figure_index must be a non-negative integer or null, got {self.figure_index}", "null picks the image automatically")

    @classmethod
    def normalise(cls, values: dict[str, Any]) -> dict[str, Any]:
        if "items" in values and not isinstance(values["items"], str):
            values = {**values, "items": tuple(values["items"])}
        return values

    @property
    def measures_sizes(self) -> bool:
        """The smallest flipping rotation, the l2 comparison and the colour attack: for ``sweep`` only."""
        return "sweep" in self.items

    def memory_need(self, image_shape: Sequence[int], num_classes: int, activation: int, num_images: int | None) -> MemoryNeed:
        # Per image: the sweep's predictions and the per-image results; per chunk image: the
        # attacks' gradients and the recoloured copies.
        results = (len(self.angles) + 8) * LONG
        attack = gradient_bytes(image_shape, activation) + 2 * per_item_bytes(image_shape, 0, gradients=False)  # a loss's gradient: one row
        return self.images_need(image_shape, num_images, attack, results_per_image=results)

    @property
    def angles(self) -> Tensor:
        return torch.arange(0.0, 360.0, float(self.angle_step), dtype=torch.float64)


def _mask(x: Tensor, options: PerceptualOptions) -> Tensor | None:
    return region_mask(x, options.region, soft=bool(options.soft_mask), half_width=float(options.mask_half_width))


@torch.no_grad()
def hue_sweep_predictions(model: nn.Module, x: Tensor, angles: Tensor, mask: Tensor | None = None) -> Tensor:
    """Predicted labels ``(N, A)`` of every image rotated by every angle (degrees)."""
    if len(x) == 0:
        return torch.empty(0, len(angles), dtype=torch.long, device=x.device)
    return torch.stack([predict(model, hue_rotate(x, float(a), mask)) for a in angles], dim=1)


def flip_rate_and_accuracy(predictions: Tensor, labels: Tensor, angles: Tensor) -> tuple[Tensor, Tensor]:
    """Per angle: flip rate among the images correct at angle 0, and accuracy over all images.

    ``predictions`` is ``(N, A)``; the angle-0 column is found in ``angles`` (the rotation by 0
    is the identity, so it holds the clean predictions). NaN flip rates where no image is correct.
    """
    zero = (angles.double().remainder(360.0) == 0).nonzero().flatten()
    if len(zero) == 0:
        raise InputError("the sweep angles must include 0 (the unrotated images define which images are correct)")
    correct = predictions[:, int(zero[0])] == labels
    changed = predictions != labels[:, None]
    accuracy = (~changed).double().mean(0)
    if int(correct.sum()) == 0:
        return torch.full((predictions.shape[1],), float("nan"), dtype=torch.float64), accuracy
    return changed[correct].double().mean(0), accuracy


@torch.no_grad()
def minimal_flip_angle(
    model: nn.Module,
    x: Tensor,
    label: Tensor,
    step: float = 15.0,
    max_angle: float = 180.0,
    tol: float = 0.1,
    mask: Tensor | None = None,
) -> Tensor:
    """Per image, the signed hue rotation (degrees) of smallest magnitude that changes ``label``.

    Scan ``+-step, +-2 step, ...`` up to ``+-max_angle``; in each direction the first scanned
    angle that changes the label brackets a flip with the previous (unchanged) one, and
    bisection shrinks the bracket below ``tol``, keeping its changed end. The direction with the
    smaller result wins (ties: positive). NaN where no scanned angle changes the label.
    The returned angle changes the label and the bracket's other end, less than ``tol`` nearer
    to 0, does not; a flip that starts and ends between two scanned angles can be missed.
    """
    n = len(x)
    result = torch.full((n,), float("nan"), dtype=torch.float64, device=x.device)
    if n == 0:
        return result
    count = math.ceil(max_angle / step - 1e-9)
    grid = [min(k * step, max_angle) for k in range(1, count + 1)]
    bisections = max(0, math.ceil(math.log2(step / tol)))

    def flips(index: Tensor, angle: Tensor) -> Tensor:
        sub_mask = None if mask is None else mask[index]
        return predict(model, hue_rotate(x[index], angle.to(x.dtype), sub_mask)) != label[index]

    for sign in (1.0, -1.0):
        lo = torch.full((n,), float("nan"), dtype=torch.float64, device=x.device)
        hi = lo.clone()
        pending = torch.arange(n, device=x.device)
        previous = 0.0
        for angle in grid:
            if len(pending) == 0:
                break
            changed = flips(pending, torch.full((len(pending),), sign * angle, dtype=torch.float64, device=x.device))
            found = pending[changed]
            lo[found], hi[found] = previous, angle
            pending = pending[~changed]
            previous = angle
        bracketed = (~torch.isnan(hi)).nonzero().flatten()
        for _ in range(bisections):
            if len(bracketed) == 0:
                break
            mid = 0.5 * (lo[bracketed] + hi[bracketed])
            changed = flips(bracketed, sign * mid)
            hi[bracketed] = torch.where(changed, mid, hi[bracketed])
            lo[bracketed] = torch.where(changed, lo[bracketed], mid)
        better = ~torch.isnan(hi) & (torch.isnan(result) | (hi < result.abs()))
        result = torch.where(better, sign * hi, result)
    return result


def _measure_chunk(model: nn.Module, x: Tensor, y: Tensor, options: PerceptualOptions, attack: Any, l2_attack: Any) -> dict[str, Tensor]:
    """Everything the probe measures per image, for one chunk of images."""
    n = len(x)
    nan = torch.full((n,), float("nan"), dtype=torch.float64)
    mask = _mask(x, options)
    # The same function as the model, faster (tensors.inference_copy): folded for the attacks,
    # frozen as well for the no-grad rotations.
    folded = inference_copy(model, x[:1], for_gradients=True) if n else model
    fast = inference_copy(folded, x[:1]) if n else model
    sweep = hue_sweep_predictions(fast, x, options.angles, mask)
    correct = sweep[:, 0] == y
    index = correct.nonzero().flatten()
    xc, yc = x[index], y[index]
    mc = None if mask is None else mask[index]
    out = {
        "sweep_pred": sweep.cpu(),
        "correct": correct.cpu(),
        "min_angle": nan.clone(),
        "colour_l2": nan.clone(),
        "l2_attack_norm": nan.clone(),
        "attack_success": torch.zeros(n, dtype=torch.bool),
        "attack_norm": nan.clone(),
    }
    if len(index) == 0 or not options.measures_sizes:
        return out
    cpu_index = index.cpu()
    angle = minimal_flip_angle(fast, xc, yc, float(options.search_step), float(options.max_angle), float(options.search_tol), mc)
    found = ~torch.isnan(angle)
    recoloured = hue_rotate(xc, torch.nan_to_num(angle).to(x.dtype), mc)
    colour_l2 = torch.where(found, l2_norm(recoloured - xc).double(), torch.full_like(angle, float("nan")))
    out["min_angle"][cpu_index] = angle.cpu()
    out["colour_l2"][cpu_index] = colour_l2.cpu()
    if l2_attack is not None:
        out["l2_attack_norm"][cpu_index] = minimal_perturbation(folded, xc, l2_attack, int(options.refine_steps))["norm"].cpu()
    result = attack(folded, xc, yc)
    success = result.success  # decided once by the attack's base
    out["attack_success"][cpu_index] = success.cpu()
    out["attack_norm"][cpu_index] = torch.where(success, result.norm.double(), torch.full_like(angle, float("nan"))).cpu()
    return out


def measure_perceptual(model: nn.Module, x: Tensor, y: Tensor, options: PerceptualOptions, attack_cfg: dict[str, Any],
                       cache_dir: Path | None, progress: Progress, what: str) -> dict[str, Tensor]:
    """:func:`_measure_chunk` over all images, chunk by chunk, each chunk kept in ``cache_dir``."""
    attack = build("attack", attack_cfg)
    l2_attack = None if options.l2_attack is None else build("attack", options.l2_attack)
    keys = ("angle_step", "region", "soft_mask", "mask_half_width", "search_step", "search_tol", "max_angle", "l2_attack", "refine_steps")
    identity = {
        **options.fingerprint(keys),
        "attack": dict(attack_cfg),
        "measures_sizes": options.measures_sizes,
        "images": fingerprint.of_tensors(x, y),
        "model": fingerprint.of_state(model),
    }

    def chunk(start: int, stop: int) -> dict[str, Tensor]:
        return _measure_chunk(model, x[start:stop], y[start:stop], options, attack, l2_attack)

    parts = PartialResults(cache_dir, "perceptual", identity)
    return run_in_chunks(parts, len(x), int(options.chunk_size), chunk, lambda done, total: progress(done, total, f"perceptual {what}"))


def _wrapped(angle: Tensor) -> Tensor:
    return (angle.double() + 180.0).remainder(360.0) - 180.0


def choose_figure(
    sweeps: dict[str, Tensor],
    labels: Tensor,
    angles: Tensor,
    index: int | None = None,
    angle: float | None = None,
    confidence: Tensor | None = None,
) -> tuple[int, float, int]:
    """(image index, angle, models fooled) for Figure 9, from the sweep predictions.

    Candidates are the images every model classifies correctly unrotated (all images if there is
    none). Among them and the sweep's non-zero angles, the pair fooling the most models wins;
    ties go to the image the models were most sure of (``confidence``, e.g. the smallest
    probability any model gives the true class: the report's pepper was a confident pepper),
    then to the smaller rotation, then to the earlier image. A given ``index`` or ``angle``
    fixes that part of the choice.
    """
    preds = torch.stack(list(sweeps.values()))  # (M, N, A)
    correct = (preds[:, :, 0] == labels[None]).all(0)
    candidates = correct if bool(correct.any()) else torch.ones_like(correct)
    if index is not None:
        if index >= len(labels):
            raise ConfigError(f"probe.figure_index {index} is outside the {len(labels)} probed images", f"pick an index below {len(labels)}, or null")
        only = torch.zeros_like(candidates)
        only[index] = True
        candidates = only
    if angle is not None:
        near = (_wrapped(angles - float(angle)).abs() < 1e-9).nonzero().flatten()
        if len(near) == 0:
            raise ConfigError(f"probe.figure_angle {angle} is not one of the sweep's angles", f"use a multiple of probe.angle_step ({float(angles[1] - angles[0]) if len(angles) > 1 else 0})")
        columns = near[:1]
    else:
        columns = (angles.double().remainder(360.0) != 0).nonzero().flatten()
    fooled = (preds[:, :, columns] != labels[None, :, None]).sum(0)  # (N, C)
    size = _wrapped(angles[columns]).abs()
    best = None
    for i in candidates.nonzero().flatten().tolist():
        for c in range(len(columns)):
            sure = 0.0 if confidence is None else float(confidence[i])
            key = (-int(fooled[i, c]), -sure, float(size[c]), i)
            if best is None or key < best[0]:
                best = (key, i, float(angles[columns[c]]))
    assert best is not None  # candidates is never empty
    return best[1], best[2], -best[0][0]


@torch.no_grad()
def top_k(model: nn.Module, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k (class indices, probabilities) of each image."""
    probs = torch.softmax(model(x), dim=1)
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return indices, values


def _summary_row(variant: str, measured: dict[str, Tensor], flip: Tensor, accuracy: Tensor, angles: Tensor, attack_name: str) -> dict[str, Any]:
    correct = measured["correct"]
    n_correct = int(correct.sum())
    angle = measured["min_angle"]
    found = ~torch.isnan(angle)
    both = found & torch.isfinite(measured["l2_attack_norm"])
    colour_mean, _ = mean_and_stderr(measured["colour_l2"][both])
    l2_mean, _ = mean_and_stderr(measured["l2_attack_norm"][both])
    nonzero = angles.remainder(360.0) != 0
    worst = int(torch.nan_to_num(flip, nan=-1.0).argmax())
    return {
        "variant": variant,
        "accuracy": float(accuracy[0]),
        "correct": n_correct,
        "flip_rate_mean": float(flip[nonzero].mean()) if bool(nonzero.any()) else float("nan"),
        "flip_rate_max": float(flip[worst]),
        "angle_of_max": float(angles[worst]),
        "flipped_by_rotation": float(found.sum() / n_correct) if n_correct else float("nan"),
        "min_angle_median": float(angle[found].abs().median()) if bool(found.any()) else float("nan"),
        "compared": int(both.sum()),
        "colour_l2_mean": colour_mean,
        "l2_attack_mean": l2_mean,
        "l2_ratio": colour_mean / l2_mean if l2_mean and math.isfinite(l2_mean) and l2_mean > 0 else float("nan"),
        "attack": attack_name,
        "attack_success_rate": float(measured["attack_success"][correct].double().mean()) if n_correct else float("nan"),
        "attack_l2_mean": mean_and_stderr(measured["attack_norm"])[0],
    }


class HueSweepResult(ProbeResult):
    """``rows`` (table ``perceptual_summary``, with ``items`` holding ``sweep``): per model the mean
    and largest flip rate over the hue rotations, the median smallest flipping rotation, the l2
    size of that recolouring beside the l2 attack's smallest perturbation, the colour attack's
    success; ``sweep_rows``: flip rate and accuracy per model and angle; ``figure_rows``: the
    Figure 9 example's top classes before and after recolouring."""

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.tables.get("perceptual_summary", [])

    @property
    def sweep_rows(self) -> list[dict[str, Any]]:
        return self.tables.get("perceptual_sweep", [])

    @property
    def figure_rows(self) -> list[dict[str, Any]]:
        return self.tables.get("fig9_top_k", [])


def hue_sweep(models: Any, images: Tensor, labels: Tensor, *, attack: str | dict[str, Any] | None = None,
              class_names: Sequence[str] | None = None, dataset: str = "images", seed: int | None = None,
              cache_dir: str | Path | None = None, progress: Progress = no_progress, **options: Any) -> HueSweepResult:
    """Hue rotations that keep each image's shape, and what they do to each model (the report's
    section 3 and Figure 9), on the first ``num_images`` colour images (all for None).

    attack: the attack whose success the summary reports (default: ``conf/config.yaml``'s, deepfool;
            the experiments use ``attack="colour"``, the smooth colour attack).
    options: those of ``conf/probe/perceptual.yaml`` (its values are the defaults).
    class_names, dataset: how rows and captions name the classes and the data.
    """
    settings = PerceptualOptions.from_cfg(options)
    attack_cfg = attack_node(attack)
    named, x, y, classes = prepare_inputs(models, images, labels)
    if x.dim() != 4 or x.shape[1] != 3:
        raise NotApplicableError(
            f"the perceptual probe recolours images, but {dataset} images have shape {tuple(x.shape[1:])}, not 3 colour channels first",
            "use colour images (N, 3, H, W): dataset=colour_digits (embedded), cifar10, svhn or tinyimagenet",
        )
    x, y = first(x, y, settings.num_images)
    settings = fitted(settings, named, x, classes)
    seed = run_seed(seed)
    names = list(class_names) if class_names is not None else [str(i) for i in range(classes)]
    cache = None if cache_dir is None else Path(cache_dir)
    angles = settings.angles
    arrays: dict[str, Tensor] = {"angles": angles, "labels": y.cpu()}
    sweep_rows, summary_rows = [], []
    sweeps: dict[str, Tensor] = {}
    with seeded(seed, x.device):
        for variant, model in named.items():
            measured = measure_perceptual(model, x, y, settings, attack_cfg, cache, progress, variant)
            flip, accuracy = flip_rate_and_accuracy(measured["sweep_pred"], y.cpu(), angles)
            sweeps[variant] = measured["sweep_pred"]
            arrays.update({f"{variant}/{key}": value for key, value in measured.items()})
            arrays[f"{variant}/flip_rate"], arrays[f"{variant}/accuracy"] = flip, accuracy
            sweep_rows += [
                {"variant": variant, "angle": float(a), "flip_rate": float(f), "accuracy": float(acc)}
                for a, f, acc in zip(angles, flip, accuracy)
            ]
            if settings.measures_sizes:
                summary_rows.append(_summary_row(variant, measured, flip, accuracy, angles, attack_cfg.get("name", "attack")))

        with torch.no_grad():
            confidence = torch.stack([
                torch.cat([torch.softmax(model(chunk), 1) for chunk in x.split(1024)]).gather(1, y[:, None]).squeeze(1)
                for model in named.values()
            ]).amin(0).cpu()
        index, angle, fooled = choose_figure(sweeps, y.cpu(), angles, settings.figure_index, settings.figure_angle, confidence)
        image = x[index : index + 1]
        recoloured = hue_rotate(image, angle, _mask(image, settings))
        arrays["figure/original"], arrays["figure/recoloured"] = image[0].cpu(), recoloured[0].cpu()
        figure_rows = []
        for variant, model in named.items():
            idx, prob = top_k(model, torch.cat([image, recoloured]), int(settings.top_k))
            arrays[f"figure/{variant}/top_idx"], arrays[f"figure/{variant}/top_prob"] = idx.cpu(), prob.cpu()
            for row, version in enumerate(("original", "recoloured")):
                figure_rows += [
                    {"variant": variant, "image": version, "rank": rank + 1, "class": class_name(names, int(c)), "probability": float(p)}
                    for rank, (c, p) in enumerate(zip(idx[row], prob[row]))
                ]
    meta = {
        "variants": list(named),
        "dataset": dataset,
        "class_names": names,
        "split": settings.split,
        "num_images": int(len(x)),
        "whole_split": settings.num_images is None or int(len(x)) < int(settings.num_images),
        "items": list(settings.items),
        "region": settings.region,
        "angle_step": float(settings.angle_step),
        "search": {"step": float(settings.search_step), "tol": float(settings.search_tol), "max_angle": float(settings.max_angle)},
        "l2_attack": None if settings.l2_attack is None else attack_description(dict(settings.l2_attack), int(settings.refine_steps)),
        "attack": attack_description(attack_cfg, 0),
        "figure": {"index": int(index), "angle": float(angle), "label": class_name(names, int(y[index])), "models_fooled": int(fooled)},
        "seed": int(seed),
    }
    tables: dict[str, list[dict[str, Any]]] = {}
    if "sweep" in settings.items:
        tables.update(perceptual_summary=summary_rows, perceptual_sweep=sweep_rows)
    if "figure9" in settings.items:
        tables["fig9_top_k"] = figure_rows
    return HueSweepResult("perceptual", arrays, tables, meta)


@register("probe", "perceptual", options=PerceptualOptions)
def compute(ctx: ProbeContext) -> ProbeResult:
    options = PerceptualOptions.from_cfg(ctx.options)
    info = ctx.data.info
    if info.in_channels != 3:
        raise NotApplicableError(
            f"the perceptual probe recolours images, but dataset '{info.name}' has {info.in_channels} channel(s)",
            "use a colour dataset: dataset=colour_digits (embedded), cifar10, svhn or tinyimagenet",
        )
    x, y = load_images(ctx, options.split, options.num_images)
    return hue_sweep(ctx.models, x, y, attack=ctx.attack, class_names=info.class_names, dataset=info.name, **ctx.common(), **ctx.options)
