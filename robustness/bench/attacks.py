"""Attack benchmarks: DeepFool against foolbox and torchattacks, PGD against a bare gradient pass.

Rows (one dict each, measured side by side in one run on the same model and images). Times are
CPU seconds of this process on one thread (``time.process_time``), so that other jobs on a shared
machine do not skew one side of a ratio.

DeepFool runs on two models: a ``smallcnn`` (width 16) trained for a few seconds on the embedded
digits, and an untrained (seed 0) ``resnet18`` at 32x32 with 10 classes on the digits upsampled to
32x32 RGB, attacked away from its own predictions. Forward and backward passes are counted
(images per pass), so the floor below is measured, not assumed: a wrapper around the model counts
foolbox's and the autograd rows', and ours are counted where its forwards and its sweeps of
cotangents happen (a sweep of k-1 cotangents for m images counts (k-1) m backward rows).

    foolbox pays, per loop iteration and for every image until the last one is fooled, k-1
    forwards and k-1 backwards (one value-and-grad per candidate); ours pays, per image and per
    its own iteration, one forward and one backward sweep of its k-1 candidate cotangents
    (``geometry.jacobian``). Ours runs, as every probe runs it, on the model's batch-norm-folded,
    channels-last copy (``tensors.inference_copy``, the time to make it included); "ours on the
    model" runs the same attack on the model itself, which is not an fx graph and so gets
    autograd's products, one backward call per candidate. With t_F, t_B the measured per-image
    cost of a forward and of an input-gradient backward on the model (foolbox's passes) and
    t_F', t_S the cost of our forward and of one cotangent row of a full-batch sweep on the copy,
    the best speedup our scheme can reach is  floor = (foolbox's forwards x t_F + backwards x t_B)
    / ((mean iterations + 1) x t_F' + (k-1) x mean iterations x t_S).

PGD rows: attacked images/s against plain forward+backward images/s (what a PGD step must pay).
The legend and the targets come with the rows (``BenchRows.notes``).
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from importlib import import_module
from typing import Callable, Iterator
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustness.bench import BenchRows, single_thread, verdict
from robustness.tensors import inference_copy
from robustness.attacks.deepfool import deepfool
from robustness.geometry.jacobian import Linearization, linearize
from robustness.attacks.pgd import PGDL2, PGDLinf
from robustness.testing import correctly_classified, digits_resnet18, rho, train_digits_smallcnn

OVERSHOOT = 0.02
MAX_ITER = 50
CANDIDATES = 10
SMALLCNN_IMAGES = 200
SPEEDUP_TARGETS = {"smallcnn": 8.0, "resnet18": 4.0}
RHO_TOLERANCE = 0.005
PGD_OVERHEAD_TARGET = 0.10

LEGEND = {
    "row": "what is measured (deepfool ours: on the batch-norm-folded copy the probes use, making it included, "
    "candidate gradients in one sweep; ours on the model: the same attack on the model itself, which gets autograd's "
    "products; gradients: one iteration's k-1 candidate gradients on the copy)",
    "model": "smallcnn (digits, trained) or resnet18 (32x32 digits, untrained)",
    "images": "images attacked",
    "ms_per_image": "CPU milliseconds per image, one thread",
    "median_rho": "median of ||x_adv - x|| / ||x||",
    "success": "share of images the model itself misclassifies after the attack (ours decides on the folded copy, "
    "equal to float round-off: a point left within round-off of the boundary can read either way)",
    "speedup_of_ours": "this row's time over ours (deepfool rows) or over our sweep (gradient rows)",
    "rho_over_ours": "this row's median rho over ours",
    "iterations": "mean DeepFool iterations per image (foolbox: its loop runs until every image is fooled)",
    "forwards_per_image": "counted forward passes per image",
    "backwards_per_image": "counted input-gradient backward passes per image (ours: cotangent rows swept)",
    "floor_speedup": "best speedup over foolbox for 1 forward + a sweep of k-1 cotangents per iteration, from counted "
    "passes and measured full-batch costs",
    "of_floor": "measured speedup over floor_speedup",
    "steps": "PGD iterations",
    "attack_images_per_s": "images per second through the whole attack",
    "fwd_bwd_images_per_s": "images per second through one forward + input-gradient backward",
    "loop_overhead": "(attack - final evaluation forward) / (steps x forward+backward) - 1",
    "total_overhead": "attack / (steps x forward+backward) - 1",
}


class PassCounter(nn.Module):
    """Counts the images that go through forward and backward passes of ``model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.forwards = 0
        self.backwards = 0

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        self.forwards += len(x)
        if out.requires_grad:
            out.register_hook(self._count_backward)
        return out

    def _count_backward(self, grad: Tensor) -> None:
        self.backwards += grad.shape[0]

    def reset(self) -> None:
        self.forwards = self.backwards = 0








def _timed(fn: Callable[[], Tensor]) -> tuple[Tensor, float]:
    # CPU time of this process on one thread: the machine is shared, and wall time would
    # charge one side for whatever else happened to run beside it.
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def _per_image_pass_times(model: nn.Module, x: Tensor, repeats: int = 3) -> tuple[float, float]:
    """(t_F, t_B): CPU seconds per image of a forward that keeps its graph and of one
    input-gradient backward of a logit difference through it."""
    forwards, backwards = [], []
    for _ in range(repeats + 1):
        xa = x.clone().requires_grad_(True)
        start = time.process_time()
        logits = model(xa)
        middle = time.process_time()
        torch.autograd.grad((logits[:, 0] - logits[:, 1]).sum(), xa)
        forwards.append(middle - start)
        backwards.append(time.process_time() - middle)
    # the first pair is a warm-up
    return statistics.median(forwards[1:]) / len(x), statistics.median(backwards[1:]) / len(x)


def _first_class_gaps(k: int, n: int, classes: int) -> Tensor:
    """(k, n, classes) cotangents of the logit differences z_j - z_0, j = 1..k, for n images."""
    cotangents = torch.zeros(k, n, classes)
    cotangents[:, :, 0] = -1.0
    cotangents[torch.arange(k), :, torch.arange(1, k + 1)] = 1.0
    return cotangents


def _sweep_pass_times(model: nn.Module, x: Tensor, repeats: int = 3) -> tuple[float, float]:
    """(t_F', t_S): CPU seconds per image of our forward (:func:`linearize`) and per cotangent
    row of one sweep of k-1 candidate cotangents through it."""
    k = CANDIDATES - 1
    cotangents = _first_class_gaps(k, len(x), linearize(model, x[:1]).logits.shape[1])
    forwards, sweeps = [], []
    for _ in range(repeats + 1):
        start = time.process_time()
        at = linearize(model, x)
        middle = time.process_time()
        at.vjp(cotangents)
        forwards.append(middle - start)
        sweeps.append(time.process_time() - middle)
    return statistics.median(forwards[1:]) / len(x), statistics.median(sweeps[1:]) / (k * len(x))


def _gradient_rows(model: nn.Module, x: Tensor, model_name: str, repeats: int = 3) -> list[dict]:
    """One DeepFool iteration's k-1 candidate gradients on the folded copy: a backward call per
    candidate, one batched vector-Jacobian product (``is_grads_batched``), and our sweep."""
    k = CANDIDATES - 1
    n = len(x)
    copy = inference_copy(model, x[:1], for_gradients=True)
    cotangents = _first_class_gaps(k, n, linearize(copy, x[:1]).logits.shape[1])

    def graph() -> tuple[Tensor, Tensor]:
        xa = x.clone().requires_grad_(True)
        return copy(xa), xa

    def loop() -> Tensor:
        logits, xa = graph()
        return torch.stack([torch.autograd.grad(logits, xa, cotangents[j], retain_graph=j + 1 < k)[0] for j in range(k)])

    def batched() -> Tensor:
        logits, xa = graph()
        return torch.autograd.grad(logits, xa, cotangents, is_grads_batched=True)[0]

    def sweep() -> Tensor:
        return linearize(copy, x).vjp(cotangents)

    reference = loop()
    for name, fn in (("batched", batched), ("sweep", sweep)):
        if not torch.allclose(fn(), reference, rtol=1e-4, atol=1e-5):
            raise AssertionError(f"the {name} gradients disagree with the per-candidate backward passes")
    variants = {"loop": loop, "batched": batched, "sweep": sweep}
    times: dict[str, list[float]] = {key: [] for key in variants}
    for _ in range(repeats):  # interleaved, so that load on the machine hits all alike
        for key, fn in variants.items():
            times[key].append(_timed(fn)[1])
    medians = {key: statistics.median(values) for key, values in times.items()}
    names = {
        "loop": "gradients: one backward call per candidate",
        "batched": "gradients: one batched VJP (vmap)",
        "sweep": "gradients: one sweep of all candidates (ours)",
    }
    return [
        {"row": names[key], "model": model_name, "images": n, "ms_per_image": round(1000 * t / n, 3), "speedup_of_ours": round(t / medians["sweep"], 2)}
        for key, t in medians.items()
    ]


class _CountedLinearization:
    """A linearization that counts, into ``counter``, the images it forwards and the cotangent rows it sweeps."""

    def __init__(self, inner: Linearization, counter: PassCounter) -> None:
        self.inner, self.counter = inner, counter
        self.logits, self.input_shape = inner.logits, inner.input_shape

    def vjp(self, cotangents: Tensor) -> Tensor:
        self.counter.backwards += cotangents.shape[0] * cotangents.shape[1]
        return self.inner.vjp(cotangents)

    def restricted(self, rows: Tensor) -> "_CountedLinearization":
        return _CountedLinearization(self.inner.restricted(rows), self.counter)


@contextmanager
def _counting_linearizations(counter: PassCounter) -> Iterator[None]:
    """DeepFool's linearizations, counted: its forwards there and its sweeps (its last plain
    forward goes through the model, where a hook counts it)."""

    def counted(model: nn.Module, x: Tensor) -> _CountedLinearization:
        counter.forwards += len(x)
        return _CountedLinearization(linearize(model, x), counter)

    # The package exports the function deepfool under the module's name, hence the module by its path.
    with mock.patch.object(import_module("robustness.attacks.deepfool"), "linearize", counted):
        yield


def _deepfool_rows(model: nn.Module, x: Tensor, y: Tensor, model_name: str, with_torchattacks: bool) -> list[dict]:
    import foolbox
    import torchattacks

    # Frozen parameters give both libraries their best case: their .backward() would otherwise
    # also compute weight gradients that an attack never uses. Ours does not need it.
    frozen = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    counter = PassCounter(model).eval()
    ours_counter = PassCounter(model)

    def ours(xs: Tensor, ys: Tensor) -> Tensor:
        # As the probes run it: on the folded copy, the time to make the copy included.
        copy = inference_copy(model, xs[:1], for_gradients=True, reuse=False)
        handle = copy.register_forward_hook(lambda module, args, out: setattr(ours_counter, "forwards", ours_counter.forwards + len(args[0])))
        try:
            with _counting_linearizations(ours_counter):
                return deepfool(copy, xs, ys, overshoot=OVERSHOOT, max_iter=MAX_ITER, num_candidates=CANDIDATES)
        finally:
            handle.remove()

    try:
        t_forward, t_backward = _per_image_pass_times(model, x)
        t_forward_ours, t_sweep = _sweep_pass_times(inference_copy(model, x[:1], for_gradients=True), x)
        fmodel = foolbox.PyTorchModel(counter, bounds=(0.0, 1.0))
        fb_attack = foolbox.attacks.L2DeepFoolAttack(steps=MAX_ITER, candidates=CANDIDATES, overshoot=OVERSHOOT)
        runs = {
            "ours": ours,
            "ours on the model": lambda xs, ys: deepfool(counter, xs, ys, overshoot=OVERSHOOT, max_iter=MAX_ITER, num_candidates=CANDIDATES),
            "foolbox": lambda xs, ys: fb_attack(fmodel, xs, ys, epsilons=None)[1],
        }
        if with_torchattacks:
            ta_attack = torchattacks.DeepFool(counter, steps=MAX_ITER, overshoot=OVERSHOOT)
            runs["torchattacks"] = lambda xs, ys: ta_attack(xs, ys)
        measured, steps = {}, {}
        for name, attack in runs.items():
            attack(x[:2], y[:2])  # warm-up: first-call allocations and lazy imports
            counter.reset()
            ours_counter.reset()
            out, seconds = _timed(lambda: attack(x, y))
            used = ours_counter if name == "ours" else counter
            passes = (used.forwards / len(x), used.backwards / len(x))
            x_adv = out if torch.is_tensor(out) else out.x_adv
            with torch.no_grad():
                fooled = (model(x_adv).argmax(1) != y).float().mean().item()
            measured[name] = {"seconds": seconds, "rho": rho(x_adv, x).median().item(), "fooled": fooled, "passes": passes}
            if not torch.is_tensor(out):
                steps[name] = out.steps.float()
    finally:
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)

    k = CANDIDATES - 1
    ours = measured["ours"]
    # Foolbox's loop runs until the slowest image is fooled: as many iterations as our largest step count.
    iterations = {name: s.mean().item() for name, s in steps.items()} | {"foolbox": steps["ours"].max().item()}
    fb_forwards, fb_backwards = measured["foolbox"]["passes"]
    # Foolbox's passes cost what they cost on the model; ours run on the folded copy, swept.
    mean_steps = iterations["ours"]
    floor_cost_ours = (mean_steps + 1) * t_forward_ours + k * mean_steps * t_sweep
    floor = (fb_forwards * t_forward + fb_backwards * t_backward) / floor_cost_ours
    rows = []
    for name, m in measured.items():
        row = {
            "row": f"deepfool {name}",
            "model": model_name,
            "images": len(x),
            "ms_per_image": round(1000 * m["seconds"] / len(x), 3),
            "median_rho": round(m["rho"], 5),
            "success": round(m["fooled"], 4),
            "speedup_of_ours": round(m["seconds"] / ours["seconds"], 2),
            "rho_over_ours": round(m["rho"] / ours["rho"], 4),
            "iterations": round(iterations[name], 2) if name in iterations else "",
            "forwards_per_image": round(m["passes"][0], 2),
            "backwards_per_image": round(m["passes"][1], 2),
        }
        if name == "foolbox":
            row["floor_speedup"] = round(floor, 2)
            row["of_floor"] = round(row["speedup_of_ours"] / floor, 3)
        rows.append(row)
    return rows


def _deepfool_target(rows: list[dict], model_name: str) -> str:
    row = next(r for r in rows if r["row"] == "deepfool foolbox" and r["model"] == model_name)
    goal = SPEEDUP_TARGETS[model_name]
    rho_ok = abs(row["rho_over_ours"] - 1.0) <= RHO_TOLERANCE
    met = row["speedup_of_ours"] >= goal and rho_ok
    text = (
        f"deepfool {model_name} >= {goal:g}x foolbox at median rho within {100 * RHO_TOLERANCE:g}%: {verdict(met)} "
        f"({row['speedup_of_ours']:g}x, rho ratio {row['rho_over_ours']:g}"
    )
    if not met:
        text += (
            f"; floor {row['floor_speedup']:g}x from foolbox's {row['forwards_per_image']:g} forwards + "
            f"{row['backwards_per_image']:g} backwards per image against ours at 1 forward + a sweep of {CANDIDATES - 1} "
            f"cotangents per iteration at full-batch cost; we reach {100 * row['of_floor']:.0f}% of it"
        )
    return text + ")"


def _pgd_rows(model: nn.Module, x: Tensor, y: Tensor, repeats: int = 7) -> list[dict]:
    def forward_backward() -> Tensor:
        xa = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(xa), y, reduction="sum"), xa)
        return grad

    def evaluate() -> Tensor:
        with torch.no_grad():
            return model(x).argmax(1)

    rows = []
    attacks = {"pgd_linf": PGDLinf(eps=8 / 255, step_size=2 / 255, steps=10), "pgd_l2": PGDL2(eps=0.5, step_size=0.1, steps=10)}
    for name, attack in attacks.items():
        forward_backward(), evaluate(), attack(model, x[:4], y[:4])
        # Interleaved repeats, so that whatever else runs on the machine hits all three alike.
        t_fb, t_eval, t_attack = [], [], []
        for _ in range(repeats):
            t_fb.append(_timed(forward_backward)[1])
            t_eval.append(_timed(evaluate)[1])
            t_attack.append(_timed(lambda: attack(model, x, y).x_adv)[1])
        fb, ev, at = statistics.median(t_fb), statistics.median(t_eval), statistics.median(t_attack)
        rows.append(
            {
                "row": name,
                "model": "smallcnn",
                "images": len(x),
                "steps": attack.steps,
                "attack_images_per_s": round(len(x) / at, 1),
                "fwd_bwd_images_per_s": round(len(x) / fb, 1),
                # the loop alone: the attack less its one final evaluation forward (success mask)
                "loop_overhead": round((at - ev) / (attack.steps * fb) - 1.0, 4),
                "total_overhead": round(at / (attack.steps * fb) - 1.0, 4),
            }
        )
    return rows




def run() -> BenchRows:
    with single_thread():
        torch.manual_seed(0)
        model, splits = train_digits_smallcnn()
        x, y = correctly_classified(model, *splits["test"])
        rows = _deepfool_rows(model, x[:SMALLCNN_IMAGES], y[:SMALLCNN_IMAGES], "smallcnn", with_torchattacks=True)
        rows += _gradient_rows(model, x[:SMALLCNN_IMAGES], "smallcnn")
        rows += _pgd_rows(model, x[:256], y[:256])
        resnet, xr, yr = digits_resnet18()
        resnet.requires_grad_(False)
        rows += _deepfool_rows(resnet, xr, yr, "resnet18", with_torchattacks=False)
        rows += _gradient_rows(resnet, xr[:8], "resnet18", repeats=1)
    targets = [_deepfool_target(rows, name) for name in SPEEDUP_TARGETS]
    for row in rows:
        if "loop_overhead" in row:
            targets.append(f"{row['row']} loop_overhead <= {PGD_OVERHEAD_TARGET:g}: {verdict(row['loop_overhead'] <= PGD_OVERHEAD_TARGET)} ({row['loop_overhead']:g})")
    return BenchRows(rows, LEGEND, targets)


if __name__ == "__main__":  # pragma: no cover - manual use; the lead's runner calls run()
    from robustness.reporting.base import markdown_table

    table = run()
    print(markdown_table(table) + "\n" + "\n".join(table.notes))
