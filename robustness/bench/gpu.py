"""GPU benchmark (``make bench-gpu``): training throughput and memory at the report's setting.

ResNet-18 at 64x64 with 200 classes (Tiny-ImageNet's shape), batch 128: images per second and
peak GPU memory of a plain cross-entropy step and of a CURE step, each in fp32 and under
bf16-mixed autocast, plus the Tiny-ImageNet loader's images per second. On a machine without a
GPU it says so and measures nothing.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from robustness.bench import BenchRows

BATCH = 128
SHAPE = (3, 64, 64)
CLASSES = 200
STEPS = 10

LEGEND = {
    "step": "what one optimiser step computes (plain cross-entropy, or CURE with lam=4 and h=0.6 at fraction 1)",
    "precision": "fp32, or bf16-mixed autocast",
    "images/s": "training images per second over the timed steps (after warm-up)",
    "peak GiB": "the largest GPU memory allocated during those steps",
}


def _info() -> Any:
    from robustness.data.base import DatasetInfo

    return DatasetInfo("tinyimagenet-shape", CLASSES, SHAPE, tuple(str(i) for i in range(CLASSES)), (0.48, 0.45, 0.40), (0.27, 0.26, 0.28))


def _time_steps(step: Any, device: torch.device) -> tuple[float, float]:
    for _ in range(2):  # warm-up: cuDNN autotuning, allocator
        step()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(STEPS):
        step()
    torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    return STEPS * BATCH / seconds, torch.cuda.max_memory_allocated(device) / 2**30


def training_rows(device: torch.device) -> list[dict[str, Any]]:
    from robustness.models.resnet import resnet18
    from robustness.training.cure import CURE

    rows = []
    x = torch.rand(BATCH, *SHAPE, device=device)
    y = torch.randint(0, CLASSES, (BATCH,), device=device)
    for name in ("plain", "cure"):
        for precision in ("fp32", "bf16-mixed"):
            torch.manual_seed(0)
            model = resnet18(_info()).to(device).train()
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            cure = CURE(lam=4.0, h=0.6, squared=False, bn_mode="batch", fraction=1.0) if name == "cure" else None

            def step() -> None:
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                    loss = cure.training_loss(model, x, y, 0).loss if cure is not None else F.cross_entropy(model(x), y)
                loss.backward()
                optimizer.step()

            try:
                images_per_s, peak = _time_steps(step, device)
                rows.append({"step": name, "precision": precision, "images/s": round(images_per_s, 1), "peak GiB": round(peak, 2)})
            except Exception as exc:  # noqa: BLE001 - e.g. CURE refusing bf16: report it as a row
                rows.append({"step": name, "precision": precision, "images/s": "refused", "peak GiB": str(exc).splitlines()[0][:80]})
    return rows


def loader_rows() -> list[dict[str, Any]]:
    from robustness.bench.data import loader_images_per_second
    from robustness.data import layouts

    with tempfile.TemporaryDirectory() as tmp:
        root = layouts.write_tinyimagenet(Path(tmp), per_class=25, seed=0)
        rate = loader_images_per_second(root, batch_size=BATCH, num_workers=4)
    return [{"step": "tinyimagenet loader (memory-mapped uint8 cache)", "precision": "-", "images/s": round(rate, 1), "peak GiB": "-"}]


def run() -> BenchRows:
    if not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False on this machine, so make bench-gpu measures nothing here.")
        return BenchRows([], LEGEND, [])
    device = torch.device("cuda")
    print(f"GPU: {torch.cuda.get_device_name(device)}; ResNet-18, {SHAPE[1]}x{SHAPE[2]}, {CLASSES} classes, batch {BATCH}, {STEPS} timed steps")
    return BenchRows(training_rows(device) + loader_rows(), LEGEND, [])


if __name__ == "__main__":
    from robustness.reporting.base import markdown_table

    table = run()
    print(markdown_table(table) + "\n" + "\n".join(table.notes))
