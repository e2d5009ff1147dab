"""Path-connectivity of classification regions: report section 2.2, Figures 5-8 and Table 2.

For every model variant and pair type, pairs of images the model puts in one class ``k`` are
joined by a path inside class ``k`` (:func:`robustness.geometry.paths.find_paths`):

* ``natural``: two test images the model classifies alike (the report used 18 pairs);
* ``adversarial``: two test images of different predicted classes, each pushed by the targeted
  ``push_attack`` (DeepFool by default) into a third class, the path's class (the report used 30 pairs);
* ``noise``: a uniform white-noise image pushed into class ``k``, paired with a test image
  classified ``k`` (Fawzi et al.'s third case; not in the report's table).

A path counts as a success only when every point on it is in the class: for piecewise-linear
variants (ReLU, max-pool, affine layers) every segment is certified exactly
(:mod:`robustness.geometry.certify`), and a path that passed only its sampled checks (a segment
over ``max_pieces``) is "sampled", not a success. Other variants (softplus, tanh, ...) cannot be
certified: their paths are checked at ``points_per_segment`` points per segment, and every table
says so in its ``check`` column.

Results: ``tables["pairs"]`` (one row per pair), ``tables["table2"]`` (certified / sampled-only /
failed counts, and the mean and std of the number of points and of the normalised deviation over
the successful paths), and for one path per variant and pair type (the successful one that
deviates most) its principal components: the projection of points spaced evenly along it and of
its vertices, and the explained-variance ratio of the first components (Figures 5-8).

Every pair's result is saved as soon as it is found, in a folder named by the fingerprint of
everything it depends on (weights, options, seed, candidate images), under the cache folder (the
stage gives the run's shared folder where it has one): a rerun, or another section with the same
pair settings (Table 2 after Figures 5-8), reuses them and only searches the pairs still missing.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from sklearn.decomposition import PCA
from torch import Tensor, nn
from torchvision.models import resnet as tv_resnet

from robustness import fingerprint
from robustness.errors import ConfigError, InputError
from robustness.geometry.certify import Certifier
from robustness.geometry.paths import PathResult, TargetedAttack, find_paths, path_metrics, resample_path
from robustness.models.normalize import Normalize
from robustness.probes.base import (
    Progress,
    ProbeContext,
    ProbeOptions,
    ProbeResult,
    class_name,
    fitted,
    no_progress,
    per_item_bytes,
    prepare_inputs,
    probe_options,
    run_seed,
    seeded,
)
from robustness.probes.memory import MemoryNeed, image_bytes, size_text
from robustness.probes.partial import PartialResults
from robustness.probes.per_image import first, load_images
from robustness.registry import build, register
from robustness.tensors import predict

PAIR_TYPES = ("natural", "adversarial", "noise")
# What the reporter may draw: each pair type's two figures (Figures 5-8), and Table 2.
DRAWINGS = ("figures", "table2")
# Keeps the pairs of each type independent of which other types a run asks for.
_TYPE_SEED = {"natural": 0, "adversarial": 1, "noise": 2}
# Candidates drawn per requested pair where DeepFool may fail to reach the target class.
_OVERSAMPLE = 2
# Containers whose forward only calls their children, adds and flattens (torchvision's ResNets):
# the certifier may trust them as it trusts nn.Sequential.
_PLAIN_CONTAINERS = (tv_resnet.ResNet, tv_resnet.BasicBlock, tv_resnet.Bottleneck)


log = logging.getLogger("robustness")


@probe_options("path_connectivity")
class PathOptions(ProbeOptions):
    """The probe's options (conf/probe/path_connectivity.yaml documents each one)."""

    pair_types: list[str]
    natural_pairs: int
    adversarial_pairs: int
    noise_pairs: int
    split: str
    candidate_images: int
    points_per_segment: int
    max_depth: int
    max_vertices: int | None
    certify: bool
    max_pieces: int
    pull_attack: dict[str, Any]
    push_attack: dict[str, Any]
    pairs_per_batch: int
    batch_size: int
    pca_points: int
    pca_components: int
    draw: list[str]

    @classmethod
    def normalise(cls, values: dict[str, Any]) -> dict[str, Any]:
        for name in ("pair_types", "draw"):
            if name in values:
                values[name] = list(values[name])
        for name in ("pull_attack", "push_attack"):
            if name in values:
                if not isinstance(values[name], Mapping) or "name" not in values[name]:
                    raise ConfigError(f"probe.{name} must be an attack config node with a 'name' key, got {values[name]!r}",
                                      f"e.g. probe.{name}={{name: deepfool, overshoot: 0.02, max_iter: 50}}")
                values[name] = dict(values[name])
        return values

    def validate(self) -> None:
        bad = [t for t in self.pair_types if t not in PAIR_TYPES]
        if bad or not self.pair_types:
            raise ConfigError(f"unknown or missing pair types {bad or self.pair_types}", f"set probe.pair_types to a list drawn from {list(PAIR_TYPES)}")
        for name in ("natural_pairs", "adversarial_pairs", "noise_pairs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"probe.{name} must be >= 1, got {getattr(self, name)}", f"set probe.{name}, e.g. probe.{name}=10")
        if self.candidate_images < 2:
            raise ConfigError(f"probe.candidate_images must be >= 2, got {self.candidate_images}", "pairs are drawn from that many test images, e.g. 500")
        if not set(self.draw) <= set(DRAWINGS):
            raise ConfigError(f"unknown drawing(s) {sorted(set(self.draw) - set(DRAWINGS))} in probe.draw", f"choose from {list(DRAWINGS)}")
        if self.pairs_per_batch < 1:
            raise ConfigError(f"probe.pairs_per_batch must be >= 1, got {self.pairs_per_batch}", "e.g. probe.pairs_per_batch=6")
        if self.pca_components < 3:
            raise ConfigError(f"probe.pca_components must be >= 3 (the figures plot PC3), got {self.pca_components}", "e.g. probe.pca_components=10")
        if self.pca_points < self.pca_components:
            raise ConfigError(
                f"probe.pca_points ({self.pca_points}) must be >= probe.pca_components ({self.pca_components})",
                "sample more points along the path, e.g. probe.pca_points=100",
            )
        if self.max_pieces < 1:
            raise ConfigError(f"probe.max_pieces must be >= 1, got {self.max_pieces}", "e.g. probe.max_pieces=10000")
        for name in ("pull_attack", "push_attack"):
            self.attack(name)  # builds it: a bad name or option is a ConfigError now, not mid-run

    def attack(self, which: str) -> Any:
        """The targeted attack of node ``which`` ("pull_attack" or "push_attack"), from the attack group."""
        try:
            return build("attack", getattr(self, which))
        except InputError as exc:  # an attack's own range checks
            raise ConfigError(f"probe.{which}: {exc.message}", exc.hint) from None

    def count(self, pair_type: str) -> int:
        return int(getattr(self, f"{pair_type}_pairs"))

    def sampled_check(self) -> str:
        return f"sampled at {self.points_per_segment} points per segment"

    def memory_need(self, image_shape: Sequence[int], num_classes: int, activation: int, num_images: int | None) -> MemoryNeed:
        held = int(self.candidate_images) if num_images is None else int(num_images)
        return MemoryNeed(
            fixed=held * image_bytes(image_shape),
            # A batch of path points through the model (the pull attack works on a few points at a time).
            per_item=per_item_bytes(image_shape, activation, gradients=False),
            batch=int(self.batch_size),
            batch_key="batch_size",
            fixed_what=f"{held} candidate images of shape {tuple(image_shape)}",
            fixed_fix=lambda usable: f"draw pairs from fewer images (probe.candidate_images); {size_text(usable)} can hold about {usable // max(1, image_bytes(image_shape))}",
        )


def variant_check(model: nn.Module, options: PathOptions) -> tuple[Certifier | None, str, list[str]]:
    """How this variant's segments are checked: (certifier or None, the check's wording, why not certified)."""
    if not options.certify:
        return None, options.sampled_check(), ["probe.certify is false"]
    certifier = Certifier(max_pieces=options.max_pieces, affine=(Normalize,), containers=_PLAIN_CONTAINERS)
    problems = certifier.problems(model)
    if problems:
        return None, options.sampled_check(), problems
    return certifier, "certified", []


@dataclass
class Pairs:
    """Endpoints of the paths to search, all classified ``label`` by the model."""

    x_start: Tensor
    x_end: Tensor
    label: Tensor
    source: list[dict[str, int]]  # where each endpoint came from (image index, class before DeepFool)
    dropped: int = 0  # candidates discarded because DeepFool did not reach the target class


def natural_pairs(x: Tensor, pred: Tensor, n: int, generator: torch.Generator) -> Pairs:
    """``n`` pairs of distinct images with the same predicted class, classes taken in turn."""
    classes = [c for c in pred.unique().tolist() if int((pred == c).sum()) >= 2]
    if not classes:
        raise ConfigError("no class has two images among the candidates", "raise probe.candidate_images")
    order = [classes[i] for i in torch.randperm(len(classes), generator=generator).tolist()]
    starts, ends, source = [], [], []
    for i in range(n):
        k = order[i % len(order)]
        members = (pred == k).nonzero().flatten().tolist()
        a, b = _distinct_images(x, members, generator)
        starts.append(a)
        ends.append(b)
        source.append({"start_index": a, "end_index": b, "start_class": k, "end_class": k})
    label = pred[torch.tensor(starts)].cpu()
    return Pairs(x[starts], x[ends], label, source)


def _distinct_images(x: Tensor, members: list[int], generator: torch.Generator) -> tuple[int, int]:
    """Two members whose images differ: a path between identical images has no direction."""
    for _ in range(100):
        a, b = (members[i] for i in torch.randperm(len(members), generator=generator)[:2].tolist())
        if not torch.equal(x[a], x[b]):
            return a, b
    raise ConfigError("could not find two distinct images of one class among the candidates", "raise probe.candidate_images")


def adversarial_pairs(model: nn.Module, x: Tensor, pred: Tensor, n: int, generator: torch.Generator, push: TargetedAttack, batch_size: int) -> Pairs:
    """``n`` pairs of images from two different classes, both pushed into a third class.

    All candidates go through one batched call of the targeted attack ``push``; candidates that it does not
    bring into the target class are dropped (counted in ``dropped``).
    """
    classes = pred.unique()
    if len(classes) < 2:
        # A collapsed model (or one barely trained) has no pair of classes to push: no pairs, all requested ones counted as dropped.
        log.warning("the model predicts a single class on the %d candidates, so there are no adversarial pairs for it", len(x))
        return Pairs(x[:0], x[:0], torch.empty(0, dtype=torch.long), [], dropped=n)
    num_classes = _num_classes(model, x)
    if num_classes < 3:
        raise ConfigError("adversarial pairs need at least three classes (two sources and a different target)", "drop 'adversarial' from probe.pair_types")
    picks = []
    while len(picks) < _OVERSAMPLE * n:
        a, b = torch.randint(len(x), (2,), generator=generator).tolist()
        if pred[a] == pred[b]:
            continue
        others = [c for c in range(num_classes) if c not in (int(pred[a]), int(pred[b]))]
        t = others[int(torch.randint(len(others), (1,), generator=generator))]
        picks.append((a, b, t))
    a_idx, b_idx, target = (torch.tensor(column) for column in zip(*picks))
    images = torch.cat([x[a_idx], x[b_idx]])
    goal = torch.cat([target, target]).to(x.device)
    moved = push(model, images, target=goal).x_adv.detach()
    reached = (predict(model, moved, batch_size) == goal).view(2, -1).all(0).cpu()
    keep = reached.nonzero().flatten()[:n]
    m = len(picks)
    source = [
        {"start_index": int(a_idx[i]), "end_index": int(b_idx[i]), "start_class": int(pred[a_idx[i]]), "end_class": int(pred[b_idx[i]])}
        for i in keep.tolist()
    ]
    return Pairs(moved[:m][keep], moved[m:][keep], target[keep], source, dropped=_dropped(reached, keep, n))


def noise_pairs(model: nn.Module, x: Tensor, pred: Tensor, n: int, generator: torch.Generator, push: TargetedAttack, batch_size: int) -> Pairs:
    """``n`` pairs of (white noise pushed into class k, a test image classified k)."""
    picks = torch.randint(len(x), (_OVERSAMPLE * n,), generator=generator)
    target = pred[picks].cpu()
    noise = torch.rand((len(picks), *x.shape[1:]), generator=generator).to(x.device, x.dtype)
    goal = target.to(x.device)
    moved = push(model, noise, target=goal).x_adv.detach()
    reached = (predict(model, moved, batch_size) == goal).cpu()
    keep = reached.nonzero().flatten()[:n]
    source = [{"start_index": -1, "end_index": int(picks[i]), "start_class": -1, "end_class": int(target[i])} for i in keep.tolist()]
    return Pairs(moved[keep], x[picks[keep]], target[keep], source, dropped=_dropped(reached, keep, n))


def _dropped(reached: Tensor, keep: Tensor, n: int) -> int:
    """Failed candidates up to the last one kept (all of them when fewer than ``n`` were kept)."""
    examined = reached[: int(keep[-1]) + 1] if len(keep) == n else reached
    return int((~examined).sum())


def make_pairs(pair_type: str, model: nn.Module, x: Tensor, pred: Tensor, options: PathOptions, seed: int) -> Pairs:
    """The pairs of one type for one model, drawn from ``(x, pred)`` by ``seed``."""
    generator = torch.Generator().manual_seed(seed * len(PAIR_TYPES) + _TYPE_SEED[pair_type])
    n = options.count(pair_type)
    if pair_type == "natural":
        return natural_pairs(x, pred, n, generator)
    maker = adversarial_pairs if pair_type == "adversarial" else noise_pairs
    return maker(model, x, pred, n, generator, options.attack("push_attack"), options.batch_size)


def path_pca(vertices: Tensor, num_points: int, components: int) -> dict[str, Tensor]:
    """Principal components of a path, from ``num_points`` points spaced evenly along it.

    Sampling by arc length (rather than PCA of the vertices alone) weights each part of the path
    by its length and keeps a straight two-vertex path meaningful.
    """
    vertices = vertices.detach().double()  # resampled in float32, a straight path would wobble by rounding
    points = resample_path(vertices, num_points).flatten(1).numpy()
    q = min(components, points.shape[0], points.shape[1])
    pca = PCA(n_components=q, svd_solver="full").fit(points)
    ratio = np.zeros(components)
    ratio[:q] = pca.explained_variance_ratio_
    width = max(3, q)
    projection = np.zeros((len(points), width))
    projection[:, :q] = pca.transform(points)
    vertex_projection = np.zeros((len(vertices), width))
    vertex_projection[:, :q] = pca.transform(vertices.flatten(1).numpy())
    # A component's sign is arbitrary; orient each so the path starts on its negative side.
    flip = np.where(projection[0] > 0, -1.0, 1.0)
    projection, vertex_projection = projection * flip, vertex_projection * flip
    return {
        "projection": torch.from_numpy(projection[:, :3]).float(),
        "vertex_projection": torch.from_numpy(vertex_projection[:, :3]).float(),
        "explained_variance_ratio": torch.from_numpy(ratio).float(),
    }


class PathSearchResult(ProbeResult):
    """``rows`` (table ``table2``): per model and pair type the certified, sampled-only and failed
    paths, and over the successful ones the mean and standard deviation of the number of points
    and of the normalised deviation from the straight segment; ``pairs``: one row per pair;
    ``arrays[f"{model}/{pair_type}/projection"]``: the figure path's first three principal components."""

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.tables["table2"]

    @property
    def pairs(self) -> list[dict[str, Any]]:
        return self.tables["pairs"]


def path_search(models: Any, images: Tensor, labels: Tensor | None = None, *, class_names: Sequence[str] | None = None, dataset: str = "images",
                seed: int | None = None, cache_dir: str | Path | None = None, progress: Progress = no_progress, **options: Any) -> PathSearchResult:
    """Paths inside one class between pairs of images drawn from the first ``candidate_images``
    images, per model and pair type (natural, adversarial, noise), certified where the model is
    piecewise linear.

    labels: not used (pairs follow each model's own predictions); accepted so that every probe
            is called alike.
    options: those of ``conf/probe/path_connectivity.yaml`` (its values are the defaults).
    seed: which pairs are drawn (default: ``conf/config.yaml``'s seed).
    cache_dir: where each pair's path is kept as soon as it is found (None: nothing is kept).
    """
    settings = PathOptions.from_cfg(dict(options))
    named, x_all, _, classes = prepare_inputs(models, images, labels, labels_required=False, labels_are_classes=False)
    x_all, _ = first(x_all, None, settings.candidate_images)
    settings = fitted(settings, named, x_all, classes)
    seed = run_seed(seed)
    names = list(class_names) if class_names is not None else [str(i) for i in range(classes)]
    pair_rows: list[dict[str, Any]] = []
    arrays: dict[str, Tensor] = {}
    figure_paths: dict[str, dict[str, Any]] = {}
    generation: dict[str, dict[str, Any]] = {}
    checks: dict[str, dict[str, Any]] = {}
    total = len(named) * sum(settings.count(t) for t in settings.pair_types)
    done = 0

    with seeded(seed, x_all.device):
        for variant, model in named.items():
            pred = predict(model, x_all, settings.batch_size)
            # <cache>/path_connectivity/pairs-<fingerprint>/<pair type>/: the pairs, then each pair's path.
            parts = PartialResults(None if cache_dir is None else Path(cache_dir) / "path_connectivity", "pairs", _identity(model, settings, seed, dataset, x_all))
            certifier, check, why_not = variant_check(model, settings)
            checks[variant] = {"check": check, "not_certified_because": why_not[:5]}
            for pair_type in settings.pair_types:
                pairs = _load_or_make_pairs(parts, pair_type, model, x_all, pred, settings, seed)
                generation.setdefault(variant, {})[pair_type] = {"requested": settings.count(pair_type), "found": len(pairs.label), "dropped": pairs.dropped}
                records = _search_pairs(parts, pair_type, model, pairs, settings, certifier, progress, done, total, f"{variant}/{pair_type}")
                done += settings.count(pair_type)
                rows = [_pair_row(variant, pair_type, i, pairs, record, names, check) for i, record in enumerate(records)]
                pair_rows.extend(rows)
                # Every successful path's explained-variance ratio, for statistics over paths (the scorecard's).
                ratios = [path_pca(record["vertices"], settings.pca_points, settings.pca_components)["explained_variance_ratio"]
                          for record, row in zip(records, rows) if row["success"]]
                arrays[f"{variant}/{pair_type}/pair_explained_variance_ratio"] = (
                    torch.stack(ratios) if ratios else torch.zeros(0, settings.pca_components))
                chosen = _figure_path(rows)
                if chosen is not None:
                    pca = path_pca(records[chosen]["vertices"], settings.pca_points, settings.pca_components)
                    for key, value in pca.items():
                        arrays[f"{variant}/{pair_type}/{key}"] = value
                    figure_paths.setdefault(variant, {})[pair_type] = {k: rows[chosen][k] for k in ("pair", "class", "class_name", "points", "deviation")}
    progress(total, total, "path_connectivity")

    meta = {
        "dataset": dataset,
        "variants": list(named),
        "pair_types": settings.pair_types,
        "options": settings.as_dict(),
        "pair_generation": generation,
        "checks": checks,
        "figure_paths": figure_paths,
        "seed": seed,
    }
    return PathSearchResult("path_connectivity", arrays=arrays, tables={"table2": table2_rows(pair_rows), "pairs": pair_rows}, meta=meta)


@register("probe", "path_connectivity", options=PathOptions)
def compute(ctx: ProbeContext) -> ProbeResult:
    options = PathOptions.from_cfg(dict(ctx.options))
    x, _ = load_images(ctx, options.split, options.candidate_images)
    info = ctx.data.info
    return path_search(ctx.models, x, None, class_names=info.class_names, dataset=info.name,
                       **{**ctx.common(), "cache_dir": ctx.shared_dir or ctx.work_dir}, **ctx.options)


def table2_rows(pair_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant and pair type: certified / sampled-only / failed counts, and the mean and std
    (over successful paths) of points and normalised deviation."""
    out = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in pair_rows:
        groups.setdefault((row["model"], row["pair_type"]), []).append(row)
    for (variant, pair_type), rows in groups.items():
        ok = [r for r in rows if r["success"]]
        points = np.array([r["points"] for r in ok], dtype=float)
        deviation = np.array([r["deviation"] for r in ok], dtype=float)
        out.append(
            {
                "model": variant,
                "pair_type": pair_type,
                "check": rows[0]["check"],
                "pairs": len(rows),
                "certified": sum(r["status"] == "certified" for r in rows),
                "sampled_only": sum(r["status"] == "sampled" for r in rows),
                "failed": sum(r["status"] == "failed" for r in rows),
                "successes": len(ok),
                "success_rate": len(ok) / len(rows) if rows else math.nan,
                "points_mean": _mean(points),
                "points_std": _std(points),
                "deviation_mean": _mean(deviation),
                "deviation_std": _std(deviation),
                "depth_mean": _mean(np.array([r["depth"] for r in ok], dtype=float)),
                "evaluations_mean": _mean(np.array([r["evaluations"] for r in rows], dtype=float)),
                "bound_checks_mean": _mean(np.array([r["bound_checks"] for r in rows], dtype=float)),
                "pieces_mean": _mean(np.array([r["pieces"] for r in rows], dtype=float)),
                "seconds_mean": _mean(np.array([r["seconds"] for r in rows], dtype=float)),
            }
        )
    return out


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else math.nan


def _std(values: np.ndarray) -> float:
    # Sample standard deviation, as reported alongside a mean over a handful of paths.
    return float(values.std(ddof=1)) if len(values) > 1 else math.nan


def _num_classes(model: nn.Module, x: Tensor) -> int:
    with torch.no_grad():
        return int(model(x[:1]).shape[1])


def _identity(model: nn.Module, options: PathOptions, seed: int, dataset: str, candidates: Tensor) -> dict[str, Any]:
    """The model weights, options and candidate images that saved pairs and paths depend on."""
    settings = {k: v for k, v in options.as_dict().items() if k not in ("pair_types", "pairs_per_batch", "batch_size", "pca_points", "pca_components", "draw")}
    return {"weights": fingerprint.of_state(model), "options": settings, "seed": seed, "dataset": dataset, "candidates": fingerprint.of_tensors(candidates)}


def _load_or_make_pairs(parts: PartialResults, pair_type: str, model: nn.Module, x: Tensor, pred: Tensor, options: PathOptions, seed: int) -> Pairs:
    def make() -> dict[str, Any]:
        pairs = make_pairs(pair_type, model, x, pred, options, seed)
        return {"x_start": pairs.x_start, "x_end": pairs.x_end, "label": pairs.label, "source": pairs.source, "dropped": pairs.dropped}

    saved = parts.get(f"{pair_type}/pairs", make)
    return Pairs(saved["x_start"].to(x.device), saved["x_end"].to(x.device), saved["label"], saved["source"], saved["dropped"])


def _search_pairs(
    parts: PartialResults,
    pair_type: str,
    model: nn.Module,
    pairs: Pairs,
    options: PathOptions,
    certifier: Certifier | None,
    progress: Progress,
    done: int,
    total: int,
    what: str,
) -> list[dict[str, Any]]:
    """Search every pair (batches of ``pairs_per_batch``), reusing and keeping per-pair results."""
    n = len(pairs.label)
    names = [f"{pair_type}/pair_{i:04d}" for i in range(n)]
    records: list[dict[str, Any] | None] = [parts.load(name) for name in names]
    missing = [i for i in range(n) if records[i] is None]
    for start in range(0, len(missing), options.pairs_per_batch):
        progress(done + n - len(missing) + start, total, what)
        chunk = missing[start : start + options.pairs_per_batch]
        index = torch.tensor(chunk)
        began = time.perf_counter()
        found: list[PathResult] = find_paths(
            model,
            pairs.x_start[index],
            pairs.x_end[index],
            pairs.label[index],
            points_per_segment=options.points_per_segment,
            max_depth=options.max_depth,
            max_vertices=options.max_vertices,
            attack=options.attack("pull_attack"),
            batch_size=options.batch_size,
            certifier=certifier,
        )
        # The pairs of a chunk share their forwards; each is charged an equal share of the time.
        seconds = (time.perf_counter() - began) / len(chunk)
        for i, path in zip(chunk, found):
            records[i] = parts.save(names[i], {
                "vertices": path.vertices,
                "success": path.success,
                "certified": path.certified,
                "pieces": path.pieces,
                "bound_checks": path.bound_checks,
                "uncertified": path.uncertified,
                "depth": path.depth,
                "evaluations": path.evaluations,
                "reason": path.reason,
                "seconds": seconds,
            })
    return [r for r in records if r is not None]


def _pair_row(
    variant: str, pair_type: str, i: int, pairs: Pairs, record: dict[str, Any], class_names: Sequence[str], check: str
) -> dict[str, Any]:
    """One pair's row. ``success`` follows the variant's check: a certified path where paths can
    be certified, a sampled one where they cannot."""
    k = int(pairs.label[i])
    status = "certified" if record["certified"] else "sampled" if record["success"] else "failed"
    success = status == "certified" or (status == "sampled" and check != "certified")
    metrics = path_metrics(record["vertices"]) if record["success"] else {"points": math.nan, "deviation": math.nan, "length_ratio": math.nan}
    return {
        "model": variant,
        "pair_type": pair_type,
        "pair": i,
        "class": k,
        "class_name": class_name(class_names, k),
        **pairs.source[i],
        "check": check,
        "status": status,
        "success": success,
        "reason": record["reason"] or ("" if success else f"{record['uncertified']} segment(s) over probe.max_pieces"),
        "points": int(metrics["points"]) if record["success"] else math.nan,
        "deviation": metrics["deviation"],
        "length_ratio": metrics["length_ratio"],
        "depth": int(record["depth"]),
        "evaluations": int(record["evaluations"]),
        "pieces": int(record["pieces"]),
        "bound_checks": int(record.get("bound_checks", 0)),
        "seconds": float(record["seconds"]),
    }


def _figure_path(rows: list[dict[str, Any]]) -> int | None:
    """The successful path that deviates most from its chord (ties: more points); None if none succeeded."""
    ok = [r for r in rows if r["success"]]
    if not ok:
        return None
    return max(ok, key=lambda r: (r["deviation"], r["points"]))["pair"]
