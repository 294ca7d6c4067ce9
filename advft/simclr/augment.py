"""SimCLR augmentations batched on the device, every random number from an explicit generator.

Parameters are drawn for the GLOBAL batch from a generator seeded by (seed, step), each rank taking its
rows: the views are the same for any number of ranks and for a resumed run.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from advft.engine.seeding import AUGMENT_STREAM, step_generator
from advft.simclr.config import SimCLRConfig


_CROP_TRIES = 10  # random-resized-crop draws per image before falling back to the central crop
_CROP_RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of the crops (log-uniform)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, as the usual grayscale conversion


def draw_augment_params(n: int, height: int, width: int, aug: SimCLRConfig,
                        generator: torch.Generator) -> dict[str, Tensor]:
    """Random parameters of ``n`` SimCLR augmentations, on the generator's device.

    The same number of values is drawn whatever the settings, so changing one probability does not
    reshuffle the others. Keys: ``box`` (n, 4) crop (top, left, height, width) in pixels, ``flip``,
    ``jitter``, ``gray``, ``blur`` (n,) bool, ``factors`` (n, 4) brightness/contrast/saturation factors
    and hue shift, ``order`` (n, 4) the order of the four jitter operations, ``sigma`` (n,) blur std in pixels.
    """
    dev = generator.device

    def u(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, device=dev)

    # Random resized crop as torchvision samples it: up to ten (area, log-aspect) draws, the first that
    # fits the image wins, otherwise the largest central crop with an aspect inside the range.
    area = height * width * (aug.crop_scale_min + (1 - aug.crop_scale_min) * u(n, _CROP_TRIES))
    lo, hi = math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1])
    aspect = torch.exp(lo + (hi - lo) * u(n, _CROP_TRIES))
    cw = torch.round(torch.sqrt(area * aspect))
    ch = torch.round(torch.sqrt(area / aspect))
    fits = (cw >= 1) & (cw <= width) & (ch >= 1) & (ch <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # argmax returns the first maximum
    any_fit = fits.any(1)
    r = min(max(width / height, _CROP_RATIO[0]), _CROP_RATIO[1])
    fb_w, fb_h = (round(height * r), height) if width / height > r else (width, round(width / r))
    cw = torch.where(any_fit, cw.gather(1, first).squeeze(1), torch.full_like(any_fit, fb_w, dtype=cw.dtype))
    ch = torch.where(any_fit, ch.gather(1, first).squeeze(1), torch.full_like(any_fit, fb_h, dtype=ch.dtype))
    pos = u(n, 2)
    top = torch.where(any_fit, torch.floor(pos[:, 0] * (height - ch + 1)), torch.floor((height - ch) / 2))
    left = torch.where(any_fit, torch.floor(pos[:, 1] * (width - cw + 1)), torch.floor((width - cw) / 2))

    flip = u(n) < aug.flip_p
    jitter = u(n) < aug.jitter_p
    s = aug.jitter_strength
    f = 2 * u(n, 4) - 1  # uniform in [-1, 1]
    factors = torch.stack([(1 + 0.8 * s * f[:, 0]).clamp_min(0), (1 + 0.8 * s * f[:, 1]).clamp_min(0),
                           (1 + 0.8 * s * f[:, 2]).clamp_min(0), 0.2 * s * f[:, 3]], dim=1)
    order = u(n, 4).argsort(dim=1)  # torchvision's ColorJitter also applies its four operations in random order
    gray = u(n) < aug.grayscale_p
    blur = u(n) < aug.blur_p
    sigma = 0.1 + 1.9 * u(n)
    return {"box": torch.stack([top, left, ch, cw], dim=1), "flip": flip, "jitter": jitter, "factors": factors,
            "order": order, "gray": gray, "blur": blur, "sigma": sigma}


def _gray(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(a: Tensor, b: Tensor, f: Tensor) -> Tensor:
    """f * a + (1 - f) * b, clamped to [0,1]; exactly ``a`` when f = 1 (the identity of every jitter op)."""
    return (f * a + (1 - f) * b).clamp_(0, 1)


def _shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of RGB images in [0,1] by ``shift`` (n,) turns, keeping HSV saturation and value."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    c = v - x.amin(1)  # chroma; where it is 0 all channels are equal, the differences below are 0 and so is h
    inv = 1 / c.clamp_min(1e-12)
    # hue in sixths of a turn, piecewise by which channel is the maximum
    h = torch.where(v == r, (g - b) * inv, torch.where(v == g, (b - r) * inv + 2, (r - g) * inv + 4))
    h = h + 6 * shift.view(-1, 1, 1)
    h = h - 6 * torch.floor(h / 6)  # into [0, 6)
    # back to RGB: channel n is V - C * clamp(min(k, 4 - k), 0, 1) with k = (n + h) mod 6, n = 5, 3, 1
    out = torch.empty_like(x)
    for i, offset in enumerate((5.0, 3.0, 1.0)):
        k = h + offset
        k = torch.where(k >= 6, k - 6, k)
        torch.sub(v, c * torch.minimum(k, 4 - k).clamp_(0, 1), out=out[:, i])
    return out.clamp_(0, 1)


def _gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with one std per image (reflect padding), kernel about 10 % of the side."""
    n, ch, hgt, wid = x.shape
    k = max(3, (hgt // 10) // 2 * 2 + 1)
    t = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    w = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None].to(x.dtype) ** 2))
    w = (w / w.sum(1, keepdim=True)).repeat_interleave(ch, 0)  # (n * ch, k): one filter per image channel
    y = F.pad(x.reshape(1, n * ch, hgt, wid), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(y, w.view(n * ch, 1, 1, k), groups=n * ch)
    y = F.conv2d(y, w.view(n * ch, 1, k, 1), groups=n * ch)
    return y.view(n, ch, hgt, wid)


def apply_augment(x: Tensor, params: Mapping[str, Tensor], aug: SimCLRConfig) -> Tensor:
    """One SimCLR view of a batch: crop + resize, flip, colour jitter, grayscale, blur, in that order.

    ``x``: (n, 3, H, W), uint8 in [0, 255] or float in [0, 1]; ``params`` from :func:`draw_augment_params`.
    Returns float32 in [0, 1], (n, 3, H, W), never normalised. No host synchronisation: every per-image
    choice is a ``torch.where``, so the cost does not depend on the draws.
    """
    x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
    n, _, hgt, wid = x.shape
    top, left, ch, cw = params["box"].to(x.dtype).unbind(1)
    # Crop + bilinear resize as one affine resampling. With align_corners=False the normalised coordinate
    # -1/+1 is the outer edge of the border pixels, so the box [left, left + cw) maps onto the whole
    # output; a crop is never larger than the image, so this only ever upsamples (no aliasing).
    sx = cw / wid * torch.where(params["flip"], -1.0, 1.0).to(x.dtype)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = (2 * left + cw) / wid - 1
    theta[:, 1, 1] = ch / hgt
    theta[:, 1, 2] = (2 * top + ch) / hgt - 1
    grid = F.affine_grid(theta, [n, 3, hgt, wid], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    fac = params["factors"].to(x.dtype)
    ops = torch.arange(4, device=x.device)
    for slot in range(4):
        now = (params["order"][:, slot, None] == ops) & params["jitter"][:, None]  # (n, 4): the op of this slot
        f = torch.where(now, fac, torch.ones_like(fac)).view(n, 4, 1, 1)  # 1 is the identity of the blends
        x = _blend(x, torch.zeros_like(x[:, :1]), f[:, 0:1])  # brightness
        x = _blend(x, _gray(x).mean((2, 3), keepdim=True), f[:, 1:2])  # contrast
        x = _blend(x, _gray(x), f[:, 2:3])  # saturation
        # A zero hue shift is not an exact identity in float (RGB->HSV->RGB), hence where() for hue.
        x = torch.where(now[:, 3].view(n, 1, 1, 1), _shift_hue(x, fac[:, 3]), x)
    x = torch.where(params["gray"].view(n, 1, 1, 1), _gray(x).expand_as(x), x)
    if aug.blur_p > 0:  # a config constant, not a per-image draw: no sync
        x = torch.where(params["blur"].view(n, 1, 1, 1), _gaussian_blur(x, params["sigma"]), x)
    return x.clamp_(0, 1)


def simclr_views(x: Tensor, aug: SimCLRConfig, *, seed: int, step: int, rank: int = 0,
                 world_size: int = 1) -> tuple[Tensor, Tensor]:
    """Two augmented views of this rank's batch ``x`` (B, 3, H, W), float32 in [0, 1].

    Parameters are drawn for the global batch (B * world_size images) from a generator seeded by
    (seed, step) on x's device, and this rank takes its contiguous rows: the views are the same for any
    number of ranks and for a resumed run.
    """
    b, _, hgt, wid = x.shape
    g = step_generator(seed, step, x.device, stream=AUGMENT_STREAM)
    views = []
    for _ in range(2):
        p = draw_augment_params(b * world_size, hgt, wid, aug, g)
        views.append(apply_augment(x, {k: v[rank * b:(rank + 1) * b] for k, v in p.items()}, aug))
    return views[0], views[1]
