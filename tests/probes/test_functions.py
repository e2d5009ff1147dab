"""The probes as plain functions: the same numbers as the command line's stage, one source of
defaults, inputs checked before any work, memory judged before any work."""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from helpers import cli_in_process, hydra_initialized
from torch import nn

import robustness
from robustness.data.colour_digits import ColourDigitsDataModule
from robustness.data.digits import DigitsDataModule
from robustness.errors import ConfigError, InputError
from robustness.models.smallcnn import smallcnn
from robustness.probes import memory
from robustness.probes.base import (
    ProbeContext,
    ProbeResult,
    TrainingRecord,
    attack_node,
)
from robustness.probes.defaults import choices, group_defaults
from robustness.registry import accepted_options, lookup, options_of
from robustness.stages import compose_experiment

REPO = Path(__file__).resolve().parents[2]
SEED = 3


# Wall-clock seconds (the path search's): the one column that is not a function of the inputs.
TIMINGS = ("seconds", "seconds_mean")


def same(a: Any, b: Any, where: str = "") -> None:
    """Equal values, NaN equal to NaN, tensors equal in dtype, shape and every element; timings aside."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        assert torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.nan_to_num(-7.0) if a.is_floating_point() else a, b.nan_to_num(-7.0) if b.is_floating_point() else b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (where, list(a), list(b))
        for key in a:
            if key not in TIMINGS:
                same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, (where, a, b)


def fitted_cnn(data: Any, seed: int, steps: int = 40) -> nn.Module:
    """A small CNN fitted for a few full-batch steps: real boundaries for the attacks to find."""
    x, y = data.split_tensors("train", limit=400)
    torch.manual_seed(seed)
    model = smallcnn(data.info, width=4, batch_norm=True)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(steps):
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
    return model.eval()


@pytest.fixture(scope="module")
def digits() -> tuple[DigitsDataModule, dict[str, nn.Module]]:
    data = DigitsDataModule(seed=0)
    data.setup()
    return data, {"base": fitted_cnn(data, 0), "cure": fitted_cnn(data, 1)}


@pytest.fixture(scope="module")
def colour() -> tuple[ColourDigitsDataModule, dict[str, nn.Module]]:
    data = ColourDigitsDataModule(seed=0)
    data.setup()
    return data, {"base": fitted_cnn(data, 0), "cure": fitted_cnn(data, 1)}


# Small settings for each probe (the stage sees them as `probe.*` overrides), the attack, and the
# images the function is handed: what the stage adapter would load from the test split.
CASES = {
    "hessian_norm": ({"num_images": 6, "chunk_size": 4, "num_samples": 4}, None, 6),
    "curvature_profile": ({"num_images": 5, "chunk_size": 2, "k": 3, "num_iter": 8}, None, 5),
    "min_perturbation": ({"num_images": 6, "chunk_size": 4, "refine_steps": 6}, {"name": "deepfool", "max_iter": 20}, 6),
    "table1": ({"num_images": 6, "chunk_size": 4, "num_samples": 4, "refine_steps": 6}, {"name": "deepfool", "max_iter": 20}, 6),
    # The figure's sample lies beyond the per-image images: the adapter must load up to it.
    "boundary_plane": ({"resolution": 9, "stats_resolution": 9, "num_images": 3, "sample_index": 5, "bisection_steps": 4},
                       {"name": "deepfool", "max_iter": 20}, 6),
    "random_plane": ({"resolution": 9, "stats_resolution": 9, "num_images": 3, "sample_index": 4, "chunk_size": 2}, None, 5),
    "robust_accuracy": ({"n_images": 8, "eps": [0.0, 0.5, 1.0], "batch_size": 3}, {"name": "pgd_l2", "steps": 3}, 8),
    "path_connectivity": ({"candidate_images": 40, "natural_pairs": 2, "adversarial_pairs": 2, "max_depth": 2, "max_pieces": 50,
                           "pca_points": 12}, None, 40),
    "training_shift": ({"n_images": 30}, None, 30),
}
FUNCTIONS = {"path_connectivity": "path_search", "perceptual": "hue_sweep"}


def stage_context(name: str, options: dict[str, Any], attack: Any, data: Any, models: dict[str, nn.Module], work: Path) -> ProbeContext:
    """The context the probe stage builds: the probe's and the attack's nodes as Hydra composes them."""
    overrides = [f"probe={name}", *(f"probe.{k}={v}" for k, v in options.items()), f"attack={(attack or {}).get('name', 'deepfool')}",
                 *(f"attack.{k}={v}" for k, v in (attack or {}).items() if k != "name")]
    with hydra_initialized():
        cfg = compose_experiment("train", overrides)
    from omegaconf import OmegaConf

    records = {"base": TrainingRecord("random init", {"epochs": 3}), "cure": TrainingRecord("base", {"epochs": 1}, start_model=models["base"])}
    return ProbeContext(options=OmegaConf.to_container(cfg.probe), models=models, data=data, attack=OmegaConf.to_container(cfg.attack),
                        device=torch.device("cpu"), seed=SEED, work_dir=work, training=lambda variant: records[variant])


@pytest.mark.parametrize("name", [*CASES, "perceptual"])
def test_the_function_and_the_stage_give_identical_results(name: str, digits, colour, tmp_path: Path) -> None:
    if name == "perceptual":
        options, attack, count = {"num_images": 6, "chunk_size": 4, "angle_step": 90, "search_step": 90, "search_tol": 5.0, "refine_steps": 4}, \
            {"name": "colour", "steps": 3}, 6
        data, models = colour
    else:
        options, attack, count = CASES[name]
        data, models = digits
    ctx = stage_context(name, options, attack, data, models, tmp_path / "stage")
    torch.manual_seed(SEED)  # as the stage does before compute()
    staged = lookup("probe", name)(ctx)

    x, y = data.split_tensors("test", limit=count)
    function = getattr(robustness, FUNCTIONS.get(name, name))
    extra: dict[str, Any] = {}
    if "attack" in inspect.signature(function).parameters:
        extra["attack"] = attack
    if "class_names" in inspect.signature(function).parameters:
        extra.update(class_names=data.info.class_names, dataset=data.info.name)
    if name == "robust_accuracy":
        extra["dataset"] = data.info.name
    if name == "training_shift":
        extra["records"] = {v: ctx.training(v) for v in models}
    else:
        extra["seed"] = SEED
    torch.manual_seed(12345)  # the function seeds itself: the caller's random state does not matter
    called = function(models, x, y, **extra, **options)

    assert isinstance(called, ProbeResult) and type(called).__name__ != "ProbeResult" and called.probe == staged.probe
    same(called.tables, staged.tables, "tables")
    same(called.arrays, staged.arrays, "arrays")
    same(called.meta, staged.meta, "meta")
    assert isinstance(called.rows, list) and called.rows  # the typed view of its main table
    # Converted, it is what the store caches and the reporters draw.
    called.to_probe_result().save(tmp_path / "saved")
    same(ProbeResult.load(tmp_path / "saved").tables, json_round_trip(called.tables))


def json_round_trip(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value))


def test_a_single_model_is_named_model_and_the_callers_random_state_is_kept(digits) -> None:
    data, models = digits
    x, y = data.split_tensors("test", limit=4)
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    result = robustness.robust_accuracy(models["base"], x, y, attack="pgd_linf", n_images=4, eps=[0.0, 0.1])
    torch.testing.assert_close(torch.rand(3), expected_next)  # the probe's own seeding left the caller's stream alone
    assert result.models == ["model"] and {row["variant"] for row in result.rows} == {"model"}
    eps, curve = result.curve()
    assert eps.tolist() == pytest.approx([0.0, 0.1]) and curve[0] == pytest.approx(float((models["base"](x).argmax(1) == y).double().mean()))


# ---------------------------------------------------------------- one source of defaults


@pytest.mark.parametrize("name", choices("probe"))
def test_the_api_defaults_are_the_command_lines(name: str) -> None:
    """The options a probe function starts from equal the ones `probe=NAME` composes; every option has its
    value in the YAML and nowhere else (conf/probe/curvature_profile.yaml's chunk_size 10 is its only one)."""
    options_class = options_of("probe", name)
    with hydra_initialized():
        composed = compose_experiment("train", [f"probe={name}"]).probe
    from omegaconf import OmegaConf

    from_cli = options_class.from_cfg(OmegaConf.to_container(composed, resolve=True))
    api = options_class()
    assert api == from_cli, f"{name}: the API starts from {api}, the command line from {from_cli}"
    assert {f for f in options_class.__dataclass_fields__} == set(OmegaConf.to_container(composed)) - {"name"}


def test_curvature_profile_chunk_size_is_the_yamls() -> None:
    assert options_of("probe", "curvature_profile")().chunk_size == group_defaults("probe", "curvature_profile")["chunk_size"] == 10


@pytest.mark.parametrize("name", choices("attack"))
def test_attack_defaults_are_the_yamls_and_the_command_lines(name: str) -> None:
    """What a probe function's ``attack="NAME"`` builds: the YAML, as `attack=NAME` composes it, and
    the attack's own Python defaults (where it has any) agree with it."""
    with hydra_initialized():
        composed = compose_experiment("train", [f"attack={name}"]).attack
    from omegaconf import OmegaConf

    assert attack_node(name) == OmegaConf.to_container(composed, resolve=True)
    factory = lookup("attack", name)
    yaml = group_defaults("attack", name)
    accepted, _ = accepted_options(factory)
    assert not set(accepted) - set(yaml), f"conf/attack/{name}.yaml does not set {sorted(set(accepted) - set(yaml))}"
    for cls in factory.__mro__ if inspect.isclass(factory) else (factory,):
        init = cls.__init__ if inspect.isclass(factory) else cls
        for key, parameter in inspect.signature(init).parameters.items():
            if parameter.default is not inspect.Parameter.empty and key in yaml:
                assert parameter.default == yaml[key], f"{name}.{key}: Python says {parameter.default!r}, conf/attack/{name}.yaml {yaml[key]!r}"
    assert attack_node(None)["name"] == "deepfool"  # conf/config.yaml's default attack
    assert attack_node({"name": name}) == attack_node(name)


# ---------------------------------------------------------------- bad input, before any work


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda m, x, y: (m.train(), x, y), InputError, "training mode"),
        (lambda m, x, y: (m, x * 3.0, y), InputError, r"pixels must lie in \[0, 1\]"),
        (lambda m, x, y: (m, x[:, :, :4], y), InputError, r"cannot take images of shape \(1, 4, 8\)"),
        (lambda m, x, y: (m, x.repeat(1, 3, 1, 1), y), InputError, r"cannot take images of shape \(3, 8, 8\)"),
        (lambda m, x, y: (m, x, y[:3]), InputError, "4 images but 3 labels"),
        (lambda m, x, y: (m, x, y + 10), InputError, r"labels must lie in \[0, 9\]"),
        (lambda m, x, y: (m, x.numpy(), y), InputError, "must be a torch tensor"),
        (lambda m, x, y: (nn.Identity().eval(), x, y), InputError, "logits of shape"),
        (lambda m, x, y: ({"a": m, "b": "not a model"}, x, y), InputError, "map names to torch.nn.Module"),
        (lambda m, x, y: (m, x, None), InputError, "needs the images' labels"),
    ],
)
def test_bad_inputs_are_named_before_any_work(change, error, message, digits) -> None:
    data, _ = digits
    # A model for 1x8x8 images and no other size.
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()
    x, y = data.split_tensors("test", limit=4)
    m, xx, yy = change(model, x, y)
    with pytest.raises(error, match=message):
        robustness.hessian_norm(m, xx, yy, num_samples=2)


def test_unknown_or_bad_options_name_the_probe_and_its_yaml(digits) -> None:
    data, models = digits
    x, y = data.split_tensors("test", limit=4)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) for probe hessian_norm: num_sample\n.*conf/probe/hessian_norm.yaml"):
        robustness.hessian_norm(models["base"], x, y, num_sample=8)
    with pytest.raises(ConfigError, match="probe.resolution of boundary_plane must be odd"):
        robustness.boundary_plane(models["base"], x, y, resolution=10)
    with pytest.raises(ConfigError, match="minimisation attack"):
        robustness.min_perturbation(models["base"], x, y, attack="pgd_linf")
    with pytest.raises(ConfigError, match="unknown attack 'deepfoo'"):
        robustness.min_perturbation(models["base"], x, y, attack="deepfoo")
    with pytest.raises(ConfigError, match="sample_index 9 is outside the 4 images"):
        robustness.random_plane(models["base"], x, y, sample_index=9, resolution=5, stats_resolution=5)
    with pytest.raises(ConfigError, match="3 colour channels"):
        robustness.hue_sweep(models["base"], x, y)


# ---------------------------------------------------------------- memory


def test_a_grid_that_cannot_fit_is_refused_before_any_work_with_the_resolution_that_would() -> None:
    options = options_of("probe", "boundary_plane").from_cfg({"resolution": 100001})
    need = options.memory_need((1, 8, 8), 10, 0, None)
    assert need.fixed >= 100001**2 * 16  # both coordinates and the label of every grid point
    with pytest.raises(ConfigError, match=r"needs about 160\.0 GB of memory \(a 100001x100001 grid") as caught:
        memory.fit_batch(need, "boundary_plane", available=8 * 10**9)
    side = int(caught.value.hint.split("probe.resolution=")[1].split()[0])
    usable = int(8 * 10**9 * memory.USABLE_SHARE)
    assert side % 2 == 1 and memory.grid_need(side) <= usable < memory.grid_need(side + 2) + need.fixed - memory.grid_need(100001)


def test_a_batch_that_would_not_fit_is_run_in_smaller_pieces_with_the_same_numbers(digits, monkeypatch) -> None:
    data, models = digits
    x, y = data.split_tensors("test", limit=5)
    options = {"resolution": 21, "stats_resolution": 9, "num_images": 2, "batch_size": 256}
    full = robustness.random_plane(models["base"], x, y, **options)
    need = options_of("probe", "random_plane").from_cfg(options).memory_need((1, 8, 8), 10, memory.activation_bytes(models["base"], x), 2)
    # Room for the grid and 10 points at a time, not for 256.
    room = int((need.fixed + 10.5 * need.per_item) / memory.USABLE_SHARE) + 1
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": room)
    batches: list[int] = []
    real = robustness.probes.random_plane.classify_plane
    monkeypatch.setattr(robustness.probes.random_plane, "classify_plane", lambda *a, **kw: batches.append(kw["batch_size"]) or real(*a, **kw))
    chunked = robustness.random_plane(models["base"], x, y, **options)
    assert set(batches) == {10}
    same(chunked.arrays, full.arrays)
    same(chunked.tables, full.tables)
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": need.fixed // 2)
    with pytest.raises(ConfigError, match="probe.resolution="):
        robustness.random_plane(models["base"], x, y, **options)


def test_an_attacks_memory_grows_with_the_logit_rows_it_differentiates_not_with_the_classes() -> None:
    """DeepFool differentiates its num_candidates - 1 nearest logit differences at once, the other
    attacks one loss or margin: with 200 classes Table 1, robust accuracy and the hue attack need
    what they need with 10 (Tiny-ImageNet's report was refused on a 24 GB machine when the
    estimates took every class's gradient at once)."""
    assert memory.attack_gradient_rows({"name": "deepfool", "num_candidates": 10}) == 9
    assert memory.attack_gradient_rows({"name": "runner_up"}) == memory.attack_gradient_rows({"name": "pgd_linf"}) == 1
    activation, shape = 30 * 10**6, (3, 64, 64)
    kept = memory.image_bytes(shape) + 3 * activation  # the forward kept for a backward, and the backward's own
    for probe, rows in (("min_perturbation", 9), ("table1", 9), ("robust_accuracy", 1), ("perceptual", 1)):
        options = options_of("probe", probe).from_cfg({})
        facts = {"gradient_rows": rows} if probe != "perceptual" else {}
        many = options.memory_need(shape, 200, activation, 100, **facts).per_item
        assert kept + 2 * (rows - 1) * activation <= many < kept + 2 * rows * activation + 10**8, probe  # not 200 rows
        if probe != "table1":  # Table 1's Hessian holds a Jacobian row per class besides
            assert many == options.memory_need(shape, 10, activation, 100, **facts).per_item, probe
    # An attack of unknown rows is taken at every other class: the high side.
    assert options_of("probe", "min_perturbation").from_cfg({}).memory_need(shape, 200, activation, 100).per_item >= 2 * 198 * activation


def test_the_command_line_refuses_an_absurd_grid_before_loading_any_model(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    monkeypatch.chdir(tmp_path)
    code, stderr = cli_in_process(["experiment=fig2_boundary", "probe.resolution=100001", "logger=csv", f"paths.artifacts_dir={store}",
                                   f"paths.output_dir={tmp_path / 'out'}"], capsys, monkeypatch)
    assert code == 2, stderr[-2000:]
    assert "error: probe boundary_plane needs about 160.0 GB of memory (a 100001x100001 grid" in stderr
    assert "fix: use probe.resolution=" in stderr and "Traceback" not in stderr
    assert not (store / "digits").exists()  # nothing was trained or loaded
