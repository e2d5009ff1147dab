"""Cost of the path search and of its exact certification (issues 6 and 15.3) on digits.

A ``smallcnn`` (width 16) trained for a few seconds on the embedded digits; pairs made by the
probe's own generators from the first 500 test images.

Search rows (``search: ...``), with the probe's defaults (16 check points per segment, depth 10,
pull overshoot 1.0, every segment that passes its check certified):

- ``natural`` and ``adversarial`` (the first 8 of the report's 18 and 30 pairs);
- ``adversarial, pull overshoot 0.02``: Fawzi et al.'s small overshoot, on 4 pairs.

Certification rows (``certify: ...``): the straight segments between those 8 natural pairs,
walked piece by piece alone, then proved by interval bounds with the walk for what they leave
(the path search's way), all in one batched call and one segment per call.

Columns:

- ``pairs``: pairs (search rows) or segments (certification rows);
- ``certified``: share of paths (segments) certified; ``sampled``: share that passed only the
  sampled check (search rows);
- ``points``: mean vertices of a certified path;
- ``evals/path``: images the model classified or attacked per path, as the search counts them;
- ``bounds/seg``: mean intervals bounded per segment (each one forward of the interval's bounds
  and its two ends);
- ``pieces/seg``: mean linear pieces the certifier walked per segment (each one forward of the
  segment and of its direction, i.e. one jvp); ``max pieces``: the most for one segment
  (search rows: the most for one path, summed over every segment it certified);
- ``forwards``: batched forwards the certifier ran (each over every segment still walking);
- ``ms/seg``: CPU milliseconds per certified segment (search rows: per path);
- ``x sampled check``: ``ms/seg`` over the cost of the sampled check of the same segments (one
  batched forward of their 17 check points each);
- ``x walk only``: ms per segment of the walk alone over this row's;
- ``x batched``: ms per segment certified alone over ms per segment certified in one batch.

Times are CPU seconds of this process on one thread, so other jobs on a shared machine skew
neither side. Targets (the line under the table): batching certification across segments is at least 2x
cheaper per segment than one segment per call, and the bounds at least 10x cheaper than walking
every piece.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from robustness.bench import BenchRows, single_thread, verdict
from robustness.testing import train_digits_smallcnn
from robustness.geometry.certify import Certifier
from robustness.geometry.paths import PathResult, check_fractions, find_paths
from robustness.registry import build
from robustness.tensors import predict
from robustness.probes.path_connectivity import Pairs, PathOptions, make_pairs, variant_check

LEGEND = {
    "row": "search rows: the pair type searched; certify rows: how the straight segments were certified",
    "pairs": "pairs (search rows) or segments (certification rows)",
    "certified": "share of paths (segments) certified",
    "sampled": "share of paths that passed only the sampled check (search rows)",
    "points": "mean vertices of a certified path",
    "evals/path": "images the model classified or attacked per path, as the search counts them",
    "bounds/seg": "mean intervals bounded per segment (one forward of the interval's bounds and its two ends each)",
    "pieces/seg": "mean linear pieces walked per segment (one forward of the segment and of its direction each)",
    "max pieces": "the most pieces for one segment (search rows: for one path, over every segment it certified)",
    "forwards": "batched forwards the certifier ran (each over every segment still walking)",
    "ms/seg": "CPU milliseconds per certified segment, one thread (search rows: per path)",
    "x sampled check": "ms/seg over the sampled check of the same segments (one batched forward of their check points)",
    "x walk only": "ms per segment of the walk alone over this row's",
    "x batched": "ms per segment certified one per call over ms per segment certified in one batch",
}


# Pairs per row: each certified segment walks ~1000-2000 linear pieces, one forward each, so the
# report's 18 + 30 pairs would take minutes on a shared CPU; these keep `make bench` short.
NATURAL, ADVERSARIAL, SMALL_OVERSHOOT = 8, 8, 4


def _first(pairs: Pairs, n: int) -> Pairs:
    return Pairs(pairs.x_start[:n], pairs.x_end[:n], pairs.label[:n], pairs.source[:n])


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def _search(model: nn.Module, pairs: Pairs, overshoot: float, options: PathOptions, certifier: Certifier | None) -> list[PathResult]:
    pull = build("attack", {**options.pull_attack, "overshoot": overshoot})
    return find_paths(
        model, pairs.x_start, pairs.x_end, pairs.label, attack=pull, points_per_segment=options.points_per_segment,
        max_depth=options.max_depth, batch_size=options.batch_size, certifier=certifier,
    )


def _search_row(name: str, model: nn.Module, pairs: Pairs, overshoot: float, options: PathOptions, certifier: Certifier | None) -> dict[str, Any]:
    n = len(pairs.label)
    found, seconds = _timed(lambda: _search(model, pairs, overshoot, options, certifier))
    certified = [p for p in found if p.certified]
    return {
        "row": f"search: {name}",
        "pairs": n,
        "certified": len(certified) / n,
        "sampled": sum(p.status == "sampled" for p in found) / n,
        "points": float(np.mean([len(p.vertices) for p in certified])) if certified else float("nan"),
        "evals/path": float(np.mean([p.evaluations for p in found])),
        "bounds/seg": float("nan"),
        "pieces/seg": float("nan"),
        "max pieces": max(p.pieces for p in found),
        "forwards": float("nan"),
        "ms/seg": 1e3 * seconds / n,
        "x sampled check": float("nan"),
        "x walk only": float("nan"),
    }


def _certify_rows(model: nn.Module, pairs: Pairs, certifier: Certifier, options: PathOptions) -> list[dict[str, Any]]:
    a, b, label = pairs.x_start, pairs.x_end, pairs.label
    n = len(label)
    fractions = check_fractions(options.points_per_segment)
    points = a.unsqueeze(1) + fractions.view(1, -1, 1, 1, 1).to(a.dtype) * (b - a).unsqueeze(1)
    _, sampled_seconds = _timed(lambda: predict(model, points.flatten(0, 1)))
    walk_only = dataclasses.replace(certifier, bisect_depth=None)
    walked, walked_seconds = _timed(lambda: walk_only(model, a, b, label))
    batched, batched_seconds = _timed(lambda: certifier(model, a, b, label))
    alone, alone_seconds = _timed(lambda: [certifier(model, a[i : i + 1], b[i : i + 1], label[i : i + 1]) for i in range(n)])
    # Batching changes the cost, never the answer; nor do the bounds.
    assert [int(c.pieces[0]) for c in alone] == batched.pieces.tolist()
    assert walked.status == batched.status == [s for c in alone for s in c.status]
    rows = []
    for name, found, seconds, forwards in (
        ("certify: natural chords, walk only", walked, walked_seconds, walked.batched_calls),
        ("certify: natural chords, bounds then walk", batched, batched_seconds, batched.batched_calls),
        ("certify: natural chords, bounds then walk, one per call", batched, alone_seconds, sum(c.batched_calls for c in alone)),
    ):
        rows.append({
            "row": name,
            "pairs": n,
            "certified": float(found.certified.float().mean()),
            "sampled": float("nan"),
            "points": float("nan"),
            "evals/path": float("nan"),
            "bounds/seg": float("nan") if found.bound_checks is None else float(found.bound_checks.double().mean()),
            "pieces/seg": float(found.pieces.double().mean()),
            "max pieces": int(found.pieces.max()),
            "forwards": forwards,
            "ms/seg": 1e3 * seconds / n,
            "x sampled check": seconds / sampled_seconds,
            "x walk only": walked_seconds / seconds,
        })
    rows[2]["x batched"] = alone_seconds / batched_seconds
    return rows


def run() -> BenchRows:
    with single_thread():
        torch.manual_seed(0)
        model, splits = train_digits_smallcnn()
        x = splits["test"][0][:500]
        pred = predict(model, x)
        options = PathOptions()
        certifier, _, _ = variant_check(model, options)
        assert certifier is not None, "the digits smallcnn is piecewise linear"
        natural = _first(make_pairs("natural", model, x, pred, options, seed=0), NATURAL)
        adversarial = _first(make_pairs("adversarial", model, x, pred, options, seed=0), ADVERSARIAL)
        overshoot = options.pull_attack["overshoot"]
        rows = _certify_rows(model, natural, certifier, options)
        rows += [
            _search_row("natural", model, natural, overshoot, options, certifier),
            _search_row("adversarial", model, adversarial, overshoot, options, certifier),
            _search_row("adversarial, pull overshoot 0.02", model, _first(adversarial, SMALL_OVERSHOOT), 0.02, options, certifier),
        ]
        batching, bounds = rows[2]["x batched"], rows[1]["x walk only"]
        targets = [
            f"batched certification >= 2x cheaper per segment than one per call: {verdict(batching >= 2)} ({batching:.1f}x)",
            f"bounds then walk >= 10x cheaper per segment than the walk alone: {verdict(bounds >= 10)} ({bounds:.0f}x)",
        ]
        return BenchRows(rows, LEGEND, targets)
