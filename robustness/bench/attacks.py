"""Attack benchmarks: DeepFool against foolbox and torchattacks, PGD against a bare gradient pass.

Rows (one dict each, measured side by side in one run on the same model and images). Times are
CPU seconds of this process on one thread (``time.process_time``), so that other jobs on a shared
machine do not skew one side of a ratio.

- ``deepfool ours | foolbox | torchattacks``: ms per image, median rho = ||r|| / ||x||, success rate,
  and ``speedup_of_ours`` (this row's time over ours) and ``rho_over_ours``. The target is
  ours >= 10x faster than foolbox's L2DeepFoolAttack at a median rho within 2% of it.
- ``pgd_linf`` / ``pgd_l2``: attacked images/s against plain forward+backward images/s (one
  forward and one input-gradient backward of the cross-entropy, what a PGD step must pay);
  ``loop_overhead`` = (attack time - one evaluation forward) / (steps x forward+backward time) - 1,
  the cost of the loop itself (target <= 0.10); ``total_overhead`` also counts the final
  evaluation forward that gives the success mask.

The model is a ``smallcnn`` (width 16) trained for a few seconds on the embedded digits, so the
module runs offline in well under three minutes on two CPU cores.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustness.bench import single_thread
from robustness.tensors import l2_norm
from robustness.attacks.deepfool import deepfool
from robustness.attacks.pgd import PGDL2, PGDLinf
from robustness.data.digits import DigitsDataModule, load_digit_splits
from robustness.models.smallcnn import smallcnn

OVERSHOOT = 0.02
MAX_ITER = 50
CANDIDATES = 10


def train_digits_smallcnn(width: int = 16, epochs: int = 6, seed: int = 0) -> tuple[nn.Module, dict[str, tuple[Tensor, Tensor]]]:
    """A smallcnn fitted to the digits in a few seconds on a CPU (about 98% test accuracy), in eval mode.

    Also returns the digit splits it was trained on. Used by this benchmark and the attack tests,
    which need a real nonlinear classifier but not the store or Lightning.
    """
    splits = load_digit_splits(seed)
    x, y = splits["train"]
    torch.manual_seed(seed)
    model = smallcnn(DigitsDataModule.info, width=width)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    order = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=order).split(64):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.zero_grad(set_to_none=True)
    return model.eval(), splits


def correctly_classified(model: nn.Module, x: Tensor, y: Tensor, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """The first ``limit`` images that ``model`` gets right."""
    with torch.no_grad():
        right = model(x).argmax(1) == y
    x, y = x[right], y[right]
    return (x, y) if limit is None else (x[:limit], y[:limit])


def rho(x_adv: Tensor, x: Tensor) -> Tensor:
    """Per-image ||x_adv - x|| / ||x||."""
    return l2_norm(x_adv - x) / l2_norm(x)


def _timed(fn: Callable[[], Tensor]) -> tuple[Tensor, float]:
    # CPU time of this process on one thread: the machine is shared, and wall time would
    # charge one side for whatever else happened to run beside it.
    start = time.process_time()
    out = fn()
    return out, time.process_time() - start


def _deepfool_rows(model: nn.Module, x: Tensor, y: Tensor) -> list[dict]:
    import foolbox
    import torchattacks

    # Frozen parameters give both libraries their best case: their .backward() would otherwise
    # also compute weight gradients that an attack never uses. Ours does not need it.
    frozen = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        fmodel = foolbox.PyTorchModel(model, bounds=(0.0, 1.0))
        fb_attack = foolbox.attacks.L2DeepFoolAttack(steps=MAX_ITER, candidates=CANDIDATES, overshoot=OVERSHOOT)
        ta_attack = torchattacks.DeepFool(model, steps=MAX_ITER, overshoot=OVERSHOOT)
        runs = {
            "ours": lambda xs, ys: deepfool(model, xs, ys, overshoot=OVERSHOOT, max_iter=MAX_ITER, num_candidates=CANDIDATES).x_adv,
            "foolbox": lambda xs, ys: fb_attack(fmodel, xs, ys, epsilons=None)[1],
            "torchattacks": lambda xs, ys: ta_attack(xs, ys),
        }
        measured = {}
        for name, run in runs.items():
            run(x[:4], y[:4])  # warm-up: first-call allocations and lazy imports
            x_adv, seconds = _timed(lambda: run(x, y))
            with torch.no_grad():
                fooled = (model(x_adv).argmax(1) != y).float().mean().item()
            measured[name] = (seconds, rho(x_adv, x).median().item(), fooled)
    finally:
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)

    ours_t, ours_rho, _ = measured["ours"]
    return [
        {
            "row": f"deepfool {name}",
            "images": len(x),
            "ms_per_image": round(1000 * seconds / len(x), 3),
            "median_rho": round(median_rho, 5),
            "success": round(fooled, 4),
            "speedup_of_ours": round(seconds / ours_t, 2),
            "rho_over_ours": round(median_rho / ours_rho, 4),
        }
        for name, (seconds, median_rho, fooled) in measured.items()
    ]


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


def run() -> list[dict]:
    with single_thread():
        torch.manual_seed(0)
        model, splits = train_digits_smallcnn()
        x, y = correctly_classified(model, *splits["test"])
        rows = _deepfool_rows(model, x[:200], y[:200])
        rows += _pgd_rows(model, x[:256], y[:256])
    return rows


if __name__ == "__main__":  # pragma: no cover - manual use; the lead's runner calls run()
    for row in run():
        print(row)
