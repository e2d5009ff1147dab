"""An optimised smooth colour attack (after Bhattad et al. 2019, "Big but imperceptible").

Instead of adding small noise, the attack recolours: each image gets a low-frequency field of
hue rotations and of saturation factors, and gradient descent shapes both fields until the
label changes. The perturbation is large in l2 but keeps the image's luma -- its shape -- exactly
(see :mod:`robustness.geometry.colour`).

The budget has two parts:

* size: the hue rotation stays within +-``max_hue`` degrees and the saturation factor within
  ``[exp(-max_saturation), exp(max_saturation)]`` everywhere; both bounds hold by construction
  (a tanh parametrisation), so no projection step is needed;
* smoothness: the fields are ``grid x grid`` control values, bilinearly interpolated over the
  image, so colours change slowly across it (``grid=1``: one hue shift and one saturation
  factor for the whole image).

The loss is the logit margin (true class minus the best other class; for a target, the best
other class minus the target), minimised with Adam per image; an image stops at its first
success. Restarts after the first start from random fields within the budget.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustness.attacks.base import FixedEpsilonAttack, Perturbed, check_attack_classes, clean_label
from robustness.errors import InputError
from robustness.geometry.colour import recolour, region_mask
from robustness.registry import register


def _margin(logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    """Per-image margin; the attack has succeeded once it is < 0."""
    if target is None:
        true = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.scatter(1, y[:, None], float("-inf")).amax(1)
        return true - other
    wanted = logits.gather(1, target[:, None]).squeeze(1)
    other = logits.scatter(1, target[:, None], float("-inf")).amax(1)
    return other - wanted


@register("attack", "colour")
class ColourAttack(FixedEpsilonAttack):
    """Smooth hue/saturation fields optimised by gradient to flip (or target) the label.

    As a fixed-epsilon attack its budget is ``max_hue`` (degrees, ``norm`` "hue_degrees").
    """

    norm = "hue_degrees"

    def __init__(
        self,
        max_hue: float = 45.0,
        max_saturation: float = 0.5,
        grid: int = 2,
        steps: int = 50,
        lr: float = 0.1,
        restarts: int = 1,
        region: str = "all",
        soft_mask: bool = True,
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        if not 0.0 < max_hue <= 180.0:
            raise InputError(f"max_hue must lie in (0, 180] degrees, got {max_hue}", "set attack.max_hue, e.g. attack.max_hue=45")
        if max_saturation < 0:
            raise InputError(f"max_saturation must be >= 0, got {max_saturation}", "set attack.max_saturation=0 for hue-only recolouring")
        if grid < 1:
            raise InputError(f"grid must be >= 1, got {grid}", "attack.grid=1 shifts the whole image at once; larger grids allow smooth local changes")
        if steps < 1 or restarts < 1 or batch_size < 1:
            raise InputError(f"steps, restarts and batch_size must be >= 1, got {steps}, {restarts}, {batch_size}")
        if not lr > 0:
            raise InputError(f"lr must be > 0, got {lr}", "set attack.lr, e.g. attack.lr=0.1")
        if region not in ("all", "dominant"):
            raise InputError(f"unknown region '{region}'", "use attack.region=all or attack.region=dominant")
        self.max_hue = float(max_hue)
        self.max_saturation = float(max_saturation)
        self.grid = int(grid)
        self.steps = int(steps)
        self.lr = float(lr)
        self.restarts = int(restarts)
        self.region = region
        self.soft_mask = bool(soft_mask)
        self.batch_size = int(batch_size)
        self.seed = int(seed)

    def fields(self, hue_params: Tensor, sat_params: Tensor, size: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Per-pixel (angle in degrees, saturation factor) fields from the control values."""
        angle = self.max_hue * torch.tanh(hue_params)
        log_sat = self.max_saturation * torch.tanh(sat_params)
        up = lambda f: F.interpolate(f, size=size, mode="bilinear", align_corners=True) if f.shape[2:] != size else f  # noqa: E731
        return up(angle), torch.exp(up(log_sat))

    def apply(self, x: Tensor, hue_params: Tensor, sat_params: Tensor, mask: Tensor | None) -> Tensor:
        angle, saturation = self.fields(hue_params, sat_params, tuple(x.shape[2:]))
        return recolour(x, angle=angle, saturation=saturation, mask=mask)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor | None, target: Tensor | None) -> Perturbed:
        if x.dim() != 4 or x.shape[1] != 3:
            raise InputError(
                f"the colour attack needs RGB images (N, 3, H, W), got shape {tuple(x.shape)}",
                "use a colour dataset, e.g. dataset=colour_digits instead of digits",
            )
        with torch.no_grad():
            logits = torch.cat([model(chunk) for chunk in x.split(self.batch_size)])
        check_attack_classes(model, x, y, target, logits.shape[1])
        label = clean_label(logits, y)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        parts = []
        for start in range(0, len(x), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            parts.append(self._attack_batch(model, x[chunk], label[chunk], None if target is None else target[chunk], generator))
        x_adv = torch.cat([p[0] for p in parts])
        steps = torch.cat([p[2] for p in parts])
        # The kept images are the best ones seen, not the last iterates: their logits are
        # recomputed once by the base.
        return Perturbed(x_adv.detach(), steps, None if target is not None else label, target)

    @property
    def eps(self) -> float:
        """The budget a probe sweeps: the largest hue rotation, in degrees."""
        return self.max_hue

    def with_eps(self, eps: float, relative_step: float | None = None) -> "ColourAttack":
        attack = copy.copy(self)
        attack.max_hue = float(eps)
        return attack

    def _attack_batch(self, model: nn.Module, x: Tensor, y: Tensor, target: Tensor | None, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        n = len(x)
        mask = region_mask(x, self.region, soft=self.soft_mask)
        best = x.clone()
        best_margin = torch.full((n,), float("inf"), device=x.device)
        success = torch.zeros(n, dtype=torch.bool, device=x.device)
        steps = torch.zeros(n, dtype=torch.long, device=x.device)
        shape = (n, 1, self.grid, self.grid)
        for restart in range(self.restarts):
            if bool(success.all()):
                break
            if restart == 0:
                hue_p, sat_p = torch.zeros(shape), torch.zeros(shape)
            else:
                hue_p = torch.empty(shape).uniform_(-2.0, 2.0, generator=generator)
                sat_p = torch.empty(shape).uniform_(-2.0, 2.0, generator=generator)
            hue_p = hue_p.to(x.device, x.dtype).requires_grad_(True)
            sat_p = sat_p.to(x.device, x.dtype).requires_grad_(self.max_saturation > 0)
            params = [hue_p] + ([sat_p] if self.max_saturation > 0 else [])
            optimizer = torch.optim.Adam(params, lr=self.lr)
            # Evaluate steps+1 points: the start and one after each update.
            for step in range(self.steps + 1):
                x_new = self.apply(x, hue_p, sat_p, mask)
                margin = _margin(model(x_new), y, target)
                with torch.no_grad():
                    done_now = (margin < 0) & ~success
                    better = ~success & (margin < best_margin)
                    best[better | done_now] = x_new[better | done_now].detach()
                    best_margin = torch.where(better, margin.detach(), best_margin)
                    if step > 0:
                        steps[~success] += 1
                    success |= done_now
                if step == self.steps or bool(success.all()):
                    break
                active = (~success).to(margin.dtype)
                # autograd.grad, not backward: the model's own .grad stays untouched.
                grads = torch.autograd.grad((margin * active).sum(), params)
                for param, grad in zip(params, grads):
                    param.grad = grad
                optimizer.step()
        return best, success, steps
