"""Cost of the path search (issue 6): model evaluations and time per path on digits.

A ``smallcnn`` (width 16) trained for a few seconds on the embedded digits; pairs made by the
probe's own generators from the first 500 test images. Rows:

- ``natural`` (the report's 18 pairs) and ``adversarial`` (30 pairs), with the probe's default
  search (16 check points per segment, depth 10, pull overshoot 1.0);
- ``adversarial, pull overshoot 0.02``: Fawzi et al.'s small overshoot, on 10 pairs.

Columns: success rate, mean points per successful path, ``evals/path`` (images the model classified
or attacked, as counted by the search), ``ms/path`` searching all pairs of the row in one batched
call, ``ms/path alone`` searching them one pair per call, and ``x batched`` = alone / batched (the
gain of sharing each level's forwards and DeepFool calls across pairs). Times are CPU seconds of
this process on one thread, so that other jobs on a shared machine do not skew either side.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from robustness.bench import single_thread
from robustness.bench.attacks import train_digits_smallcnn
from robustness.geometry.paths import PathResult, find_paths, path_metrics
from robustness.registry import build
from robustness.tensors import predict
from robustness.probes.path_connectivity import Pairs, PathOptions, make_pairs


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def _search(model: nn.Module, pairs: Pairs, overshoot: float, options: PathOptions, sl: slice = slice(None)) -> list[PathResult]:
    pull = build("attack", {**options.pull_attack, "overshoot": overshoot})
    return find_paths(
        model, pairs.x_start[sl], pairs.x_end[sl], pairs.label[sl], attack=pull,
        points_per_segment=options.points_per_segment, max_depth=options.max_depth, batch_size=options.batch_size,
    )


def _row(name: str, model: nn.Module, pairs: Pairs, overshoot: float, options: PathOptions, compare_alone: bool) -> dict[str, Any]:
    n = len(pairs.label)
    batched, seconds = _timed(lambda: _search(model, pairs, overshoot, options))
    ok = [p for p in batched if p.success]
    row: dict[str, Any] = {
        "row": name,
        "pairs": n,
        "success": len(ok) / n,
        "points": float(np.mean([len(p.vertices) for p in ok])) if ok else float("nan"),
        "deviation": float(np.mean([path_metrics(p.vertices)["deviation"] for p in ok])) if ok else float("nan"),
        "evals/path": float(np.mean([p.evaluations for p in batched])),
        "ms/path": 1e3 * seconds / n,
    }
    if compare_alone:
        alone, alone_seconds = _timed(lambda: [_search(model, pairs, overshoot, options, slice(i, i + 1))[0] for i in range(n)])
        # Same paths either way: batching must change the cost, never the answer.
        assert [len(p.vertices) for p in alone] == [len(p.vertices) for p in batched]
        row["ms/path alone"] = 1e3 * alone_seconds / n
        row["x batched"] = alone_seconds / seconds
    else:
        row["ms/path alone"] = row["x batched"] = float("nan")
    return row


def run() -> list[dict]:
    with single_thread():
        torch.manual_seed(0)
        model, splits = train_digits_smallcnn()
        x = splits["test"][0][:500]
        pred = predict(model, x)
        options = PathOptions()
        natural = make_pairs("natural", model, x, pred, options, seed=0)
        adversarial = make_pairs("adversarial", model, x, pred, options, seed=0)
        few = Pairs(adversarial.x_start[:10], adversarial.x_end[:10], adversarial.label[:10], adversarial.source[:10])
        return [
            _row("natural", model, natural, options.pull_attack["overshoot"], options, compare_alone=True),
            _row("adversarial", model, adversarial, options.pull_attack["overshoot"], options, compare_alone=True),
            _row("adversarial, pull overshoot 0.02", model, few, 0.02, options, compare_alone=False),
        ]
