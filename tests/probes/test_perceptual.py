"""Perceptual (colour) attacks: YIQ hue rotation, colour digits, the colour attack, the perceptual probe."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustness.attacks.colour import ColourAttack
from robustness.data.colour_digits import ColourDigitsDataModule, class_hues
from robustness.data.digits import load_digit_splits
from robustness.errors import ConfigError, InputError
from robustness.geometry.colour import (
    dominant_hue,
    dominant_hue_mask,
    equal_luma_colours,
    hue_of,
    hue_rotate,
    recolour,
    rgb_to_yiq,
    yiq_to_rgb,
)
from robustness.models.smallcnn import smallcnn
from robustness.probes import perceptual
from robustness.probes.base import ProbeContext, ProbeResult
from robustness.tensors import predict
from robustness.probes.perceptual import choose_figure, flip_rate_and_accuracy, hue_sweep_predictions, minimal_flip_angle


def wrap(angle: torch.Tensor) -> torch.Tensor:
    return (angle + 180.0).remainder(360.0) - 180.0


def solid(rgb: tuple[float, float, float], n: int = 1, size: int = 4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(rgb, dtype=dtype).view(1, 3, 1, 1).expand(n, 3, size, size).contiguous()


# -- the colour transform -------------------------------------------------------------------------


def test_yiq_round_trip_and_known_hues():
    x = torch.rand(5, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(yiq_to_rgb(rgb_to_yiq(x)), x, atol=1e-12, rtol=0)
    # BT.601 luma of pure red, and the hue order red < orange < yellow < green (HSV-like).
    primaries = torch.tensor([[1.0, 0, 0], [1, 0.5, 0], [1, 1, 0], [0, 1, 0]]).view(4, 3, 1, 1)
    assert float(rgb_to_yiq(primaries)[0, 0]) == pytest.approx(0.299, abs=1e-6)
    hue, _ = hue_of(primaries)
    assert hue.flatten().tolist() == pytest.approx([-19.54, 6.21, 44.10, 117.71], abs=0.01)


@pytest.mark.parametrize("angle", [0.0, 360.0, -360.0, 720.0])
def test_rotation_by_whole_turns_is_the_identity(angle):
    x = torch.rand(6, 3, 8, 8)
    assert float((hue_rotate(x, angle) - x).abs().max()) < 1e-5


def test_grey_images_are_unchanged_by_any_rotation():
    grey = torch.rand(4, 1, 7, 7).expand(4, 3, 7, 7).contiguous()
    for angle in (13.0, 90.0, 180.0, -77.0):
        assert float((hue_rotate(grey, angle) - grey).abs().max()) < 1e-6


def test_rotation_keeps_luma_and_adds_the_angle_to_the_hue():
    torch.manual_seed(1)
    x = torch.rand(8, 3, 6, 6, dtype=torch.float64)  # many saturated pixels: the gamut shrink is exercised
    angles = torch.tensor([10.0, 45.0, 90.0, 135.0, 180.0, -30.0, -120.0, 271.0], dtype=torch.float64)
    out = hue_rotate(x, angles)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    torch.testing.assert_close(rgb_to_yiq(out)[:, 0], rgb_to_yiq(x)[:, 0], atol=1e-10, rtol=0)
    hue_in, chroma_in = hue_of(x)
    hue_out, chroma_out = hue_of(out)
    coloured = chroma_in > 1e-3
    shift = wrap(hue_out - hue_in - angles.view(-1, 1, 1, 1))
    assert float(shift[coloured].abs().max()) < 1e-6
    assert bool((chroma_out <= chroma_in + 1e-12).all())  # the gamut shrink only desaturates
    # A gently coloured image stays inside the cube: its chroma is kept as well.
    soft = 0.4 + 0.2 * x
    _, c_soft = hue_of(soft)
    _, c_rot = hue_of(hue_rotate(soft, 77.0))
    torch.testing.assert_close(c_rot, c_soft, atol=1e-10, rtol=0)


def test_saturation_zero_gives_the_grey_of_equal_luma():
    x = torch.rand(3, 3, 5, 5, dtype=torch.float64)
    grey = recolour(x, saturation=0.0)
    luma = rgb_to_yiq(x)[:, :1]
    torch.testing.assert_close(grey, luma.expand_as(x), atol=1e-12, rtol=0)


def test_gradients_flow_through_pixels_angle_and_saturation():
    torch.manual_seed(2)
    x = (0.1 + 0.8 * torch.rand(2, 3, 3, 3, dtype=torch.float64)).requires_grad_(True)
    angle = torch.tensor([20.0, -75.0], dtype=torch.float64, requires_grad=True)
    sat = (0.8 + 0.6 * torch.rand(2, 1, 3, 3, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c: recolour(a, angle=b, saturation=c), (x, angle, sat), eps=1e-6, atol=1e-5)


def test_red_pepper_turns_orange_and_the_mask_spares_the_stalk():
    # A "pepper": red body, green stalk, grey background.
    x = solid((0.5, 0.5, 0.5), size=8)
    x[:, :, 2:8, 1:7] = torch.tensor([0.8, 0.1, 0.1]).view(1, 3, 1, 1)
    x[:, :, 0:2, 3:5] = torch.tensor([0.1, 0.6, 0.1]).view(1, 3, 1, 1)
    red = x[:, :, 2:3, 1:2]
    centre, has_colour = dominant_hue(x)
    assert bool(has_colour.all()) and float(centre) == pytest.approx(float(hue_of(red)[0]), abs=1e-4)
    for soft in (True, False):
        mask = dominant_hue_mask(x, half_width=30.0, soft=soft)
        out = hue_rotate(x, 26.0, mask)
        outside = (mask == 0).expand_as(x)
        assert bool(outside.any()) and torch.equal(out[outside], x[outside])  # stalk and background untouched
        body_hue = hue_of(out[:, :, 4:5, 3:4])[0]
        orange_hue = hue_of(torch.tensor([1.0, 0.5, 0.0]).view(1, 3, 1, 1))[0]
        assert float(wrap(body_hue - orange_hue).abs()) < 1.0  # red -20 deg + 26 deg ~ orange +6 deg
    # Pixels at the edge of the hue window get a partial soft weight and none at all when hard.
    edge = solid((0.8, 0.1, 0.1), size=8)
    edge[:, :, :, :3] = hue_rotate(edge[:, :, :, :3], 25.0)
    soft_mask, hard_mask = dominant_hue_mask(edge, 30.0, soft=True), dominant_hue_mask(edge, 30.0, soft=False)
    assert 0.0 < float(soft_mask[0, 0, 0, 0]) < 0.1 and float(hard_mask[0, 0, 0, 0]) == 1.0
    assert float(soft_mask[0, 0, 0, 7]) == pytest.approx(1.0, abs=1e-6)


def test_bad_colour_inputs_raise_errors_with_hints():
    with pytest.raises(InputError, match="RGB") as info:
        hue_rotate(torch.rand(2, 1, 8, 8), 30.0)
    assert info.value.hint and "colour_digits" in info.value.hint
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        hue_rotate(torch.rand(2, 3, 4, 4) * 3, 30.0)
    with pytest.raises(InputError, match="entries for 2 images"):
        hue_rotate(torch.rand(2, 3, 4, 4), torch.zeros(3))
    with pytest.raises(InputError, match="saturation"):
        recolour(torch.rand(2, 3, 4, 4), saturation=-1.0)


def test_equal_luma_colours_differ_in_hue_only():
    hues = torch.arange(10) * 36.0
    colours = equal_luma_colours(hues).view(10, 3, 1, 1)
    yiq = rgb_to_yiq(colours.double())
    assert yiq[:, 0].flatten().tolist() == pytest.approx([0.5] * 10, abs=1e-6)
    chroma = yiq[:, 1:].flatten(1).norm(dim=1)
    assert float(chroma.max() - chroma.min()) < 1e-6 and float(chroma.min()) > 0.2
    assert wrap(hue_of(colours)[0].flatten().double() - hues.double()).abs().max() < 1e-3


# -- colour digits --------------------------------------------------------------------------------


def offset_from_class_hue(dm: ColourDigitsDataModule, split: str) -> torch.Tensor:
    """Each image's hue minus its class's hue, wrapped to [-180, 180)."""
    return wrap(dm.hues[split] - class_hues()[dm.split_tensors(split)[1]])


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    points = torch.cat([a, b]).sort().values
    cdf = lambda sample: torch.searchsorted(sample.sort().values, points, right=True).double() / len(sample)
    return float((cdf(a) - cdf(b)).abs().max())


def test_colour_digits_follow_the_class_the_same_way_in_every_split():
    dm = ColourDigitsDataModule(seed=0)
    dm.setup()
    grey = load_digit_splits(0)
    near = {}
    for split in ("train", "val", "test"):
        x, y = dm.split_tensors(split)
        assert x.shape[1:] == (3, 8, 8) and torch.equal(y, grey[split][1])  # the digits module's split
        # Luma is the grey digit times 0.5: the colour carries no shape.
        torch.testing.assert_close(rgb_to_yiq(x)[:, 0:1], 0.5 * grey[split][0], atol=1e-5, rtol=0)
        # The drawn hue is the hue of the image's ink.
        ink = x.flatten(2).sum(2)[:, :, None, None]
        assert float(wrap(hue_of(ink)[0].flatten() - dm.hues[split]).abs().max()) < 1e-2
        near[split] = float((offset_from_class_hue(dm, split).abs() <= 10.0 + 1e-4).float().mean())
    # Every split: 90% in the class's hue (+-10 deg), plus random hues that land there by chance (~0.6%).
    for split, share in near.items():
        assert 0.86 < share < 0.96, (split, share)
    # One colour distribution: the offsets from the class hue of train and of test are two samples
    # of it (KS statistic below the 0.1% critical value, 1.95 sqrt((n + m) / (n m)), about 0.11).
    train, test = offset_from_class_hue(dm, "train"), offset_from_class_hue(dm, "test")
    critical = 1.95 * math.sqrt((len(train) + len(test)) / (len(train) * len(test)))
    assert ks_statistic(train, test) < critical
    # ... which the statistic tells apart from random test colours (the earlier design).
    assert ks_statistic(train, wrap(torch.rand(len(test), generator=torch.Generator().manual_seed(0)) * 360.0)) > 3 * critical
    # correlation=0: colour independent of the class in every split.
    independent = ColourDigitsDataModule(seed=0, correlation=0.0)
    independent.setup()
    assert float((offset_from_class_hue(independent, "test").abs() <= 10.0).float().mean()) < 0.12
    with pytest.raises(ConfigError, match="correlation"):
        ColourDigitsDataModule(correlation=1.5)


@pytest.fixture(scope="module")
def colour_model():
    """A small CNN trained for a few seconds on colour digits (one thread: the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        dm = ColourDigitsDataModule(seed=0)
        dm.setup()
        x, y = dm.split_tensors("train")
        model = smallcnn(dm.info, width=16)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(6):
            for batch in torch.randperm(len(y)).split(64):
                optimizer.zero_grad()
                F.cross_entropy(model(x[batch]), y[batch]).backward()
                optimizer.step()
        model.eval()
        xt, yt = dm.split_tensors("test", limit=200)
        yield model, xt, yt
    finally:
        torch.set_num_threads(threads)


def test_large_hue_shifts_flip_the_trained_base_model(colour_model):
    model, x, y = colour_model
    angles = torch.tensor([0.0, 90.0, 180.0, 270.0])
    flip, accuracy = flip_rate_and_accuracy(hue_sweep_predictions(model, x, angles), y, angles)
    assert float(accuracy[0]) > 0.6  # shape is learnt as well as colour
    assert float(flip[0]) == 0.0
    assert float(flip[1:].mean()) > 0.04  # colour decides a measurable share of the labels


def test_colour_attack_beats_random_recolouring_within_the_same_budget(colour_model):
    model, x, y = colour_model
    keep = predict(model, x) == y
    x, y = x[keep][:80], y[keep][:80]
    # The test digits wear their class's hue (as in training), a cue the model is sure of, and the
    # class hues lie 36 degrees apart: a budget of 90 degrees reaches two classes' hues either way.
    attack = ColourAttack(max_hue=90.0, max_saturation=0.5, grid=2, steps=25, lr=0.1)
    result = attack(model, x, y)
    # Success flags are the truth, the norm is the change's l2, luma is kept.
    assert torch.equal(result.success, predict(model, result.x_adv) != y)
    torch.testing.assert_close(result.norm, (result.x_adv - x).flatten(1).norm(dim=1))
    torch.testing.assert_close(rgb_to_yiq(result.x_adv)[:, 0], rgb_to_yiq(x)[:, 0], atol=1e-5, rtol=0)
    # Random fields of the same budget flip few of these images; the optimised ones many more.
    g = torch.Generator().manual_seed(0)
    random_hit = []
    for _ in range(3):
        hue_p, sat_p = (torch.empty(len(x), 1, 2, 2).uniform_(-3, 3, generator=g) for _ in range(2))
        random_hit.append(float((predict(model, attack.apply(x, hue_p, sat_p, None)) != y).float().mean()))
    rate = float(result.success.float().mean())
    assert rate > 0.3 and rate > 2 * max(random_hit)
    # The fields respect the size budget everywhere.
    angle, sat = attack.fields(torch.full((1, 1, 2, 2), 50.0), torch.full((1, 1, 2, 2), -50.0), (8, 8))
    assert float(angle.abs().max()) <= 90.0 + 1e-4 and float(sat.min()) >= math.exp(-0.5) - 1e-6


def test_colour_attack_targets_and_rejects_grey_images(colour_model):
    model, x, y = colour_model
    x, y = x[:20], y[:20]
    # The runner-up class: test digits wear their class's hue and the model is sure of them, so a
    # far class (say y + 3) is out of reach of colour alone; the nearest one is a fair target.
    with torch.no_grad():
        target = model(x).scatter(1, y[:, None], float("-inf")).argmax(1)
    assert bool((target != y).all())
    result = ColourAttack(max_hue=180.0, steps=30, lr=0.2)(model, x, target=target)
    assert torch.equal(result.success, predict(model, result.x_adv) == target) and bool(result.success.any())
    with pytest.raises(InputError, match="RGB") as info:
        ColourAttack()(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval(), torch.rand(2, 1, 8, 8))
    assert "colour_digits" in info.value.hint
    with pytest.raises(InputError, match="max_hue"):
        ColourAttack(max_hue=0.0)


# -- the smallest flipping rotation ---------------------------------------------------------------


class MeanHueClassifier(nn.Module):
    """Class 1 once the image's mean hue has moved more than tau_pos up or tau_neg down from ref."""

    def __init__(self, ref: float, tau_pos: float, tau_neg: float) -> None:
        super().__init__()
        self.ref, self.tau_pos, self.tau_neg = ref, tau_pos, tau_neg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        yiq = rgb_to_yiq(x)
        i, q = yiq[:, 1].flatten(1).sum(1), yiq[:, 2].flatten(1).sum(1)
        delta = wrap(torch.rad2deg(torch.atan2(-q, i)) - self.ref)
        score = torch.maximum(delta - self.tau_pos, -delta - self.tau_neg)
        score = torch.where(torch.hypot(i, q) < 1e-4, -torch.ones_like(score), score)  # grey: no hue, class 0
        return torch.stack([-score, score], dim=1)


@pytest.mark.parametrize("tau_pos, tau_neg, expected", [(50.0, 70.0, 50.0), (100.0, 33.0, -33.0)])
def test_minimal_flip_angle_flips_and_a_slightly_smaller_one_does_not(tau_pos, tau_neg, expected):
    colour = equal_luma_colours(torch.tensor([20.0]))[0]
    x = torch.cat([colour.view(1, 3, 1, 1).expand(2, 3, 4, 4) * torch.tensor([1.0, 0.6]).view(2, 1, 1, 1), torch.full((1, 3, 4, 4), 0.5)])
    model = MeanHueClassifier(ref=20.0, tau_pos=tau_pos, tau_neg=tau_neg)
    label = torch.zeros(3, dtype=torch.long)
    tol = 0.1
    angle = minimal_flip_angle(model, x, label, step=15.0, max_angle=180.0, tol=tol)
    assert math.isnan(float(angle[2]))  # a grey image: no rotation changes it
    found = angle[:2]
    assert found.tolist() == pytest.approx([expected, expected], abs=tol)
    assert bool((found.abs() >= abs(expected)).all())  # on the flipping side of the boundary
    assert bool((predict(model, hue_rotate(x[:2], found.float())) == 1).all())
    smaller = found - math.copysign(2 * tol, expected)
    assert bool((predict(model, hue_rotate(x[:2], smaller.float())) == 0).all())


def test_flip_rate_counts_only_images_correct_at_zero():
    labels = torch.tensor([0, 1, 2, 3])
    angles = torch.tensor([0.0, 90.0, 180.0])
    preds = torch.tensor([[0, 0, 5], [1, 2, 2], [2, 2, 2], [9, 3, 3]])  # image 3 is wrong unrotated
    flip, accuracy = flip_rate_and_accuracy(preds, labels, angles)
    assert flip.tolist() == pytest.approx([0.0, 1 / 3, 2 / 3])
    assert accuracy.tolist() == pytest.approx([0.75, 0.75, 0.5])


def test_figure_image_is_the_one_fooling_most_models_then_the_surest():
    labels = torch.tensor([0, 1, 2])
    angles = torch.tensor([0.0, 90.0, 180.0, 270.0])
    a = torch.tensor([[0, 0, 7, 7], [1, 5, 5, 1], [2, 2, 2, 2]])
    b = torch.tensor([[0, 0, 7, 0], [1, 5, 1, 1], [2, 2, 2, 2]])
    # Image 0 fools both models at 180, image 1 at 90 (a smaller rotation): confidence decides.
    assert choose_figure({"a": a, "b": b}, labels, angles, confidence=torch.tensor([0.9, 0.5, 0.99])) == (0, 180.0, 2)
    assert choose_figure({"a": a, "b": b}, labels, angles, confidence=torch.tensor([0.5, 0.9, 0.99])) == (1, 90.0, 2)
    assert choose_figure({"a": a, "b": b}, labels, angles, index=2) == (2, 90.0, 0)
    with pytest.raises(ConfigError, match="not one of the sweep"):
        choose_figure({"a": a}, labels, angles, angle=45.0)


# -- the probe and its report ---------------------------------------------------------------------


def test_probe_measures_saves_and_resumes(colour_model, tmp_path: Path):
    model, _, _ = colour_model
    dm = ColourDigitsDataModule(seed=0)
    dm.setup()
    cfg = {"name": "perceptual", "num_images": 24, "chunk_size": 12, "angle_step": 45, "search_step": 45, "search_tol": 1.0,
           "l2_attack": {"name": "deepfool", "max_iter": 20, "num_candidates": 4}, "refine_steps": 8, "region": "dominant"}
    attack = {"name": "colour", "steps": 10, "max_hue": 45.0}
    ctx = ProbeContext(options=cfg, models={"base": model, "again": model}, data=dm, attack=attack, device=torch.device("cpu"), seed=0, work_dir=tmp_path / "work")
    result = perceptual.compute(ctx)
    x, y = dm.split_tensors("test", limit=24)
    assert result.arrays["angles"].tolist() == [0, 45, 90, 135, 180, 225, 270, 315]
    correct = result.arrays["base/correct"]
    assert torch.equal(correct, predict(model, x) == y)
    angle = result.arrays["base/min_angle"]
    found = ~torch.isnan(angle)
    assert bool((found <= correct).all()) and bool(found.any())
    # Every reported angle flips its image; the recolouring's l2 matches the reported one.
    mask = dominant_hue_mask(x[found])
    rotated = hue_rotate(x[found], angle[found].float(), mask)
    assert bool((predict(model, rotated) != y[found]).all())
    torch.testing.assert_close(result.arrays["base/colour_l2"][found], (rotated - x[found]).flatten(1).norm(dim=1).double(), atol=1e-4, rtol=0)
    (row, again) = result.tables["perceptual_summary"]
    assert {**row, "variant": "again"} == again  # the same model under two names: identical numbers
    assert row["correct"] == int(correct.sum()) and 0.0 < row["attack_success_rate"] <= 1.0
    assert row["colour_l2_mean"] > row["l2_attack_mean"] > 0  # l2-large recolourings, l2-small DeepFool
    fig = result.meta["figure"]
    assert fig["label"] == str(int(y[fig["index"]])) and len(result.tables["fig9_top_k"]) == 2 * 2 * 3
    # Resume: a second run reads every chunk back. Chunks are named by the model's weights, so the
    # same model under two names is measured once: two chunks, not four.
    assert len(list((tmp_path / "work").rglob("*.pt"))) == 2
    again_result = perceptual.compute(ctx)
    assert torch.equal(again_result.arrays["base/min_angle"].nan_to_num(-1), angle.nan_to_num(-1))
    result.save(tmp_path / "result")
    loaded = ProbeResult.load(tmp_path / "result")
    assert loaded.tables == result.tables and torch.equal(loaded.arrays["figure/recoloured"], result.arrays["figure/recoloured"])


def test_probe_refuses_grey_datasets_and_bad_options(colour_model, tmp_path: Path):
    from robustness.data.digits import DigitsDataModule

    model, _, _ = colour_model
    grey = DigitsDataModule(seed=0)
    grey.setup()
    ctx = ProbeContext(options={"name": "perceptual"}, models={"base": model}, data=grey, attack={"name": "colour"}, device=torch.device("cpu"), seed=0, work_dir=tmp_path)
    with pytest.raises(ConfigError, match="1 channel") as info:
        perceptual.compute(ctx)
    assert "colour_digits" in info.value.hint
    for bad in ({"angle_step": 0}, {"region": "sky"}, {"search_tol": 20.0}, {"unknown": 1}):
        with pytest.raises(ConfigError):
            perceptual.PerceptualOptions.from_cfg({"name": "perceptual", **bad})
    assert perceptual.PerceptualOptions.from_cfg({"name": "perceptual", "l2_attack": None}).l2_attack is None


# -- the experiments ------------------------------------------------------------------------------


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# colour_digits variants are trained by these tests alone (the rest of the suite uses digits):
# one epoch each keeps that affordable.
ONE_EPOCH = "store.train_overrides=['trainer.max_epochs=1','trainer.enable_progress_bar=false','trainer.log_every_n_steps=1']"
SMALL = [ONE_EPOCH, "probe.num_images=16", "probe.chunk_size=16", "probe.angle_step=60", "probe.search_step=60", "probe.search_tol=2",
         "probe.l2_attack.max_iter=10", "probe.refine_steps=6", "attack.steps=5"]


FIGURE9_FILES = {"fig9_perceptual.png", "fig9_perceptual.pdf", "fig9_top_k.csv", "fig9_top_k.md"}
SWEEP_FILES = {f"{name}.{ext}" for name in ("perceptual_sweep", "perceptual_sizes") for ext in ("png", "pdf")} | {
    f"{name}.{ext}" for name in ("perceptual_summary", "perceptual_sweep") for ext in ("csv", "md")}


@pytest.mark.parametrize("experiment", ["fig9_perceptual", "perceptual_sweep"])
def test_experiment_on_embedded_digits_writes_its_own_files(tmp_path: Path, experiment: str):
    from helpers import run_experiment

    out = run_experiment(experiment, SMALL, tmp_path)
    written = {p.name for p in out.rglob("*") if p.is_file() and p.stat().st_size > 0}
    # Each experiment prints its own items, so a report holding both shows each figure and table once.
    own, other = (FIGURE9_FILES, SWEEP_FILES) if experiment == "fig9_perceptual" else (SWEEP_FILES, FIGURE9_FILES)
    assert own <= written and not (other & written)
    result = ProbeResult.load(next(out.rglob("result.json")).parent)
    if experiment == "perceptual_sweep":
        rows = read_csv(next(out.rglob("perceptual_summary.csv")))
        assert [row["Model"] for row in rows] == ["Base model", "Adversarial training", "PGD training", "CURE training"]
        caption = next(out.rglob("perceptual_summary.md")).read_text(encoding="utf-8")
    else:
        rows = read_csv(next(out.rglob("fig9_top_k.csv")))
        assert list(dict.fromkeys(row["variant"] for row in rows)) == ["base", "adversarial", "pgd", "cure"]
        caption = next(out.rglob("fig9_top_k.md")).read_text(encoding="utf-8")
    assert "the first 16 test images of colour_digits" in caption
    assert result.meta["dataset"] == "colour_digits" and result.meta["region"] == ("dominant" if experiment == "fig9_perceptual" else "all")


def test_both_experiments_probe_the_whole_test_split_by_default():
    from helpers import compose

    for experiment in ("fig9_perceptual", "perceptual_sweep"):
        cfg = compose(experiment)
        assert cfg.probe.num_images is None and cfg.probe.split == "test"
        assert perceptual.PerceptualOptions.from_cfg(dict(cfg.probe)).num_images is None


def test_whole_split_is_probed_and_named_in_the_captions(colour_model, tmp_path: Path):
    from robustness.reporting.perceptual import draw

    model, _, _ = colour_model
    dm = ColourDigitsDataModule(seed=0)
    dm.setup()
    x, y = dm.split_tensors("test")
    cfg = {"name": "perceptual", "items": ["figure9"], "angle_step": 90}
    ctx = ProbeContext(options=cfg, models={"base": model}, data=dm, attack={"name": "colour"}, device=torch.device("cpu"), seed=0, work_dir=tmp_path / "work")
    result = perceptual.compute(ctx)
    assert result.meta["num_images"] == len(y) == 450 and result.meta["whole_split"]
    assert torch.equal(result.arrays["labels"], y)
    # The accuracy at 0 degrees is the model's accuracy on the whole split, not on a prefix.
    assert float(result.arrays["base/accuracy"][0]) == pytest.approx(float((predict(model, x) == y).double().mean()))
    # figure9 alone: the sizes and the colour attack are not measured, their tables not written.
    assert set(result.tables) == {"fig9_top_k"} and bool(torch.isnan(result.arrays["base/min_angle"]).all())
    artefacts = draw(result, tmp_path / "out")
    assert [a.name for a in artefacts] == ["fig9_perceptual", "fig9_top_k"]
    for artefact in artefacts:
        assert "among all 450 test images of colour_digits" in artefact.caption
        assert artefact.caption.count(". ") + 1 <= 2  # captions: at most two sentences
