"""Per-sample image transforms on uint8 (3, H, W) tensors, deterministic from explicit keys.

The training augmentation is a pure function of (image, seed, epoch, sample index): it draws from
its own generator seeded with that key and never touches the global RNG. So a resumed run, a run
with a different number of loader workers and a run on a different number of ranks all see the
same pixels for the same (epoch, index).

Output stays uint8 in [0, 255]; the loader turns it into float [0, 1] on the device. Nothing here
normalises (the model does), so eps keeps its meaning in pixel units.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

TRAIN_TRANSFORMS = ("none", "rrc_flip")
CROP_FRACTION = 0.875  # evaluation view: resize the shorter side to res / 0.875, centre crop res
RRC_RATIO = (3 / 4, 4 / 3)
AUGMENT_STREAM = 1  # first seed word of augmentation streams; the loader's shuffling uses others


def rrc_scale(resolution: int) -> tuple[float, float]:
    """Area range of random-resized-crop for a given output resolution.

    ImageNet-size training (output > 64 px) uses the usual (0.08, 1). At CIFAR-like sizes a crop of
    8 % of a 32 px image is 9 x 9 pixels and mostly destroys the object, so small outputs keep at
    least 35 % of the area, as SimCLR-style CIFAR recipes do.
    """
    return (0.08, 1.0) if resolution > 64 else (0.35, 1.0)


def resize(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of a uint8 (3, H, W) tensor to ``size`` = (h, w), antialiased when shrinking.

    Runs torch's uint8 kernel (fixed-point weights), which is fastest on a channels-last view such as
    the one ``ImageFolderDataset.full_image`` returns (PIL decodes to H x W x 3): a random-resized crop
    of an ImageNet-sized image to 224 px costs ~0.6-0.9 ms of CPU instead of ~2.2-2.4 ms through float32
    (BENCHMARKS.md, "Data loaders"). The result is within 1 of the float32 resize rounded to uint8
    (``tests/test_data.py``). The output keeps the input's memory format."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    if img.dtype != torch.uint8:
        raise TypeError(f"resize expects a uint8 image, got {img.dtype}")
    return F.interpolate(img[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def center_crop(img: torch.Tensor, resolution: int, crop_fraction: float = CROP_FRACTION) -> torch.Tensor:
    """Evaluation view: resize the shorter side to round(resolution / crop_fraction), crop the centre."""
    h, w = img.shape[-2:]
    short = round(resolution / crop_fraction)
    # Keep the aspect ratio; the longer side is rounded, so it is >= short >= resolution.
    nh, nw = (short, round(w * short / h)) if h <= w else (round(h * short / w), short)
    img = resize(img, (nh, nw))
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return img[:, top : top + resolution, left : left + resolution]


def sample_crop(
    h: int,
    w: int,
    rng: np.random.Generator,
    scale: tuple[float, float],
    ratio: tuple[float, float] = RRC_RATIO,
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop covering ``scale`` of the area at aspect ``ratio``.

    Tries ten draws of (area, log-uniform aspect) and falls back to the largest centred crop whose
    aspect is inside ``ratio`` when none fits the image.
    """
    area = h * w
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            return top, left, ch, cw
    aspect = min(max(w / h, ratio[0]), ratio[1])
    if w / h > aspect:
        ch, cw = h, round(h * aspect)
    else:
        cw, ch = w, round(w / aspect)
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample's augmentation; depends on nothing but the key."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([AUGMENT_STREAM, seed, epoch, index])))


def random_resized_crop_flip(
    img: torch.Tensor,
    resolution: int,
    *,
    seed: int,
    epoch: int,
    index: int,
    scale: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Random-resized-crop to ``resolution`` x ``resolution`` plus a horizontal flip with p = 1/2.

    ``img`` is the full decoded uint8 (3, H, W) image (not the centre-cropped view), so crops can
    reach its borders. ``scale`` defaults to ``rrc_scale(resolution)``.
    """
    rng = sample_rng(seed, epoch, index)
    h, w = img.shape[-2:]
    top, left, ch, cw = sample_crop(h, w, rng, scale if scale is not None else rrc_scale(resolution))
    out = resize(img[:, top : top + ch, left : left + cw], (resolution, resolution))
    if rng.random() < 0.5:
        out = out.flip(-1)
    return out.contiguous()
