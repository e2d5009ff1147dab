"""Colour transforms that keep an image's shape: hue rotation and saturation scaling in YIQ.

Why YIQ and not HSV or Lab
--------------------------
* YIQ is a *linear* map of the (gamma-encoded) RGB pixels: luma ``Y`` plus a two-dimensional
  chroma plane ``(I, Q)``. A hue rotation is a rotation of that plane, so the transform is
  smooth in the pixels and in the angle everywhere (HSV's hue is piecewise and undefined on
  grey pixels; Lab's cube root has an infinite slope at black).
* Rotating the chroma plane leaves ``Y`` exactly as it was, so the grey-level picture of the
  image -- its shape, edges and shading -- is unchanged; only the colours move. HSV rotation
  keeps ``V = max(R, G, B)`` instead, which turns a dark blue into a bright yellow.
* A rotated colour can leave the RGB cube. Instead of clipping each channel (which would change
  the luma and the hue), :func:`recolour` shrinks that pixel's chroma towards grey just enough to
  stay inside ``[0, 1]``: luma and hue stay exact, only the saturation of such pixels drops.

Hue convention: ``hue = atan2(-Q, I)`` in degrees, so that hue increases red -> orange ->
yellow -> green -> cyan -> blue -> magenta like HSV's hue. A rotation by ``+theta`` adds
``theta`` to every pixel's hue; a red pepper (hue about -20 deg) turns orange at about +25 deg.

Every function is batched over images ``(N, 3, ...)`` in pixel space ``[0, 1]`` and is
differentiable in the pixels, the angle and the saturation factor.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from robustness.errors import InputError

# ITU-R BT.601 luma weights.
_LUMA = (0.299, 0.587, 0.114)
# NTSC 1953: I and Q are combinations of R-Y and B-Y, so their rows sum to zero and a grey
# pixel has no chroma at all (not merely a rounded-off small one).
_I_FROM_RY_BY = (0.736, -0.268)
_Q_FROM_RY_BY = (0.478, 0.413)


def _yiq_matrices(dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """(rgb -> yiq, yiq -> rgb) as 3x3 matrices; the inverse is taken in double precision."""
    w = torch.tensor(_LUMA, dtype=torch.float64)
    r_y = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) - w
    b_y = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64) - w
    i_row = _I_FROM_RY_BY[0] * r_y + _I_FROM_RY_BY[1] * b_y
    q_row = _Q_FROM_RY_BY[0] * r_y + _Q_FROM_RY_BY[1] * b_y
    forward = torch.stack([w, i_row, q_row])
    inverse = torch.linalg.inv(forward)
    return forward.to(dtype=dtype, device=device), inverse.to(dtype=dtype, device=device)


def _check_rgb(x: Tensor, name: str = "images") -> None:
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor, got {type(x).__name__} {getattr(x, 'dtype', '')}")
    if x.dim() < 2 or x.shape[1] != 3:
        raise InputError(
            f"{name} must be batched RGB images (N, 3, ...), got shape {tuple(x.shape)}",
            "colour transforms need three channels; grey datasets have none to rotate (use dataset=colour_digits)",
        )


def _channel_matmul(matrix: Tensor, x: Tensor) -> Tensor:
    """Apply a 3x3 matrix along the channel axis (dim 1) of ``(N, 3, ...)``."""
    return torch.einsum("ij,nj...->ni...", matrix, x)


def rgb_to_yiq(x: Tensor) -> Tensor:
    """RGB ``(N, 3, ...)`` -> YIQ ``(N, 3, ...)``; channel 0 is the luma."""
    _check_rgb(x)
    forward, _ = _yiq_matrices(x.dtype, x.device)
    return _channel_matmul(forward, x)


def yiq_to_rgb(yiq: Tensor) -> Tensor:
    """YIQ ``(N, 3, ...)`` -> RGB ``(N, 3, ...)`` (no clipping: out-of-gamut colours stay so)."""
    _check_rgb(yiq, "YIQ images")
    _, inverse = _yiq_matrices(yiq.dtype, yiq.device)
    return _channel_matmul(inverse, yiq)


def hue_of(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pixel hue in degrees ``[-180, 180)`` and chroma (length of ``(I, Q)``), each ``(N, 1, ...)``.

    The hue of a grey pixel (chroma 0) is meaningless; callers weight hues by chroma.
    """
    yiq = rgb_to_yiq(x)
    i, q = yiq[:, 1:2], yiq[:, 2:3]
    return torch.rad2deg(torch.atan2(-q, i)), torch.hypot(i, q)


def _per_image(value: float | Tensor, x: Tensor, name: str) -> Tensor:
    """Broadcast a scalar, a per-image ``(N,)`` or a per-pixel ``(N, 1, ...)`` value against ``x``."""
    value = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if value.dim() == 0:
        return value
    if value.dim() == 1:
        if value.shape[0] != x.shape[0]:
            raise InputError(f"{name} has {value.shape[0]} entries for {x.shape[0]} images", f"pass one {name} per image, or one for all")
        return value.view(-1, *([1] * (x.dim() - 1)))
    if value.dim() == x.dim() and value.shape[1] == 1 and value.shape[0] in (1, x.shape[0]) and value.shape[2:] == x.shape[2:]:
        return value
    raise InputError(
        f"{name} of shape {tuple(value.shape)} does not fit images of shape {tuple(x.shape)}",
        f"use a number, one value per image (N,), or a per-pixel field (N, 1, {', '.join(map(str, x.shape[2:]))})",
    )


def recolour(
    x: Tensor,
    angle: float | Tensor = 0.0,
    saturation: float | Tensor = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Rotate every pixel's hue by ``angle`` degrees and scale its chroma by ``saturation``.

    ``angle`` and ``saturation`` are numbers, per-image ``(N,)`` tensors or per-pixel fields
    ``(N, 1, ...)``. Luma is kept exactly; a colour pushed out of the RGB cube has its chroma
    shrunk towards grey until it fits (see the module docstring). ``mask`` (``(N, 1, ...)`` in
    ``[0, 1]``) blends the result with the input: where it is 0 the pixel is returned untouched.
    """
    _check_rgb(x)
    lo, hi = float(x.detach().min()), float(x.detach().max())
    if lo < -1e-6 or hi > 1.0 + 1e-6:
        raise InputError(
            f"pixels must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]",
            "colour transforms work in pixel space: pass un-normalised images",
        )
    theta = torch.deg2rad(torch.remainder(_per_image(angle, x, "angle"), 360.0))
    scale = _per_image(saturation, x, "saturation")
    if bool((scale < 0).any()):
        raise InputError("saturation factors must be >= 0", "use 0 for grey, 1 to keep the saturation, >1 to strengthen it")
    forward, inverse = _yiq_matrices(x.dtype, x.device)
    yiq = _channel_matmul(forward, x)
    luma = yiq[:, :1].clamp(0.0, 1.0)
    i, q = yiq[:, 1:2], yiq[:, 2:3]
    cos, sin = torch.cos(theta), torch.sin(theta)
    # Rotating (I, -Q) counter-clockwise by theta adds theta to hue = atan2(-Q, I).
    i_new = scale * (i * cos + q * sin)
    q_new = scale * (q * cos - i * sin)
    # RGB offsets from the pixel's grey: the inverse matrix's first column is all ones.
    offset = _channel_matmul(inverse[:, 1:], torch.cat([i_new, q_new], dim=1))
    # Largest t in [0, 1] with luma + t * offset inside [0, 1] for every channel. The safe
    # denominators keep the unselected branch of `where` finite, so its gradient is 0, not NaN.
    inf = torch.tensor(math.inf, dtype=x.dtype, device=x.device)
    ones = torch.ones_like(offset)
    up = torch.where(offset > 0, (1.0 - luma) / torch.where(offset > 0, offset, ones), inf)
    down = torch.where(offset < 0, luma / torch.where(offset < 0, -offset, ones), inf)
    shrink = torch.minimum(up, down).amin(dim=1, keepdim=True).clamp(max=1.0)
    out = (luma + shrink * offset).clamp(0.0, 1.0)
    if mask is not None:
        m = _per_image(mask, x, "mask")
        out = x + m * (out - x)
    return out


def hue_rotate(x: Tensor, angle: float | Tensor, mask: Tensor | None = None) -> Tensor:
    """Rotate the hue of ``x`` by ``angle`` degrees, keeping luma (and shape) exactly."""
    return recolour(x, angle=angle, saturation=1.0, mask=mask)


def _wrap_degrees(angle: Tensor) -> Tensor:
    """Map angles to [-180, 180)."""
    return torch.remainder(angle + 180.0, 360.0) - 180.0


@torch.no_grad()
def dominant_hue(x: Tensor, bins: int = 36, min_chroma: float = 0.05) -> tuple[Tensor, Tensor]:
    """The most common hue of each image, in degrees, and whether the image has any colour.

    Hues of pixels with chroma >= ``min_chroma`` are histogrammed in ``bins`` bins weighted by
    chroma (so faint colour noise counts little); the fullest bin is refined to the
    chroma-weighted circular mean of the pixels within one bin of it. A histogram rather than
    a plain circular mean, so that an image of two colours picks one of them instead of a hue
    between them. Images without coloured pixels get hue 0 and ``False``.
    """
    if bins < 2:
        raise InputError(f"bins must be >= 2, got {bins}")
    hue, chroma = hue_of(x)
    n = x.shape[0]
    hue, chroma = hue.reshape(n, -1), chroma.reshape(n, -1)
    weight = torch.where(chroma >= min_chroma, chroma, torch.zeros_like(chroma))
    width = 360.0 / bins
    index = (torch.remainder(hue, 360.0) / width).long().clamp(max=bins - 1)
    histogram = torch.zeros(n, bins, dtype=x.dtype, device=x.device).scatter_add_(1, index, weight)
    centre = (histogram.argmax(dim=1).to(x.dtype) + 0.5) * width
    near = _wrap_degrees(hue - centre[:, None]).abs() <= width
    w = weight * near
    rad = torch.deg2rad(hue)
    mean = torch.rad2deg(torch.atan2((w * torch.sin(rad)).sum(1), (w * torch.cos(rad)).sum(1)))
    has_colour = weight.sum(1) > 0
    return torch.where(has_colour, mean, torch.zeros_like(mean)), has_colour


@torch.no_grad()
def dominant_hue_mask(x: Tensor, half_width: float = 30.0, soft: bool = True, min_chroma: float = 0.05, bins: int = 36) -> Tensor:
    """``(N, 1, ...)`` mask of the pixels whose hue lies within ``half_width`` deg of the dominant hue.

    Hard: 1 inside the hue window, 0 outside. Soft: a raised cosine, 1 at the dominant hue
    falling to 0 at the window's edge, so recolouring fades out at the colour's fringe. In
    both, pixels below ``min_chroma`` (grey, black, white) and outside the window are exactly
    0: a masked recolouring leaves them untouched. The mask is a selection, not a parameter,
    so it carries no gradient.
    """
    if not 0.0 < half_width <= 180.0:
        raise InputError(f"half_width must lie in (0, 180] degrees, got {half_width}", "e.g. 30 for the pixels within +-30 deg of the dominant hue")
    centre, has_colour = dominant_hue(x, bins=bins, min_chroma=min_chroma)
    hue, chroma = hue_of(x)
    shape = (-1,) + (1,) * (x.dim() - 1)
    delta = _wrap_degrees(hue - centre.view(shape)).abs()
    inside = (delta < half_width) & (chroma >= min_chroma) & has_colour.view(shape)
    if soft:
        weight = 0.5 * (1.0 + torch.cos(math.pi * delta / half_width))
    else:
        weight = torch.ones_like(delta)
    return torch.where(inside, weight, torch.zeros_like(weight))


def region_mask(x: Tensor, region: str, soft: bool = True, half_width: float = 30.0) -> Tensor | None:
    """The mask for a named region: ``all`` (no mask) or ``dominant`` (the dominant hue's pixels)."""
    if region == "all":
        return None
    if region == "dominant":
        return dominant_hue_mask(x, half_width=half_width, soft=soft)
    raise InputError(f"unknown colour region '{region}'", "use region=all (whole image) or region=dominant (pixels of the dominant hue)")


def equal_luma_colours(hue: Tensor, luma: float = 0.5, chroma: float | None = None) -> Tensor:
    """RGB colours ``(K, 3)`` of the given hues (degrees), all with the same luma and chroma.

    ``chroma`` defaults to the largest value for which every hue fits in the RGB cube at this
    luma, so that the colours differ in hue only.
    """
    hue = torch.as_tensor(hue, dtype=torch.float32).flatten()
    if not 0.0 < luma < 1.0:
        raise InputError(f"luma must lie in (0, 1), got {luma}")
    _, inverse = _yiq_matrices(torch.float64, torch.device("cpu"))
    max_chroma = min(luma, 1.0 - luma) / float(inverse[:, 1:].norm(dim=1).max())
    if chroma is None:
        chroma = max_chroma
    if not 0.0 <= chroma <= max_chroma + 1e-9:
        raise InputError(f"chroma {chroma} does not fit the RGB cube for every hue at luma {luma}", f"use a chroma <= {max_chroma:.4f}")
    rad = torch.deg2rad(hue.double())
    # hue = atan2(-Q, I)  =>  I = c cos(h), Q = -c sin(h)
    yiq = torch.stack([torch.full_like(rad, luma), chroma * torch.cos(rad), -chroma * torch.sin(rad)], dim=1)
    return _channel_matmul(inverse, yiq).clamp(0.0, 1.0).float()
