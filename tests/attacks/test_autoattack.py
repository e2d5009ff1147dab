"""AutoAttack through the reference implementation: no weaker than PGD, exact at eps 0, clear errors."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from robustness.attacks import FixedEpsilonAttack, PGDLinf
from robustness.attacks.autoattack import AutoAttack
from helpers import train_digits_smallcnn
from robustness.data.digits import DigitsDataModule
from robustness.errors import ConfigError, InputError
from robustness.probes import robust_accuracy
from robustness.probes.base import ProbeContext
from robustness.registry import build

# The standard ensemble ends with 5000 Square queries per robust image, minutes on a shared CPU;
# the gradient components keep the test in seconds and are the ones that beat PGD here.
FAST = {"name": "autoattack", "version": "custom", "attacks": ["apgd-ce", "apgd-t"], "seed": 0}
EPS = [0.0, 0.05, 0.1]


@pytest.fixture(scope="module")
def tiny_model():
    """A width-8 smallcnn trained on the digits for a few seconds (about 85% test accuracy) and 48 test images."""
    model, splits = train_digits_smallcnn(width=8, epochs=4)
    x, y = splits["test"]
    return model, x[:48], y[:48]


def _context(model, x, y, attack: dict, probe: dict, work_dir: Path) -> ProbeContext:
    data = SimpleNamespace(info=DigitsDataModule.info, split_tensors=lambda split, limit=None, indices=None: (x[:limit], y[:limit]))
    return ProbeContext(options=probe, models={"tiny": model}, data=data, attack=attack, device=torch.device("cpu"), seed=0, work_dir=work_dir)


def test_autoattack_is_a_fixed_epsilon_attack_built_from_its_config():
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[2] / "conf" / "attack" / "autoattack.yaml"
    attack = build("attack", OmegaConf.load(conf))
    assert isinstance(attack, AutoAttack) and isinstance(attack, FixedEpsilonAttack)
    assert (attack.eps, attack.norm, attack.version) == (8 / 255, "linf", "standard")
    assert attack.with_eps(0.1).eps == 0.1 and attack.with_eps(0.1).version == "standard"


def test_probe_reports_autoattack_beside_pgd_and_it_is_no_weaker(tiny_model, tmp_path):
    model, x, y = tiny_model
    pgd = {"name": "pgd_linf", "eps": 0.1, "step_size": 0.025, "steps": 10, "random_start": True}
    probe = {"eps": EPS, "n_images": len(y), "batch_size": 64, "relative_step": 0.25, "extra_attacks": [FAST]}
    torch.manual_seed(0)
    result = robust_accuracy.compute(_context(model, x, y, pgd, probe, tmp_path))
    rows = result.tables["robust_accuracy"]
    by = {(row["attack"], row["eps"]): row for row in rows}
    assert sorted({row["attack"] for row in rows}) == ["autoattack", "pgd_linf"]
    clean = float((model(x).argmax(1) == y).float().mean())
    for name in ("pgd_linf", "autoattack"):
        assert by[(name, 0.0)]["robust_acc"] == pytest.approx(clean) and by[(name, 0.0)]["clean_acc"] == pytest.approx(clean)
    for eps in EPS[1:]:
        assert by[("autoattack", eps)]["robust_acc"] <= by[("pgd_linf", eps)]["robust_acc"], eps
    # the radii are large enough that both attacks fool some images, AutoAttack strictly more somewhere
    assert by[("pgd_linf", 0.1)]["robust_acc"] < clean
    assert any(by[("autoattack", e)]["robust_acc"] < by[("pgd_linf", e)]["robust_acc"] for e in EPS[1:])
    assert "tiny/autoattack/robust_acc" in result.arrays and "tiny/robust_acc" in result.arrays


def test_autoattack_at_eps_zero_leaves_every_image_and_accuracy_as_it_was(tiny_model):
    model, x, y = tiny_model
    result = build("attack", {**FAST, "eps": 0.0})(model, x, y)
    assert torch.equal(result.x_adv, x)
    correct = model(x).argmax(1) == y
    assert torch.equal(result.success, ~correct)  # only the images it got wrong anyway
    assert (result.norm == 0).all()


def test_autoattack_stays_in_the_ball_and_leaves_the_model_alone(tiny_model):
    model, x, y = tiny_model
    pgd = PGDLinf(eps=0.05, step_size=0.0125, steps=10)(model, x, y)
    with torch.no_grad():
        result = build("attack", {**FAST, "eps": 0.05})(model, x, y)
    assert (result.x_adv - x).abs().amax() <= 0.05 + 1e-6
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert torch.equal(result.success, model(result.x_adv).argmax(1) != y)
    assert result.success.sum() >= pgd.success.sum()
    assert all(p.grad is None for p in model.parameters()) and all(p.requires_grad for p in model.parameters())


def test_autoattack_bad_config_and_inputs(tiny_model, monkeypatch):
    model, x, y = tiny_model
    for node, match in [
        ({"name": "autoattack", "norm": "l1"}, "unknown attack.norm"),
        ({"name": "autoattack", "version": "fast"}, "unknown attack.version"),
        ({"name": "autoattack", "attacks": ["apgd-ce"]}, "version=custom"),
        ({"name": "autoattack", "version": "custom", "attacks": ["pgd"]}, "unknown AutoAttack component"),
        ({"name": "autoattack", "batch_size": 0}, "batch_size"),
    ]:
        with pytest.raises(ConfigError, match=match) as info:
            build("attack", node)
        assert info.value.hint
    with pytest.raises(InputError, match="untargeted"):
        build("attack", FAST)(model, x[:4], y[:4], target=(y[:4] + 1) % 10)
    monkeypatch.setitem(sys.modules, "pyautoattack", None)  # as if it were not installed
    with pytest.raises(ConfigError, match="pyautoattack") as info:
        build("attack", {"name": "autoattack"})
    assert 'pip install -e ".[autoattack]"' in info.value.hint
