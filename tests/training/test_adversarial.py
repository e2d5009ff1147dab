"""Adversarial fine-tuning, PGD training, defensive distillation and the robust_accuracy probe."""

from __future__ import annotations

import copy
import csv
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from robustness.attacks.runner_up import RunnerUp
from robustness.data.base import DatasetInfo
from robustness.data.digits import DigitsDataModule
from robustness.errors import ConfigError, TrainingError
from robustness.models.smallcnn import smallcnn
from robustness.probes import robust_accuracy
from robustness.probes.base import ProbeContext, ProbeResult
from robustness.reporting import robust_accuracy as accuracy_report
from robustness.store import ModelStore
from robustness.tensors import accuracy
from robustness.training.adversarial import AdversarialFinetune, PGDTraining
from robustness.training.distillation import Distillation, soft_cross_entropy, train_teacher
from robustness.training.module import ClassifierModule
from robustness.training.regularizer import Regularizer, TrainContext
from robustness.tensors import FoldedTwin

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

CPU = torch.device("cpu")
# A quick runner-up attack for the tests (the configs use step 0.02, up to 500 steps).
FAST_RUNNER_UP = {"name": "runner_up", "step_size": 0.05, "max_steps": 200, "norm": "l2"}


def fit(model: nn.Module, dataset, regularizer: Regularizer, epochs: int, lr: float, callbacks=()) -> pl.Trainer:
    module = ClassifierModule(model, 10, regularizer, lr=lr)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks),
    )
    loader = DataLoader(dataset, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer.fit(module, train_dataloaders=loader)
    return trainer


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(batch_size=64, seed=0)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def base_model(digits: DigitsDataModule) -> nn.Module:
    torch.manual_seed(0)
    model = smallcnn(digits.info, width=16)
    fit(model, digits.train_set, Regularizer(), epochs=4, lr=1e-2)
    return model.eval()


@pytest.fixture(scope="module")
def finetuned(digits: DigitsDataModule, base_model: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    store = ModelStore(tmp_path_factory.mktemp("store"), "digits", "smallcnn")
    model = copy.deepcopy(base_model).train()
    reg = AdversarialFinetune(per_class=20, adv_fraction=0.5, target_accuracy=0.3, attack=FAST_RUNNER_UP, eval_every_n_steps=1)
    reg.setup(TrainContext(model=model, datamodule=digits, store=store, device=CPU))
    assert model.training, "setup must leave the model in the mode it found it"
    base_acc = accuracy(base_model, reg.adv_x, reg.adv_y)
    dataset = reg.train_dataset(digits.train_set)
    trainer = fit(model, dataset, reg, epochs=8, lr=1e-4, callbacks=reg.callbacks())
    return SimpleNamespace(reg=reg, model=model.eval(), store=store, base_acc=base_acc, trainer=trainer, dataset=dataset)


# --------------------------------------------------------------------------------------
# adversarial fine-tuning


def test_finetuned_model_is_more_accurate_on_its_adversarial_set_than_base(finetuned: SimpleNamespace, digits: DigitsDataModule) -> None:
    reg = finetuned.reg
    tuned_acc = accuracy(finetuned.model, reg.adv_x, reg.adv_y)
    # The runner-up attack pushes each image just past its base model's boundary: base is
    # almost never right on the set, and fine-tuning must reach the target.
    assert finetuned.base_acc == pytest.approx(reg.initial_accuracy)
    assert finetuned.base_acc < 0.15
    assert tuned_acc >= reg.target_accuracy
    assert tuned_acc > finetuned.base_acc + 0.2
    # Still a digits classifier on clean test images.
    x_test, y_test = digits.split_tensors("test")
    assert accuracy(finetuned.model, x_test, y_test) > 0.8


def test_training_stops_at_the_first_measurement_that_reaches_the_target(finetuned: SimpleNamespace) -> None:
    reg, trainer = finetuned.reg, finetuned.trainer
    steps = [step for step, _ in reg.stopper.history]
    accs = [acc for _, acc in reg.stopper.history]
    # Measured after every optimiser step; no step ran after the one that reached the target.
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2
    assert accs[-1] >= 0.3 and all(acc < 0.3 for acc in accs[:-1])
    assert trainer.global_step == steps[-1] < 8 * math.ceil(len(finetuned.dataset) / 64)
    assert accuracy(finetuned.model, reg.adv_x, reg.adv_y) == pytest.approx(accs[-1])
    assert float(trainer.callback_metrics["adv_set/acc"]) == pytest.approx(accs[-1])
    assert float(trainer.callback_metrics["adv_set/initial_acc"]) == pytest.approx(reg.initial_accuracy)
    assert reg.describe()["adv_set_acc_history"] == [list(entry) for entry in reg.stopper.history]


def test_adversarial_set_holds_correctly_classified_sources_with_their_true_labels(
    finetuned: SimpleNamespace, base_model: nn.Module, digits: DigitsDataModule
) -> None:
    reg = finetuned.reg
    x_src, y_src = digits.split_tensors("train", indices=finetuned.store.load_tensors("adversarial", reg.cache_name)["source_index"].tolist())
    assert torch.equal(y_src, reg.adv_y)
    assert bool((base_model(x_src).argmax(1) == y_src).all())
    assert torch.bincount(reg.adv_y, minlength=10).tolist() == [20] * 10
    assert float(reg.adv_x.min()) >= 0.0 and float(reg.adv_x.max()) <= 1.0
    # Where the runner-up reached the top, the base model is wrong: accuracy <= 1 - success.
    assert reg.initial_accuracy <= 1.0 - reg.attack_success + 1e-6
    assert reg.attack_success > 0.8
    # Half adversarial, half clean.
    assert len(finetuned.dataset) == 2 * len(reg.adv_y)


def test_adversarial_set_is_cached_and_reused(finetuned: SimpleNamespace, base_model: nn.Module, digits: DigitsDataModule, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = RunnerUp.__call__

    def counting(self, model, x, y=None, target=None):
        calls.append(len(x))
        return original(self, model, x, y, target)

    monkeypatch.setattr(RunnerUp, "__call__", counting)
    first = finetuned.reg
    cache_file = finetuned.store.tensors_path("adversarial", first.cache_name)
    mtime = cache_file.stat().st_mtime_ns
    assert cache_file.with_suffix(".json").is_file()

    again = AdversarialFinetune(per_class=20, target_accuracy=0.3, attack=FAST_RUNNER_UP)
    again.setup(TrainContext(model=copy.deepcopy(base_model), datamodule=digits, store=finetuned.store, device=CPU))
    assert calls == [] and again.from_cache
    assert again.cache_name == first.cache_name and cache_file.stat().st_mtime_ns == mtime
    assert torch.equal(again.adv_x, first.adv_x) and torch.equal(again.adv_y, first.adv_y)

    # Another recipe (or other base weights) is another set.
    other = AdversarialFinetune(per_class=2, target_accuracy=0.3, attack=FAST_RUNNER_UP)
    other.setup(TrainContext(model=copy.deepcopy(base_model), datamodule=digits, store=finetuned.store, device=CPU))
    assert not other.from_cache and sum(calls) == 20 and other.cache_name != first.cache_name


def test_adversarial_finetune_rejects_bad_options() -> None:
    with pytest.raises(ConfigError, match="adv_fraction"):
        AdversarialFinetune(adv_fraction=0.0)
    with pytest.raises(ConfigError, match="per_class"):
        AdversarialFinetune(per_class=0)
    with pytest.raises(ConfigError, match="target_accuracy"):
        AdversarialFinetune(target_accuracy=1.5)
    with pytest.raises(ConfigError, match="eval_every_n_steps"):
        AdversarialFinetune(eval_every_n_steps=-1)
    with pytest.raises(TrainingError, match="setup"):
        AdversarialFinetune().train_dataset([])


# --------------------------------------------------------------------------------------
# PGD training


def test_pgd_training_batch_stays_in_the_eps_ball_and_the_pixel_box(digits: DigitsDataModule, base_model: nn.Module) -> None:
    eps = 0.1
    reg = PGDTraining(attack={"name": "pgd_linf", "eps": eps, "step_size": 0.03, "steps": 5, "random_start": True})
    model = copy.deepcopy(base_model).train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    x, y = digits.split_tensors("train", limit=128)

    x_adv, n_clean = reg.adversarial_batch(model, x, y)
    assert n_clean == 0 and x_adv.shape == x.shape
    assert float((x_adv - x).abs().max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    # The attack's forwards ran in eval mode without parameter gradients.
    assert model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    with torch.no_grad():
        model.eval()
        assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y) + 0.5
        model.train()

    half = PGDTraining(attack={"name": "pgd_linf", "eps": eps, "step_size": 0.03, "steps": 5}, adv_fraction=0.5)
    mixed, n_clean = half.adversarial_batch(model, x, y)
    assert n_clean == 64 and torch.equal(mixed[:64], x[:64]) and not torch.equal(mixed[64:], x[64:])
    out = half.training_loss(model, x, y, epoch=0)
    assert out.logits.shape == (64, 10) and torch.isfinite(out.loss)


def _eval_logits_and_input_gradient(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xg = x.clone().requires_grad_(True)
    logits = model(xg)
    (grad,) = torch.autograd.grad(torch.logsumexp(logits, 1).sum(), xg)
    return logits.detach(), grad


@pytest.mark.parametrize("head_norm", [False, True], ids=["conv-bn", "conv-bn-and-linear-bn"])
def test_folded_twin_follows_the_model_through_training_steps(digits: DigitsDataModule, head_norm: bool) -> None:
    torch.manual_seed(0)
    model = smallcnn(digits.info)
    if head_norm:  # a Linear + BatchNorm1d pair too
        model.net.append(nn.BatchNorm1d(digits.info.num_classes))
    twin = FoldedTwin(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = digits.split_tensors("train", limit=64)
    for step in range(4):  # weights and running statistics move away from their initial values
        optimizer.zero_grad()
        copy_ = twin(x)
        assert copy_ is not None and model.training
        model.eval()
        want = _eval_logits_and_input_gradient(model, x)
        model.train()
        got = _eval_logits_and_input_gradient(copy_, x)
        assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in copy_.modules())
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
        assert all(p.grad is None for p in model.parameters())  # the twin's gradients never reach the model
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def test_pgd_training_attacks_the_folded_twin_as_it_would_the_model_in_eval_mode(digits: DigitsDataModule, base_model: nn.Module) -> None:
    attack = {"name": "pgd_linf", "eps": 0.1, "step_size": 0.03, "steps": 5, "random_start": False}
    model = copy.deepcopy(base_model).train()
    x, y = digits.split_tensors("train", limit=128)
    on_twin, _ = PGDTraining(attack=attack).adversarial_batch(model, x, y)

    class NoTwin(PGDTraining):
        def adversarial_batch(self, model, x, y):  # noqa: ANN001, ANN202 - the same, with folding refused
            self._twin = FoldedTwin(model)
            self._twin._tried = True
            return super().adversarial_batch(model, x, y)

    on_model, _ = NoTwin(attack=attack).adversarial_batch(model, x, y)
    # Sign steps of equal gradients: the same images, but for a few pixels where a gradient
    # component is at round-off from zero.
    assert float((on_twin != on_model).float().mean()) < 0.01
    with torch.no_grad():
        model.eval()
        assert F.cross_entropy(model(on_twin), y) == pytest.approx(float(F.cross_entropy(model(on_model), y)), rel=0.02)
        model.train()


def test_a_model_torch_fx_cannot_trace_has_no_twin(digits: DigitsDataModule) -> None:
    class BranchesOnValues(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.norm, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(256, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.norm(self.conv(x))
            if float(h.mean()) > 0:  # data-dependent control flow: fx cannot trace it
                h = h * 2
            return self.fc(h.flatten(1))

    x, _ = digits.split_tensors("train", limit=8)
    assert FoldedTwin(BranchesOnValues().train())(x) is None


# --------------------------------------------------------------------------------------
# defensive distillation
# --------------------------------------------------------------------------------------
# defensive distillation


def test_soft_label_loss_matches_the_closed_form() -> None:
    s, t, temperature = [1.0, 2.0, 3.0], [3.0, 1.0, 0.0], 2.0
    p = [math.exp(v / temperature) for v in t]
    p = [v / sum(p) for v in p]
    log_z = math.log(sum(math.exp(v / temperature) for v in s))
    expected = -sum(pk * (sk / temperature - log_z) for pk, sk in zip(p, s))
    student = torch.tensor([s], requires_grad=True)
    loss = soft_cross_entropy(student, torch.tensor([t]), temperature)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    # d loss / d s = (softmax(s/T) - softmax(t/T)) / T: the temperature scales both sides.
    (grad,) = torch.autograd.grad(loss, student)
    q = [math.exp(v / temperature - log_z) for v in s]
    assert grad[0].tolist() == pytest.approx([(qk - pk) / temperature for qk, pk in zip(q, p)], rel=1e-5)
    # At T = 1 with one-hot-like teacher logits it is ordinary cross-entropy.
    hard = torch.tensor([[0.0, 200.0, 0.0]])
    assert float(soft_cross_entropy(student.detach(), hard, 1.0)) == pytest.approx(float(F.cross_entropy(student.detach(), torch.tensor([1]))), rel=1e-6)


def test_teacher_temperature_scales_up_the_logits(digits: DigitsDataModule) -> None:
    x, _ = digits.split_tensors("val")
    spread = {}
    for temperature in (1.0, 20.0):
        torch.manual_seed(0)
        teacher = train_teacher(smallcnn(digits.info, width=16), digits, temperature, epochs=2, device=CPU).eval()
        with torch.no_grad():
            spread[temperature] = float(teacher(x).std(dim=1).mean())
    # Cross-entropy on logits / T is minimised by logits T times larger: from the same start,
    # training at T = 20 drives the logits apart much faster (about 2x after two epochs; a
    # teacher that ignored T would give a ratio near 1).
    assert spread[20.0] > 1.5 * spread[1.0]


def test_distillation_teacher_is_cached_and_the_student_learns_its_soft_labels(digits: DigitsDataModule, tmp_path: Path) -> None:
    store = ModelStore(tmp_path, "digits", "smallcnn")
    torch.manual_seed(0)
    student = smallcnn(digits.info, width=16)
    reg = Distillation(temperature=5.0, teacher_epochs=1)
    reg.setup(TrainContext(model=student, datamodule=digits, store=store, device=CPU))
    assert not reg.teacher_from_cache and reg.teacher_val_acc > 0.5
    again = Distillation(temperature=5.0, teacher_epochs=1)
    again.setup(TrainContext(model=student, datamodule=digits, store=store, device=CPU))
    assert again.teacher_from_cache and again.teacher_name == reg.teacher_name
    assert all(torch.equal(a, b) for a, b in zip(again.teacher.state_dict().values(), reg.teacher.state_dict().values()))
    assert Distillation(temperature=10.0, teacher_epochs=1).describe()["temperature"] == 10.0

    x, y = digits.split_tensors("train", limit=32)
    out = reg.training_loss(student, x, y, epoch=0)
    with torch.no_grad():
        expected = soft_cross_entropy(student(x), reg.teacher(x), 5.0)
    assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert out.logits.shape == (32, 10)
    with pytest.raises(ConfigError, match="temperature"):
        Distillation(temperature=0.0)


# --------------------------------------------------------------------------------------
# probe robust_accuracy


class TwoClassLinear(nn.Module):
    """Logits (0, w.x + b): class 1 exactly where w.x + b > 0."""

    def __init__(self, w: torch.Tensor, b: float) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.flatten(1) @ self.w + self.b
        return torch.stack([torch.zeros_like(d), d], dim=1)


def linear_probe_case(eps: list[float]) -> tuple[TwoClassLinear, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images in [0.3, 0.7]^4 (no eps below 0.25 can reach the box), 10% mislabelled, none within 5% of an eps."""
    w = torch.tensor([1.0, -2.0, 0.5, 1.5])
    model = TwoClassLinear(w, b=-0.5).eval()
    g = torch.Generator().manual_seed(0)
    x = 0.3 + 0.4 * torch.rand(400, 4, generator=g)
    margin = x @ w - 0.5
    d_linf, d_l2 = margin.abs() / w.abs().sum(), margin.abs() / w.norm()
    keep = torch.ones(400, dtype=torch.bool)
    for e in eps[1:]:
        for d in (d_linf, d_l2, 1.02 * d_l2):
            keep &= (d - e).abs() > 0.05 * e
    x, margin = x[keep], margin[keep]
    y = (margin > 0).long()
    y[::10] = 1 - y[::10]
    return model, x.view(-1, 1, 2, 2), y, margin


def probe_context(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack: dict, probe: dict, work_dir: Path) -> ProbeContext:
    info = DatasetInfo("toy", 2, (1, 2, 2), ("a", "b"), (0.0,), (1.0,))
    data = SimpleNamespace(info=info, split_tensors=lambda split, limit=None, indices=None: (x[:limit], y[:limit]))
    return ProbeContext(options=probe, models={"linear": model}, data=data, attack=attack, device=CPU, seed=0, work_dir=work_dir)


@pytest.mark.parametrize(
    "attack, norm",
    [
        ({"name": "pgd_linf", "eps": 0.1, "step_size": 0.01, "steps": 10, "random_start": True}, "linf"),
        ({"name": "fgsm", "eps": 0.1}, "linf"),  # exact on a linear model: one step to the corner
        ({"name": "deepfool", "overshoot": 0.02, "max_iter": 50, "num_candidates": 10}, "l2"),
    ],
)
def test_robust_accuracy_of_a_linear_model_is_the_closed_form(attack: dict, norm: str, tmp_path: Path) -> None:
    eps = [0.0, 0.02, 0.05, 0.1, 0.2]
    model, x, y, margin = linear_probe_case(eps)
    w = model.w.detach()
    correct = (margin > 0).long() == y
    if norm == "linf":
        distance = margin.abs() / w.abs().sum()  # the attack reaches the ball's corner against w
    else:
        distance = 1.02 * margin.abs() / w.norm()  # DeepFool's exact step times its overshoot
    probe = {"eps": eps, "n_images": len(y), "batch_size": 64, "norm": norm, "relative_step": 0.25}
    result = robust_accuracy.compute(probe_context(model, x, y, attack, probe, tmp_path / "work"))

    rows = result.tables["robust_accuracy"]
    assert [row["eps"] for row in rows] == eps
    assert rows[0]["clean_acc"] == pytest.approx(float(correct.float().mean()))
    for row in rows:
        expected = float((correct & (distance > row["eps"])).float().mean())
        assert row["robust_acc"] == pytest.approx(expected, abs=1e-9), row
    assert rows[-1]["robust_acc"] < rows[1]["robust_acc"] < rows[0]["robust_acc"]

    # The result round-trips and the reporter writes the table and the figure.
    saved = ProbeResult.load(result.save(tmp_path / "result"))
    artefacts = accuracy_report.draw(saved, tmp_path / "out")
    names = sorted(p.name for a in artefacts for p in a.paths)
    assert names == ["robust_accuracy.csv", "robust_accuracy.md", "robust_accuracy_vs_eps.pdf", "robust_accuracy_vs_eps.png"]
    with open(tmp_path / "out" / "robust_accuracy.csv") as handle:
        assert [float(r["robust_acc"]) for r in csv.DictReader(handle)] == pytest.approx([r["robust_acc"] for r in rows])


def test_robust_accuracy_rejects_bad_options(tmp_path: Path) -> None:
    model, x, y, _ = linear_probe_case([0.0])
    attack = {"name": "pgd_linf", "eps": 0.1, "step_size": 0.01, "steps": 2}
    with pytest.raises(ConfigError, match="eps"):
        robust_accuracy.compute(probe_context(model, x, y, attack, {"eps": [0.1, -0.1]}, tmp_path))
    with pytest.raises(ConfigError, match="unknown option"):
        robust_accuracy.compute(probe_context(model, x, y, attack, {"epsilon": [0.1]}, tmp_path))
    with pytest.raises(ConfigError, match="norm"):
        robust_accuracy.compute(probe_context(model, x, y, attack, {"norm": "l1"}, tmp_path))


# --------------------------------------------------------------------------------------
# the experiment


def test_robust_accuracy_experiment_runs_on_digits(tmp_path: Path) -> None:
    from helpers import run_experiment

    out = run_experiment(
        "robust_accuracy",
        ["variants=[base,adversarial]", "probe.n_images=100", "probe.eps=[0.0,0.1,0.3]", "attack.steps=5"],
        tmp_path,
    )
    with open(out / "robust_accuracy.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["variant"], float(r["eps"])) for r in rows] == [(v, e) for v in ("base", "adversarial") for e in (0.0, 0.1, 0.3)]
    for variant in ("base", "adversarial"):
        mine = [r for r in rows if r["variant"] == variant]
        clean = float(mine[0]["clean_acc"])
        assert clean > 0.5
        assert float(mine[0]["robust_acc"]) == pytest.approx(clean)
        assert float(mine[-1]["robust_acc"]) < clean
    assert (out / "robust_accuracy_vs_eps.png").is_file() and (out / "robust_accuracy_vs_eps.pdf").is_file()
