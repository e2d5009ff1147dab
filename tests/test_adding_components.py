"""docs/DESIGN.md, "Adding a probe, an attack, a regularizer, a dataset", followed to the letter.

In a copy of the project, a toy probe (each image's logit margin), a toy attack (random signs of
size eps), a toy regularizer (label smoothing) and a toy dataset (the digits mirrored) are added by
writing exactly the three files the section's table lists for each. Then, as a user would: the
toy variant is trained by the digits recipe it is not listed in, the toy probe and the toy attack
run as sections of a report beside a probe of the project's, report.md shows them, and a model is
trained on the toy dataset with the generic recipe. The probe's numbers are checked against the
margin recomputed from the stored model.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

TOY_PROBE = "toy_margin"
TOY_REGULARIZER = "toy_smoothing"
TOY_ATTACK = "toy_noise"
TOY_DATASET = "toy_mirror"

PROBE_MODULE = '''"""Probe ``toy_margin``: each image's logit margin (its top logit minus the runner-up's)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from robustness.probes.base import ProbeContext, ProbeOptions, ProbeResult, prepare_inputs, probe_options
from robustness.probes.per_image import first, load_images
from robustness.registry import register


@probe_options("toy_margin")
class ToyMarginOptions(ProbeOptions):
    num_images: int
    split: str


def toy_margin(models: Any, images: Tensor, labels: Tensor, **options: Any) -> ProbeResult:
    settings = ToyMarginOptions.from_cfg(options)
    named, x, y, _ = prepare_inputs(models, images, labels)
    x, y = first(x, y, settings.num_images)
    rows, arrays = [], {}
    with torch.no_grad():
        for name, model in named.items():
            top2 = model(x).topk(2, dim=1).values
            margin = (top2[:, 0] - top2[:, 1]).double()
            arrays[f"{name}/margin"] = margin.cpu()
            rows.append({"variant": name, "mean_margin": float(margin.mean()), "images": int(len(x))})
    return ProbeResult("toy_margin", arrays, {"toy_margin": rows}, {"variants": list(named), "caption": "Mean logit margin per model"})


@register("probe", "toy_margin", options=ToyMarginOptions)
def compute(ctx: ProbeContext) -> ProbeResult:
    options = ToyMarginOptions.from_cfg(ctx.options)
    x, y = load_images(ctx, options.split, options.num_images)
    return toy_margin(ctx.models, x, y, **ctx.options)
'''

PROBE_YAML = """name: toy_margin
num_images: 40
split: test
"""

REGULARIZER_MODULE = '''"""Label smoothing: cross-entropy against (1 - smoothing) one-hot + smoothing / K."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from robustness.registry import register
from robustness.training.regularizer import Regularizer, StepOutput


@register("regularizer", "toy_smoothing")
class ToySmoothing(Regularizer):
    def __init__(self, variant: str = "toy_smoothing", init_from: str | None = None, smoothing: float = 0.1) -> None:
        self.variant, self.init_from, self.smoothing = variant, init_from, float(smoothing)

    def training_loss(self, model: nn.Module, x: Tensor, y: Tensor, epoch: int) -> StepOutput:
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.smoothing)
        return StepOutput(loss=loss, logits=logits, logs={"ce": loss.detach()})
'''

REGULARIZER_YAML = """name: toy_smoothing
variant: toy_smoothing
display: {title: Toy smoothing, colour: "#123456"}
init_from: null
smoothing: 0.1
"""

ATTACK_MODULE = '''"""Attack ``toy_noise``: each pixel moved by +-eps at random, no gradient (a floor for any attack)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from robustness.attacks.base import FixedEpsilonAttack, Perturbed
from robustness.registry import register


@register("attack", "toy_noise")
@dataclass
class ToyNoise(FixedEpsilonAttack):
    eps: float = 0.1
    norm: ClassVar[str] = "linf"

    def perturb(self, model: nn.Module, x0: Tensor, y: Tensor | None, target: Tensor | None) -> Perturbed:
        label = y if y is not None else model(x0).argmax(1)
        signs = torch.randint(0, 2, x0.shape, device=x0.device, dtype=x0.dtype) * 2 - 1
        x_adv = (x0 + self.eps * signs).clamp(0.0, 1.0)
        return Perturbed(x_adv, torch.ones(len(x0), dtype=torch.long, device=x0.device), label)
'''

ATTACK_YAML = """name: toy_noise
eps: 0.1
"""

DATASET_MODULE = '''"""Dataset ``toy_mirror``: the embedded digits, mirrored left to right."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from robustness.data.base import TensorImageDataset
from robustness.data.digits import DigitsDataModule, digits_identity, load_digit_splits
from robustness.registry import register


@register("dataset", "toy_mirror")
class ToyMirror(DigitsDataModule):
    info = replace(DigitsDataModule.info, name="toy_mirror")

    def setup(self, stage: str | None = None) -> None:
        if self.test_set is not None:
            return
        splits = {k: (x.flip(-1), y) for k, (x, y) in load_digit_splits(self.seed, self.val_fraction, self.test_fraction).items()}
        self.train_set = self._subsample_train(TensorImageDataset(*splits["train"]), splits["train"][1])
        self.val_set = TensorImageDataset(*splits["val"])
        self.test_set = TensorImageDataset(*splits["test"])

    def _content_identity(self) -> dict[str, Any]:
        return {"mirrored": digits_identity()}
'''

DATASET_YAML = """name: toy_mirror
batch_size: 64
eval_batch_size: 512
num_workers: 0
val_fraction: 0.15
test_fraction: 0.25
train_fraction: 1.0
"""

CONTENTS = {
    "probe": {
        "robustness/probes/NAME.py": PROBE_MODULE,
        "conf/probe/NAME.yaml": PROBE_YAML,
        "robustness/probes/__init__.py": "from robustness.probes import NAME  # noqa: E402,F401\n",
    },
    "regularizer": {
        "robustness/training/NAME.py": REGULARIZER_MODULE,
        "conf/regularizer/NAME.yaml": REGULARIZER_YAML,
        "robustness/training/__init__.py": "from robustness.training import NAME  # noqa: E402,F401\n",
    },
    "attack": {
        "robustness/attacks/NAME.py": ATTACK_MODULE,
        "conf/attack/NAME.yaml": ATTACK_YAML,
        "robustness/attacks/__init__.py": "from robustness.attacks import NAME  # noqa: E402,F401\n",
    },
    "dataset": {
        "robustness/data/NAME.py": DATASET_MODULE,
        "conf/dataset/NAME.yaml": DATASET_YAML,
        "robustness/data/__init__.py": "from robustness.data import NAME  # noqa: E402,F401\n",
    },
}
NAMES = {"probe": TOY_PROBE, "regularizer": TOY_REGULARIZER, "attack": TOY_ATTACK, "dataset": TOY_DATASET}


def design_files(kind: str) -> list[str]:
    """The files docs/DESIGN.md's table lists for adding a ``kind``, with their NAME placeholder."""
    text = (REPO / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    section = text[text.index("## Adding a probe, an attack, a regularizer, a dataset"):]
    row = next(line for line in section.splitlines() if line.startswith(f"| {kind} |"))
    return re.findall(r"`([^`]+)`", row.split("|")[2])


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project with the toy probe and the toy regularizer added as DESIGN.md says."""
    root = tmp_path_factory.mktemp("project")
    for folder in ("robustness", "conf", "experiments"):
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    before = snapshot(root)
    for kind, files in CONTENTS.items():
        listed = design_files(kind)
        assert sorted(listed) == sorted(files), f"DESIGN.md lists {listed} for a {kind}; this test writes {sorted(files)}"
        for pattern, content in files.items():
            path = root / pattern.replace("NAME", NAMES[kind])
            content = content.replace("NAME", NAMES[kind])
            if path.name == "__init__.py":  # one import line, appended
                path.write_text(path.read_text(encoding="utf-8") + content, encoding="utf-8")
            else:
                assert not path.exists(), path
                path.write_text(content, encoding="utf-8")
    after = snapshot(root)
    touched = sorted(name for name in after if before.get(name) != after[name])
    expected = sorted(p.replace("NAME", NAMES[k]) for k, files in CONTENTS.items() for p in files)
    assert touched == expected and len(touched) == 12  # three files each, nothing else
    return root


def _run(project: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(project), "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_a_toy_probe_attack_regularizer_and_dataset_take_three_files_each_and_reach_the_report(project: Path, tmp_path: Path) -> None:
    common = ["logger=csv", f"paths.artifacts_dir={tmp_path / 'store'}", f"paths.output_dir={tmp_path / 'out'}",
              f"paths.data_dir={tmp_path / 'data'}", "trainer.max_epochs=2", "trainer.enable_progress_bar=false"]
    # Registered and trained by the digits recipe, which does not list it.
    trained = _run(project, "-m", "robustness", "experiment=train", f"regularizer={TOY_REGULARIZER}", *common, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    # Run by an experiment, as a section of a report beside one of the project's probes.
    sections = (f"+report.sections={{{TOY_PROBE}: {{experiment: probe, overrides: ['probe={TOY_PROBE}']}}, training_shift: {{}}, "
                f"robust_accuracy: {{overrides: ['attack={TOY_ATTACK}', 'probe.eps=[0.0,0.3]', 'probe.n_images=40']}}}}")
    reported = _run(project, "-m", "robustness", "experiment=report_digits", "~report.sections", sections,
                    f"variants=[base,{TOY_REGULARIZER}]", "store.train_overrides=['trainer.max_epochs=2']", *common, cwd=tmp_path)
    assert reported.returncode == 0, reported.stderr[-3000:]
    (report,) = (tmp_path / "out" / "report_digits").glob("*/report.md")
    text = report.read_text(encoding="utf-8")
    assert "Mean logit margin per model" in text and "Toy smoothing" in text
    (table,) = report.parent.glob(f"*/{TOY_PROBE}.csv")
    rows = {row["variant"]: row for row in csv.DictReader(table.open(encoding="utf-8"))}
    assert set(rows) == {"base", TOY_REGULARIZER} and all(int(row["images"]) == 40 for row in rows.values())

    # The table's numbers are the stored models' own margins on the first 40 test images.
    check = (
        "import robustness, torch\n"
        f"x, y = robustness.load_data('digits', n=40, data_dir={str(tmp_path / 'data')!r})\n"
        f"for name in ('base', {TOY_REGULARIZER!r}):\n"
        f"    model = robustness.load_model(name, dataset='digits', store={str(tmp_path / 'store')!r})\n"
        "    with torch.no_grad():\n"
        "        top2 = model(x).topk(2, dim=1).values.double()\n"
        "    print(name, float((top2[:, 0] - top2[:, 1]).mean()))\n"
    )
    recomputed = _run(project, "-c", check, cwd=tmp_path)
    assert recomputed.returncode == 0, recomputed.stderr[-3000:]
    for line in recomputed.stdout.strip().splitlines():
        name, value = line.split()
        assert float(rows[name]["mean_margin"]) == pytest.approx(float(value), rel=1e-6), name
    # Label smoothing caps the margin a model learns: the toy variant's is the smaller.
    assert float(rows[TOY_REGULARIZER]["mean_margin"]) < float(rows["base"]["mean_margin"])

    # The toy attack ran in the robust-accuracy section: at eps 0 it is the clean accuracy, at 0.3
    # (noise of 0.3 on every pixel) it flips some images and never mends one.
    (accuracies,) = report.parent.glob("*/robust_accuracy.csv")
    by_eps: dict[tuple[str, float], float] = {}
    for row in csv.DictReader(accuracies.open(encoding="utf-8")):
        assert TOY_ATTACK in row["attack"], row
        by_eps[row["variant"], float(row["eps"])] = float(row["robust_acc"])
    for variant in ("base", TOY_REGULARIZER):
        assert 0.0 < by_eps[variant, 0.3] < by_eps[variant, 0.0]

    # The toy dataset: a model trained on it with the recipe for any data, stored under its name.
    mirrored = _run(project, "-m", "robustness", "experiment=train", f"dataset={TOY_DATASET}", "recipe=generic", *common, cwd=tmp_path)
    assert mirrored.returncode == 0, mirrored.stderr[-3000:]
    (meta,) = (tmp_path / "store" / TOY_DATASET / "smallcnn").glob("entries/*/v-*/meta.json")
    assert '"toy_mirror"' in meta.read_text(encoding="utf-8")
