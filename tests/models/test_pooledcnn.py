"""model=pooledcnn, the CNN for 28x28 images: it keeps where its features are, which smallcnn's
global average after one pooling step loses (issue 30's probe)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustness.data.base import DatasetInfo
from robustness.errors import ConfigError
from robustness.geometry.bounds import bound_problems
from robustness.geometry.walk import piecewise_linear_problems
from robustness.models.normalize import Normalize
from robustness.registry import build

STRIPES = DatasetInfo(name="stripes", num_classes=10, image_shape=(1, 28, 28), class_names=tuple("0123456789"), mean=(0.3,), std=(0.3,))


def stripe_images(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """28x28 images whose ten classes differ only in which rows hold a bright stripe: class k
    lights rows 2k + 4 and 2k + 5 across the whole width, over uniform noise. Every class has
    the same pixels, the same brightness and the same edges, only in other places."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=generator)
    images = 0.5 * torch.rand(n, 1, 28, 28, generator=generator)
    rows = 2 * labels + 4
    for offset in (0, 1):
        images[torch.arange(n), 0, rows + offset, :] = 1.0
    return images, labels


def fitted_accuracy(name: str, steps: int = 60) -> float:
    """Test accuracy of model ``name`` (width 8) after ``steps`` Adam steps on 64 stripe images each."""
    torch.manual_seed(0)
    model = build("model", {"name": name, "width": 8, "activation": "relu", "batch_norm": True}, info=STRIPES)
    x, y = stripe_images(64 * steps, seed=1)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for xb, yb in zip(x.split(64), y.split(64)):
        loss = F.cross_entropy(model(xb), yb)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    x_test, y_test = stripe_images(500, seed=2)
    with torch.no_grad():
        return float((model.eval()(x_test).argmax(1) == y_test).float().mean())


def test_pooledcnn_tells_rows_apart_where_smallcnn_cannot() -> None:
    assert fitted_accuracy("pooledcnn") >= 0.95
    # Chance is 0.1. A global average forgets the row; what smallcnn learns comes from the zero
    # padding, which its last features see only for stripes near the top and bottom edges.
    assert fitted_accuracy("smallcnn") <= 0.5


def test_pooledcnn_is_certifiable_and_needs_sides_divisible_by_four() -> None:
    model = build("model", {"name": "pooledcnn", "width": 4, "activation": "relu", "batch_norm": True}, info=STRIPES).eval()
    assert piecewise_linear_problems(model, affine=(Normalize,)) == [] and bound_problems(model) == []
    # max-pool then ReLU: the conv-norm-ReLU-pool block's function, as the two commute
    x = torch.randn(5, 4, 8, 8)
    assert torch.equal(F.relu(F.max_pool2d(x, 2)), F.max_pool2d(F.relu(x), 2))
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    odd = DatasetInfo(name="odd", num_classes=10, image_shape=(3, 30, 30), class_names=tuple("0123456789"), mean=(0.5,) * 3, std=(0.2,) * 3)
    with pytest.raises(ConfigError, match="divisible by 4"):
        build("model", {"name": "pooledcnn", "width": 4, "activation": "relu", "batch_norm": True}, info=odd)
    with pytest.raises(ConfigError, match="unknown activation"):
        build("model", {"name": "pooledcnn", "width": 4, "activation": "gelu", "batch_norm": True}, info=STRIPES)


def test_pooledcnn_config_matches_its_builder() -> None:
    from omegaconf import OmegaConf
    from pathlib import Path

    config = OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "model" / "pooledcnn.yaml"))
    assert isinstance(build("model", config, info=STRIPES), nn.Module)
