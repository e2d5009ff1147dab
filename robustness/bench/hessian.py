"""Cost of the input-Hessian estimators behind Table 1 and the curvature profile.

For the digits ``smallcnn`` (1x8x8) and ``resnet18`` on 32x32 colour images (random weights:
cost does not depend on training), measured side by side in one run on the same images:

- ``gradients/s``: plain input gradients of the loss (one forward + one backward per image), the
  unit of cost;
- ``HVPs/s``: Hessian-vector products per second, exact by double backward through a graph built
  once per batch, exact as the probes take them (from the logit Jacobian, built once per batch,
  where the network is piecewise linear: "factored"), or by finite differences (one more gradient
  per product);
- ``HVP cost (gradients)``: how many plain gradients one product costs;
- ``speed vs exact``: this row's HVPs/s over the double backward's;
- ``‖H‖_F² speed vs exact``: the same for the whole estimate (the factored rows pay for the
  Jacobian once per batch, so this is the ratio a probe sees);
- ``ms/image ‖H‖_F²``: wall time per image of the whole Monte-Carlo estimate with ``samples``
  products per image (gradient at the images, random directions and all products included).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from robustness.bench import BenchRows
from robustness.data.base import DatasetInfo
from robustness.data.digits import DigitsDataModule
from robustness.geometry.hessian import ESTIMATORS, InputHessian, frobenius_norm_sq, input_gradient
from robustness.models.resnet import resnet18
from robustness.models.smallcnn import smallcnn

CIFAR_LIKE = DatasetInfo("random32", 10, (3, 32, 32), tuple(str(i) for i in range(10)), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
FD_STEP = 0.1
LEGEND = {
    "row": "model, then how the products are taken (factored: from the logit Jacobian, as the probes take them on these networks)",
    "images": "images in the batch",
    "samples": "Monte-Carlo products per image in the whole ||H||_F^2 estimate",
    "gradients/s": "plain input gradients of the loss per second (one forward + one backward per image): the unit of cost",
    "HVPs/s": "Hessian-vector products per second (image-products)",
    "HVP cost (gradients)": "how many plain gradients one product costs",
    "ms/image ‖H‖_F²": "wall milliseconds per image of the whole estimate (gradient, directions, Jacobian where factored, products)",
    "speed vs exact": "HVPs/s over the double backward's",
    "‖H‖_F² speed vs exact": "the whole estimate's speed over the double backward's (what a probe sees at this many samples)",
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _seconds(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    """Median wall time of ``fn`` after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _model_rows(name: str, model: nn.Module, x: Tensor, y: Tensor, samples: int, repeat: int) -> list[dict[str, Any]]:
    device = x.device
    n = len(x)
    grad_s = _seconds(lambda: input_gradient(model, x, y), device, repeat)
    v = torch.randn_like(x)
    rows: list[dict[str, Any]] = []
    # exact products by double backward, then as the probes take them (factored from the logit
    # Jacobian where the network is piecewise linear, as these are), then finite differences
    variants = [("exact, double backward", "exact", False), ("exact", "exact", True)] + [(e, e, True) for e in ESTIMATORS if e != "exact"]
    for label, estimator, factor in variants:
        hessian = InputHessian(model, x, y, estimator, FD_STEP, factor=factor)
        hvp_s = _seconds(lambda: hessian(v), device, repeat)
        total_s = _seconds(
            lambda: frobenius_norm_sq(InputHessian(model, x, y, estimator, FD_STEP, factor=factor), samples), device, max(1, repeat // 2)
        )
        rows.append({
            "row": f"{name} {label}" + (" (factored)" if hessian.factored else ""),
            "images": n,
            "samples": samples,
            "gradients/s": n / grad_s,
            "HVPs/s": n / hvp_s,
            "HVP cost (gradients)": hvp_s / grad_s,
            "ms/image ‖H‖_F²": 1e3 * total_s / n,
        })
    exact = rows[0]["HVPs/s"]
    whole = rows[0]["ms/image ‖H‖_F²"]
    for row in rows:
        row["speed vs exact"] = row["HVPs/s"] / exact
        row["‖H‖_F² speed vs exact"] = whole / row["ms/image ‖H‖_F²"]
    return rows


def run() -> BenchRows:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    big = device.type == "cuda"
    rows: list[dict[str, Any]] = []
    generator = torch.Generator().manual_seed(0)

    torch.manual_seed(0)
    digits = smallcnn(DigitsDataModule.info).to(device).eval()
    n = 100
    x = torch.rand(n, 1, 8, 8, generator=generator).to(device)
    y = torch.randint(0, 10, (n,), generator=generator).to(device)
    rows += _model_rows("smallcnn digits", digits, x, y, samples=64 if big else 16, repeat=5)

    torch.manual_seed(0)
    net = resnet18(CIFAR_LIKE).to(device).eval()
    n = 100 if big else 4
    x = torch.rand(n, 3, 32, 32, generator=generator).to(device)
    y = torch.randint(0, 10, (n,), generator=generator).to(device)
    rows += _model_rows("resnet18 32x32", net, x, y, samples=32 if big else 3, repeat=3 if big else 1)
    return BenchRows(rows, LEGEND, [])


if __name__ == "__main__":
    from robustness.reporting.base import markdown_table

    print(markdown_table(run()))
