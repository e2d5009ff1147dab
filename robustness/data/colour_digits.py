"""The embedded digits drawn in colour: a small dataset on which colour is a learnable cue.

The 8x8 digits are grey, so a hue rotation cannot change them. Here each digit's ink is drawn in
one colour on black: pixel = ink intensity x colour. Every colour has the same luma and chroma
(:func:`robustness.geometry.colour.equal_luma_colours`), so colours differ in hue only and a hue
rotation changes nothing but the colour.

How colour relates to the class -- the same in every split, on principle:

* in **train, val and test** alike, with probability ``correlation`` an image is drawn in its
  class's hue, ``class * 360 / 10`` degrees, plus a uniform jitter of +-``hue_jitter`` degrees;
  otherwise in a uniformly random hue. Colour is a strong but imperfect cue, as in natural
  images (peppers are mostly red, in training and at test time alike), so a model may learn
  shape, colour or both, and whatever it learns serves it equally at test time.

Because the test images come from the training distribution, clean test accuracy does not
punish a model for using colour, and models trained differently (base, adversarial, CURE, PGD)
reach comparable accuracy. What differs is how each reacts to a hue rotation: rotating a test
image keeps its shape exactly and moves its colour towards another class's hue, so the share of
labels it flips measures how much a model decides by colour -- the embedded analogue of the
report's red pepper that turns into an orange when recoloured (Figure 9). (A test split with
random colours would instead turn every colour-using model's flip rate into a loss of clean
accuracy, and the flip rates of the variants would compare their accuracies, not their
robustness to colour.)

The split itself is :func:`robustness.data.digits.load_digit_splits`'s; the colours are drawn
from a generator seeded by ``seed``, so a seed fixes images, split and colours.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from robustness.data.base import DatasetInfo, ImageDataModule, TensorImageDataset
from robustness.data.digits import digits_identity, load_digit_splits
from robustness.errors import ConfigError
from robustness.geometry.colour import equal_luma_colours
from robustness.registry import register

NUM_CLASSES = 10


def class_hues(num_classes: int = NUM_CLASSES) -> Tensor:
    """The hue (degrees) that stands for each class in the training distribution."""
    return torch.arange(num_classes, dtype=torch.float32) * (360.0 / num_classes)


def colourise(
    images: Tensor,
    labels: Tensor,
    correlation: float,
    hue_jitter: float,
    generator: torch.Generator,
    luma: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Colour grey digits ``(N, 1, H, W)``: returns RGB images ``(N, 3, H, W)`` and the hue of each.

    With probability ``correlation`` an image gets its class's hue (+- ``hue_jitter``), else a
    uniformly random hue; ``correlation=0`` makes colour independent of the class.
    """
    n = len(labels)
    follows_class = torch.rand(n, generator=generator) < correlation
    jitter = (torch.rand(n, generator=generator) * 2.0 - 1.0) * hue_jitter
    random_hue = torch.rand(n, generator=generator) * 360.0
    hue = torch.where(follows_class, class_hues()[labels] + jitter, random_hue).remainder(360.0)
    colours = equal_luma_colours(hue, luma=luma)
    return images * colours[:, :, None, None], hue


@register("dataset", "colour_digits")
class ColourDigitsDataModule(ImageDataModule):
    """scikit-learn's 8x8 digits in colour; colour follows the class the same way in every split."""

    info = DatasetInfo(
        name="colour_digits",
        num_classes=NUM_CLASSES,
        image_shape=(3, 8, 8),
        class_names=tuple(str(i) for i in range(NUM_CLASSES)),
        # Ink of mean intensity ~0.3 times colours of luma 0.5; rounded statistics of the images.
        mean=(0.15, 0.15, 0.15),
        std=(0.22, 0.22, 0.22),
    )

    def __init__(
        self,
        val_fraction: float = 0.15,
        test_fraction: float = 0.25,
        correlation: float = 0.9,
        hue_jitter: float = 10.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= correlation <= 1.0:
            raise ConfigError(f"dataset.correlation must lie in [0, 1], got {correlation}", "e.g. dataset.correlation=0.9: 90% of training digits in their class's colour")
        if not 0.0 <= hue_jitter <= 180.0:
            raise ConfigError(f"dataset.hue_jitter must lie in [0, 180] degrees, got {hue_jitter}", "e.g. dataset.hue_jitter=10")
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.correlation = float(correlation)
        self.hue_jitter = float(hue_jitter)
        self.hues: dict[str, Tensor] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.test_set is not None:
            return
        splits = load_digit_splits(self.seed, self.val_fraction, self.test_fraction)
        generator = torch.Generator().manual_seed(self.seed)
        coloured: dict[str, tuple[Tensor, Tensor]] = {}
        for split in ("train", "val", "test"):
            images, labels = splits[split]
            rgb, self.hues[split] = colourise(images, labels, self.correlation, self.hue_jitter, generator)
            coloured[split] = (rgb, labels)
        train = TensorImageDataset(*coloured["train"])
        self.train_set = self._subsample_train(train, coloured["train"][1])
        self.val_set = TensorImageDataset(*coloured["val"])
        self.test_set = TensorImageDataset(*coloured["test"])

    def _content_identity(self) -> dict[str, Any]:
        # The colours are a function of the digits, the options and the seed, which the config names.
        return digits_identity()
