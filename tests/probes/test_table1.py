"""Probes hessian_norm, min_perturbation, curvature_profile and table1: closed forms, consistency, resume."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import robustness.probes.hessian_norm as hessian_norm_probe
from robustness.data.digits import DigitsDataModule
from robustness.errors import ConfigError
from robustness.geometry.hessian import InputHessian, frobenius_norm_sq, top_eigenvalues
from robustness.models.smallcnn import smallcnn
from robustness.probes import curvature_profile, min_perturbation, table1
from robustness.probes.base import ProbeContext, ProbeResult
from robustness.probes.min_perturbation import minimal_perturbation, shrink_to_boundary
from robustness.registry import build
from robustness.reporting import curvature_profile as curvature_profile_report
from robustness.reporting import hessian_norm as hessian_norm_report
from robustness.reporting import min_perturbation as min_perturbation_report
from robustness.reporting import table1 as table1_report

DEEPFOOL = {"name": "deepfool", "overshoot": 0.02, "max_iter": 50, "num_candidates": 4}
TABLE1 = {"name": "table1", "num_images": 10, "chunk_size": 4, "num_samples": 8, "refine_steps": 12}


# -- the smallest perturbation on a linear classifier ---------------------------------------------


def linear_problem(n: int = 12, classes: int = 3):
    """A linear classifier and images whose nearest boundary lies well inside the pixel box."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, classes)).double().eval()
    x = 0.4 + 0.2 * torch.rand(n, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        model[1].bias.copy_(-(model[1].weight @ x.flatten(1).mean(0)))
    return model, x


def closed_form_distance(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Distance to the complement of the predicted class's polytope: min over its facets."""
    w, b = model[1].weight, model[1].bias
    f = x.flatten(1) @ w.T + b
    c = f.argmax(1)
    gaps = f.gather(1, c[:, None]) - f  # >= 0
    normals = (w[c][:, None, :] - w[None, :, :]).norm(dim=2)
    distance = gaps / normals
    distance[torch.arange(len(x)), c] = float("inf")
    return distance.min(1).values.detach()


def test_min_perturbation_on_a_linear_classifier_is_the_closed_form_distance():
    model, x = linear_problem()
    expected = closed_form_distance(model, x)
    assert float(expected.max()) < 0.25  # the perturbations stay inside [0, 1]
    attack = build("attack", DEEPFOOL)
    refined = minimal_perturbation(model, x, attack, refine_steps=30)
    assert bool(refined["found"].all())
    torch.testing.assert_close(refined["norm"], expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(refined["relative"], expected / x.flatten(1).norm(dim=1), rtol=1e-4, atol=1e-7)
    # Unrefined, DeepFool overshoots by its 2% (plus its 1e-5 nudge); bisection removes that.
    raw = minimal_perturbation(model, x, attack, refine_steps=0)
    torch.testing.assert_close(raw["norm"], 1.02 * expected, rtol=1e-4, atol=2e-5)


def test_bisection_finds_the_first_crossing_along_any_direction():
    model, x = linear_problem(n=8, classes=4)
    w, b = model[1].weight.detach(), model[1].bias.detach()
    torch.manual_seed(5)
    direction = torch.randn_like(x)
    f = x.flatten(1) @ w.T + b
    c = f.argmax(1)

    def first_crossing(direction: torch.Tensor) -> torch.Tensor:
        slope = direction.flatten(1) @ w.T  # d f_j / dt along the direction
        rate = slope - slope.gather(1, c[:, None])  # how fast class j gains on class c
        return torch.where(rate > 0, (f.gather(1, c[:, None]) - f) / rate, torch.full_like(f, float("inf"))).min(1).values

    # Where no class gains along the direction, every class gains on the way back.
    direction = torch.where(torch.isinf(first_crossing(direction)).view(-1, 1, 1, 1), -direction, direction)
    crossing = first_crossing(direction)
    assert bool(torch.isfinite(crossing).all())
    direction = direction * (1.5 * crossing).view(-1, 1, 1, 1)  # the label changes at t = 2/3
    t = shrink_to_boundary(model, x, c, direction, steps=40)
    torch.testing.assert_close(t, torch.full_like(t, 2 / 3), rtol=1e-9, atol=1e-9)


# -- the probes on the digits ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    data = DigitsDataModule(seed=0)
    data.setup()
    return data


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    """Two small CNNs fitted briefly to the digits (full-batch Adam), so attacks have boundaries to find."""
    data = DigitsDataModule(seed=0)
    x, y = data.split_tensors("train", limit=300)
    out = {}
    for seed, variant in enumerate(["base", "cure"]):
        torch.manual_seed(seed)
        model = smallcnn(DigitsDataModule.info, width=4, activation="relu", batch_norm=True)
        optimiser = torch.optim.Adam(model.parameters(), lr=0.03)
        for _ in range(30):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimiser.step()
        out[variant] = model.eval()
    return out


def make_ctx(cfg, models, data, work_dir: Path, progress=None) -> ProbeContext:
    ctx = ProbeContext(options=dict(cfg), models=models, data=data, attack=dict(DEEPFOOL), device=torch.device("cpu"), seed=3, work_dir=work_dir)
    if progress is not None:
        ctx.progress = progress
    return ctx


def test_table1_numbers_equal_the_underlying_estimators_and_the_single_probes(digits, models, tmp_path):
    result = table1.compute(make_ctx(TABLE1, models, digits, tmp_path / "t1"))
    x, y = digits.split_tensors("test", limit=10)
    rows = {row["variant"]: row for row in result.tables["table1"]}
    for variant, model in models.items():
        # The whole batch at once, no chunks: the same numbers the chunked probe reports.
        direct = frobenius_norm_sq(InputHessian(model, x, y), 8, seed=3)
        torch.testing.assert_close(result.arrays[f"{variant}/fro2"], direct.mean, rtol=1e-4, atol=0.0)
        assert rows[variant]["fro2_mean"] == pytest.approx(float(direct.mean.mean()), rel=1e-4)
        assert rows[variant]["fro2_stderr"] == pytest.approx(float(direct.mean.std() / 10**0.5), rel=1e-4)
        assert rows[variant]["fro2_median"] == pytest.approx(float(np.median(direct.mean.double().numpy())), rel=1e-4)
        # Each statistic comes with its bootstrap interval over the images, which contains it.
        for key in ("fro2_mean", "fro2_median", "norm_mean", "norm_median"):
            assert rows[variant][f"{key}_low"] <= rows[variant][key] <= rows[variant][f"{key}_high"]
        assert rows[variant]["fro2_mean_low"] >= float(direct.mean.min()) and rows[variant]["fro2_mean_high"] <= float(direct.mean.max())
        smallest = minimal_perturbation(model, x, build("attack", DEEPFOOL), refine_steps=12)
        torch.testing.assert_close(result.arrays[f"{variant}/norm"], smallest["norm"], rtol=1e-5, atol=1e-7, equal_nan=True)
        found = smallest["found"]
        assert rows[variant]["found"] == int(found.sum()) > 0
        assert rows[variant]["norm_mean"] == pytest.approx(float(smallest["norm"][found].mean()), rel=1e-5)
        assert rows[variant]["relative_mean"] == pytest.approx(float((smallest["norm"] / x.flatten(1).norm(dim=1))[found].mean()), rel=1e-5)
    # The single-column probes compute the very same per-image values.
    single = hessian_norm_probe.compute(make_ctx({k: TABLE1[k] for k in ("num_images", "chunk_size", "num_samples")}, models, digits, tmp_path / "hn"))
    perturbation = min_perturbation.compute(make_ctx({k: TABLE1[k] for k in ("num_images", "chunk_size", "refine_steps")}, models, digits, tmp_path / "mp"))
    for variant in models:
        torch.testing.assert_close(single.arrays[f"{variant}/fro2"], result.arrays[f"{variant}/fro2"])
        torch.testing.assert_close(perturbation.arrays[f"{variant}/norm"], result.arrays[f"{variant}/norm"], equal_nan=True)

    # Titles come from the regularizers' display settings, which the probe stage records.
    result.meta["variant_styles"] = {"base": {"title": "Base model"}, "cure": {"title": "CURE training"}}
    artefacts = table1_report.draw(result, tmp_path / "out")
    artefacts += hessian_norm_report.draw(single, tmp_path / "out")
    artefacts += min_perturbation_report.draw(perturbation, tmp_path / "out")
    for artefact in artefacts:
        assert all(path.is_file() and path.stat().st_size > 0 for path in artefact.paths), artefact.name
    with open(tmp_path / "out" / "table1_curvature.csv", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert [row["Model"] for row in table] == ["Base model", "CURE training"]
    assert float(table[0]["‖H‖_F² mean"]) == pytest.approx(rows["base"]["fro2_mean"])
    assert float(table[0]["‖H‖_F² median"]) == pytest.approx(rows["base"]["fro2_median"])
    assert list(table[0])[:3] == ["Model", "‖H‖_F² mean", "‖H‖_F² mean 95% CI"]
    with open(tmp_path / "out" / "table1_ordering.csv", encoding="utf-8") as handle:
        order = list(csv.DictReader(handle))
    expected = " < ".join(sorted(rows, key=lambda v: rows[v]["fro2_median"]))
    assert [r["Ordering (smallest first)"] for r in order if r["Measure"] == "‖H‖_F²" and r["Statistic"] == "median"] == [expected]
    caption = (tmp_path / "out" / "table1_curvature.md").read_text(encoding="utf-8")
    assert "bootstrap 95% interval" in caption
    (table_artefact,) = [a for a in artefacts if a.name == "table1_curvature"]
    assert "8 Gaussian v per image, exact Hessian-vector products" in table_artefact.methods
    assert "correctly classified or not" in table_artefact.methods


def test_an_interrupted_table1_resumes_to_the_same_table(digits, models, tmp_path, monkeypatch):
    uninterrupted = table1.compute(make_ctx(TABLE1, models, digits, tmp_path / "once"))

    def stop_after_first_perturbation_chunk(done: int, total: int, what: str) -> None:
        if what.startswith("min perturbation") and done >= 4:
            raise KeyboardInterrupt

    work = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        table1.compute(make_ctx(TABLE1, models, digits, work, stop_after_first_perturbation_chunk))
    assert len(list(work.rglob("*.pt"))) == 3 + 1  # base: three ||H|| chunks and one perturbation chunk

    calls = []
    original = hessian_norm_probe.hessian_norm_per_image
    monkeypatch.setattr(hessian_norm_probe, "hessian_norm_per_image", lambda *a, **k: calls.append(1) or original(*a, **k))
    resumed = table1.compute(make_ctx(TABLE1, models, digits, work))
    assert len(calls) == 3  # only the cure variant's chunks were left to compute
    assert resumed.tables == uninterrupted.tables
    for key, value in uninterrupted.arrays.items():
        torch.testing.assert_close(resumed.arrays[key], value, rtol=0.0, atol=0.0, equal_nan=True)

    # A changed setting does not pick up the stale chunks.
    calls.clear()
    table1.compute(make_ctx({**TABLE1, "num_samples": 4}, models, digits, work))
    assert len(calls) == 6


def test_curvature_profile_reports_lanczos_eigenvalues_per_image(digits, models, tmp_path):
    cfg = {"name": "curvature_profile", "num_images": 4, "chunk_size": 3, "k": 5, "num_iter": 12}
    result = curvature_profile.compute(make_ctx(cfg, models, digits, tmp_path / "work"))
    x, y = digits.split_tensors("test", limit=4)
    for variant, model in models.items():
        direct = top_eigenvalues(InputHessian(model, x, y), 5, 12, seed=3)
        # Float32 products: eigenvalues far below the top one are round-off, equal only to ~1e-6 of it.
        torch.testing.assert_close(result.arrays[f"{variant}/eigenvalues"], direct, rtol=1e-4, atol=1e-5 * float(direct.abs().max()))
        row = next(r for r in result.tables["curvature_profile"] if r["variant"] == variant)
        assert row["lambda_1"] == pytest.approx(float(direct[:, 0].mean()), rel=1e-4)
    reloaded = ProbeResult.load(result.save(tmp_path / "saved"))
    artefacts = curvature_profile_report.draw(reloaded, tmp_path / "out")
    assert {path.suffix for artefact in artefacts for path in artefact.paths} == {".png", ".pdf", ".csv", ".md"}


@pytest.mark.parametrize(
    "probe, cfg, message",
    [
        (table1, {"num_image": 10}, "unknown option"),
        (table1, {"estimator": "newton"}, "estimator"),
        (table1, {"num_samples": 1}, "at least 2"),
        (table1, {"h": -1.0}, "positive number"),
        (min_perturbation, {"refine_steps": -1}, "refine_steps"),
        (curvature_profile, {"k": 10, "num_iter": 5}, "at least probe.k"),
        (hessian_norm_probe, {"split": "dev"}, "split"),
        (hessian_norm_probe, {"num_images": 0}, "positive integer"),
    ],
)
def test_bad_probe_options_raise_config_errors(probe, cfg, message, digits, models, tmp_path):
    with pytest.raises(ConfigError, match=message):
        probe.compute(make_ctx(cfg, models, digits, tmp_path))


# -- the experiments, end to end on the digits ----------------------------------------------------


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_table1_curvature_experiment_writes_the_report_table(tmp_path):
    from helpers import run_experiment

    overrides = ["probe.num_images=8", "probe.num_samples=8", "probe.chunk_size=4", "attack.num_candidates=4"]
    out = run_experiment("table1_curvature", overrides, tmp_path)
    for name in ("table1_curvature.csv", "table1_curvature.md", "table1_curvature_vs_distance.png", "table1_curvature_vs_distance.pdf"):
        assert (out / name).is_file(), name
    rows = read_csv(out / "table1_curvature.csv")
    assert [row["Model"] for row in rows] == ["Base model", "Adversarial training", "PGD training", "CURE training"]
    for row in rows:
        assert float(row["‖H‖_F² mean"]) > 0 and float(row["‖r‖₂ median"]) > 0
        assert row["attack succeeded"].endswith("/8")
    caption = (out / "table1_curvature.md").read_text(encoding="utf-8")
    assert "the first 8 test images of digits" in caption and "8 Gaussian v per image" in caption


def test_curvature_profile_experiment_writes_its_figure(tmp_path):
    from helpers import run_experiment

    out = run_experiment("curvature_profile", ["probe.num_images=3", "probe.k=5", "probe.num_iter=12"], tmp_path)
    for name in ("curvature_profile.png", "curvature_profile.pdf", "curvature_profile.csv", "curvature_profile.md"):
        assert (out / name).is_file(), name
    rows = read_csv(out / "curvature_profile.csv")
    assert [row["Model"] for row in rows] == ["Base model", "Adversarial training", "PGD training", "CURE training"]
    # Sorted by magnitude: the mean top eigenvalue is at least the mean fifth one.
    assert all(float(row["λ₁ (mean)"]) >= abs(float(row["λ_5 (mean)"])) for row in rows)
