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

Precision rows (``bounds: ...``, issue 30): every segment the natural and adversarial searches
certified, certified again by bounds then walk, with the bounds in float64 (the default) and in
float32 rounded outwards, side by side; on digits always, and on Fashion-MNIST (a ``pooledcnn``
fitted for a few seconds) where its files are installed (``make data``). Columns ``exits``,
``over budget``, ``seg/s``, ``same verdicts`` and ``x float64``.

Times are CPU seconds of this process on one thread, so other jobs on a shared machine skew
neither side. Targets (the line under the table): batching certification across segments is at least 2x
cheaper per segment than one segment per call, and the bounds at least 10x cheaper than walking
every piece; the float32 bounds (an option, ``Certifier(outward=True)``) give every segment the
float64 bounds' verdict (no exception), with at least as many segments per second as the float64
bounds, the default (floor 0.8x: below it the option costs more than it saves).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
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
    "exits": "share of segments proved to leave their class (bounds rows)",
    "over budget": "share of segments left undecided within max_pieces (bounds rows)",
    "seg/s": "segments certified per CPU second, one thread (bounds rows)",
    "same verdicts": "share of segments whose verdict is the float64 bounds' (float32 row)",
    "x float64": "seg/s over the float64 bounds' seg/s (float32 row)",
}


# Pairs per row: each certified segment walks ~1000-2000 linear pieces, one forward each, so the
# report's 18 + 30 pairs would take minutes on a shared CPU; these keep `make bench` short.
NATURAL, ADVERSARIAL, SMALL_OVERSHOOT = 8, 8, 4
# Pairs of each type searched on Fashion-MNIST for its precision rows.
FASHION_PAIRS = 3


def _first(pairs: Pairs, n: int) -> Pairs:
    return Pairs(pairs.x_start[:n], pairs.x_end[:n], pairs.label[:n], pairs.source[:n])


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


class _Recorder:
    """A certifier that passes every call on to ``certifier`` and keeps the segments it was asked about."""

    def __init__(self, certifier: Certifier) -> None:
        self.certifier = certifier
        self.segments: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def problems(self, model: nn.Module) -> list[str]:
        return self.certifier.problems(model)

    def __call__(self, model: nn.Module, a: torch.Tensor, b: torch.Tensor, label: torch.Tensor, stop_at_exit: bool = True) -> Any:
        self.segments.append((a, b, label))
        return self.certifier(model, a, b, label, stop_at_exit=stop_at_exit)

    def collected(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(torch.cat(parts) for parts in zip(*self.segments))  # type: ignore[return-value]


def _precision_rows(name: str, model: nn.Module, segments: tuple[torch.Tensor, torch.Tensor, torch.Tensor], certifier: Certifier) -> list[dict[str, Any]]:
    """The same segments certified with float64 bounds and with float32 bounds rounded outwards, side by side."""
    a, b, label = segments
    n = len(label)
    found = {}
    for outward in (False, True):
        both = dataclasses.replace(certifier, outward=outward)
        found[outward] = _timed(lambda: both(model, a, b, label, stop_at_exit=False))
    plain, plain_seconds = found[False]
    rows = []
    for outward, (result, seconds) in found.items():
        rows.append({
            "row": f"bounds: {name}, " + ("float32 rounded outwards" if outward else "float64"),
            "pairs": n,
            "certified": sum(s == "certified" for s in result.status) / n,
            "exits": sum(s == "exits" for s in result.status) / n,
            "over budget": sum(s == "over_budget" for s in result.status) / n,
            "bounds/seg": float(result.bound_checks.double().mean()),
            "pieces/seg": float(result.pieces.double().mean()),
            "seg/s": n / seconds,
            "same verdicts": sum(x == y for x, y in zip(plain.status, result.status)) / n if outward else float("nan"),
            "x float64": plain_seconds / seconds if outward else float("nan"),
        })
    return rows


def _fashion_mnist_model() -> tuple[nn.Module, torch.Tensor] | None:
    """A pooledcnn (width 16) fitted to 6,000 Fashion-MNIST training images for one epoch, and
    500 test images; None where the Debian package's files are not installed."""
    import torch.nn.functional as F

    from robustness.data.fashion_mnist import DEBIAN_FOLDER, FashionMNISTDataModule, read_split

    folder = Path(DEBIAN_FOLDER)
    if not (folder / "train-images-idx3-ubyte.gz").exists():
        return None
    x, y = read_split(folder / "train-images-idx3-ubyte.gz", folder / "train-labels-idx1-ubyte.gz")
    test, _ = read_split(folder / "t10k-images-idx3-ubyte.gz", folder / "t10k-labels-idx1-ubyte.gz")
    x, y = x[:6000].float() / 255, y[:6000]
    torch.manual_seed(0)
    model = build("model", {"name": "pooledcnn", "width": 16, "activation": "relu", "batch_norm": True}, info=FashionMNISTDataModule.info)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for batch in torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).split(128):
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval(), test[:500].float() / 255


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
        recorder = _Recorder(certifier)
        rows += [
            _search_row("natural", model, natural, overshoot, options, recorder),
            _search_row("adversarial", model, adversarial, overshoot, options, recorder),
            _search_row("adversarial, pull overshoot 0.02", model, _first(adversarial, SMALL_OVERSHOOT), 0.02, options, certifier),
        ]
        precision = {"digits": _precision_rows("digits, the searches' segments", model, recorder.collected(), certifier)}
        fashion = _fashion_mnist_model()
        if fashion is not None:
            # The report's Fashion-MNIST budget (report_fashion_mnist: probe.max_pieces=2000).
            fm_model, fm_x = fashion
            fm_pred = predict(fm_model, fm_x)
            fm_options = dataclasses.replace(options, max_pieces=2000)
            fm_certifier, _, _ = variant_check(fm_model, fm_options)
            assert fm_certifier is not None, "pooledcnn is piecewise linear"
            fm_recorder = _Recorder(fm_certifier)
            for pair_type in ("natural", "adversarial"):
                pairs = _first(make_pairs(pair_type, fm_model, fm_x, fm_pred, fm_options, seed=0), FASHION_PAIRS)
                _search(fm_model, pairs, overshoot, fm_options, fm_recorder)
            precision["Fashion-MNIST"] = _precision_rows("Fashion-MNIST, the searches' segments", fm_model, fm_recorder.collected(), fm_certifier)
        for found in precision.values():
            rows += found
        batching, bounds = rows[2]["x batched"], rows[1]["x walk only"]
        targets = [
            f"batched certification >= 2x cheaper per segment than one per call: {verdict(batching >= 2)} ({batching:.1f}x)",
            f"bounds then walk >= 10x cheaper per segment than the walk alone: {verdict(bounds >= 10)} ({bounds:.0f}x)",
        ]
        for name, (plain, fast) in precision.items():
            speed = fast["x float64"]
            targets.append(f"float32 bounds on {name}: the float64 bounds' verdict on every segment: {verdict(fast['same verdicts'] == 1)}; "
                           f">= 1x the float64 bounds' segments per second (floor 0.8x): {verdict(speed >= 1)} ({speed:.2f}x)")
        if fashion is None:
            targets.append("Fashion-MNIST rows skipped: its files are not installed (make data)")
        return BenchRows(rows, LEGEND, targets)
