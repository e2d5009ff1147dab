"""The one cache of partial results (robustness/probes/partial.py): a resumed computation gives
the uninterrupted one's numbers, random draws included."""

from __future__ import annotations

from pathlib import Path

import torch

import robustness
from robustness.probes.partial import PartialResults
from robustness.testing import train_digits_smallcnn


def _draws(root: Path | None, parts: int) -> list[torch.Tensor]:
    """Parts that each draw from torch's stream, as a PGD random start does, under one seed."""
    cache = PartialResults(root, "draws", {"what": "uniform"})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return [cache.get(f"{i}", lambda: {"value": torch.rand(3)})["value"] for i in range(parts)]


def test_a_part_read_from_the_cache_puts_back_the_random_stream_its_computation_left(tmp_path: Path) -> None:
    uninterrupted = _draws(None, 3)
    _draws(tmp_path, 2)  # interrupted after two parts
    resumed = _draws(tmp_path, 3)  # two parts read, the third computed
    for a, b in zip(uninterrupted, resumed):
        assert torch.equal(a, b)
    # Had the stream not been put back, the third part would repeat the first part's draw.
    assert not torch.equal(resumed[2], uninterrupted[0])
    # The kept streams are the cache's own: a part reads back as the computation returned it.
    assert set(PartialResults(tmp_path, "draws", {"what": "uniform"}).load("0")) == {"value"}


def test_a_part_saved_without_streams_is_still_read(tmp_path: Path) -> None:
    """Parts kept before the streams were: read as they are, the stream left where it is."""
    cache = PartialResults(tmp_path, "old", {"what": "uniform"})
    cache.path("0").parent.mkdir(parents=True)
    torch.save({"value": torch.ones(2)}, cache.path("0"))
    state = torch.get_rng_state()
    assert torch.equal(cache.get("0", lambda: {"value": torch.zeros(2)})["value"], torch.ones(2))
    assert torch.equal(torch.get_rng_state(), state)


def test_robust_accuracy_resumed_after_its_first_model_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    model, splits = train_digits_smallcnn(width=8, epochs=2)
    x, y = splits["test"]
    models = {"first": model, "second": train_digits_smallcnn(width=8, epochs=1, seed=1)[0]}
    # One PGD step from a random start: its outcome rests on the draw (without the kept stream the
    # second model's robust accuracy differs on resume).
    options = {"attack": {"name": "pgd_linf", "steps": 1, "random_start": True}, "eps": [0.0, 0.15, 0.3], "n_images": 200, "seed": 3}
    uninterrupted = robustness.robust_accuracy(models, x, y, **options)
    cache = tmp_path / "cache"
    robustness.robust_accuracy({"first": models["first"]}, x, y, cache_dir=cache, **options)  # the run stopped after the first model
    # The kept parts are named by the model, not by the list: the resumed run reads the first model's and computes the second's.
    resumed = robustness.robust_accuracy(models, x, y, cache_dir=cache, **options)
    for name, value in uninterrupted.arrays.items():  # bit for bit (a distance is NaN where no attack was needed)
        assert torch.allclose(value, resumed.arrays[name], rtol=0, atol=0, equal_nan=True), name
    assert uninterrupted.tables == resumed.tables
