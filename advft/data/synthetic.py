"""SyntheticShapes: a procedurally generated 10-class image problem that needs no download.

It exists so that the whole pipeline (fine-tuning, linear probe, attack) can run on a laptop
and in CI, on a task where the numbers still mean something: a classifier must find a shape or
a texture under random position, scale, rotation, colours, background clutter, sensor noise and
a distractor blob. A briefly trained encoder probes far above chance (10 %), and a standard one
falls apart under an L-inf attack of 8/255, as on natural images.

Conventions
- Images are uint8 (N, H, W, 3), RGB; ``__getitem__`` returns a uint8 (3, H, W) tensor and an int
  label, like every advft dataset. No normalisation anywhere.
- Everything is a pure function of (split, size, resolution, seed, GENERATOR_VERSION). The train
  and test splits are independent streams of the same distribution (different seed-sequence keys).
- A larger ``size`` extends a smaller one: image i is the same for every size > i, because images
  are made in fixed chunks of ``CHUNK`` with one seed each.
- Geometry is defined in units of the image side, so a 64 px set shows the same scenes as a 32 px
  one, only sharper. Shapes are rendered at 2x and box-filtered down, which anti-aliases edges.
- Results are cached as ``<cache_dir>/synthetic/<name>.npz``; the name holds the generator version
  and every setting. The file is written under a temporary name and renamed, so concurrent ranks
  or an interrupted run never leave a half-written cache behind. Bump GENERATOR_VERSION whenever
  the pixels change.
"""

from __future__ import annotations

import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

GENERATOR_VERSION = 1
CHUNK = 500  # images per seed; 10 divides it, so each full chunk is exactly class-balanced
SUPERSAMPLE = 2
SPLITS = ("train", "test")
CLASSES = [
    "disc",
    "square",
    "triangle",
    "cross",
    "ring",
    "horizontal_stripes",
    "vertical_stripes",
    "checkerboard",
    "diagonal_stripes",
    "dots",
]
_SHAPES = frozenset(range(5))  # classes 0-4 are solid shapes; 5-9 are textures seen through a window
_SPLIT_KEY = {"train": 0, "test": 1}


def default_cache_dir() -> Path:
    """``$ADVFT_CACHE`` if set, else ``~/.cache/advft``."""
    return Path(os.environ.get("ADVFT_CACHE") or Path.home() / ".cache" / "advft")


def _chunk_rng(seed: int, split: str, chunk: int) -> np.random.Generator:
    # One independent stream per (seed, split, chunk): splits never share a draw, and chunk c
    # does not depend on how many chunks follow it.
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _SPLIT_KEY[split], chunk])))


def _contrasting_colours(rng: np.random.Generator, bg: np.ndarray, min_dist: float) -> np.ndarray:
    """Foreground colours at least ``min_dist`` (Euclidean, RGB in [0,1]) from their backgrounds."""
    fg = rng.random(bg.shape)
    for _ in range(20):  # rejection sampling; each round keeps ~80 % of the remaining draws
        bad = np.linalg.norm(fg - bg, axis=1) < min_dist
        if not bad.any():
            break
        fg[bad] = rng.random((int(bad.sum()), 3))
    # The few that are still too close get the colour opposite the background, which is far enough.
    bad = np.linalg.norm(fg - bg, axis=1) < min_dist
    fg[bad] = np.where(bg[bad] > 0.5, 0.0, 1.0)
    return fg


def _masks(labels: np.ndarray, rng: np.random.Generator, res: int) -> np.ndarray:
    """Foreground coverage in [0,1], shape (B, res, res), of each image's shape or texture."""
    b = len(labels)
    side = res * SUPERSAMPLE
    grid = (np.arange(side, dtype=np.float32) + 0.5) / side  # pixel centres, image units
    radius = rng.uniform(0.17, 0.36, b).astype(np.float32)
    # Centres keep most of the object inside the image; a little clipping at the border is fine.
    cy = rng.uniform(0.8 * radius, 1 - 0.8 * radius).astype(np.float32)
    cx = rng.uniform(0.8 * radius, 1 - 0.8 * radius).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi, b)
    # Stripe classes are defined by orientation, so their angle is only jittered (+-15 degrees)
    # around 0 (horizontal bands), 90 (vertical) or 45/135 (diagonal): the ranges never overlap.
    jitter = rng.uniform(-np.pi / 12, np.pi / 12, b)
    diagonal = np.where(rng.random(b) < 0.5, np.pi / 4, 3 * np.pi / 4)
    angle = np.select([labels == 5, labels == 6, labels == 8], [jitter, np.pi / 2 + jitter, diagonal + jitter], angle)
    period = rng.uniform(0.11, 0.19, b).astype(np.float32)  # texture period, image units
    phase = rng.random((b, 2)).astype(np.float32)
    round_window = rng.random(b) < 0.5  # textures are seen through a disc or a square window

    def col(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32)[:, None, None]

    dy = grid[None, :, None] - col(cy)
    dx = grid[None, None, :] - col(cx)
    cos, sin = col(np.cos(angle)), col(np.sin(angle))
    # (u, v): image coordinates rotated by the angle, in image units; v runs "down" at angle 0.
    u = cos * dx + sin * dy
    v = -sin * dx + cos * dy
    r = col(radius)
    un, vn = u / r, v / r  # normalised so the object's circumscribed circle is the unit circle
    rho2 = un * un + vn * vn
    m = np.zeros((b, side, side), dtype=bool)
    p, ph0, ph1 = col(period), col(phase[:, 0]), col(phase[:, 1])
    for k in range(10):
        sel = labels == k
        if not sel.any():
            continue
        uu, vv, rr = un[sel], vn[sel], rho2[sel]
        if k == 0:  # disc
            mk = rr <= 1.0
        elif k == 1:  # square, area close to the disc's
            mk = np.maximum(np.abs(uu), np.abs(vv)) <= 0.85
        elif k == 2:  # equilateral triangle, circumradius 1.2, pointing along -v
            tu, tv = uu / 1.2, vv / 1.2
            mk = (tv <= 0.5) & (np.sqrt(3) * tu - tv <= 1) & (-np.sqrt(3) * tu - tv <= 1)
        elif k == 3:  # plus sign / x, arm half-width 0.3
            au, av = np.abs(uu), np.abs(vv)
            mk = ((au <= 0.3) & (av <= 1)) | ((av <= 0.3) & (au <= 1))
        elif k == 4:  # ring
            mk = (rr <= 1.0) & (rr >= 0.55**2)
        else:
            window = np.where(round_window[sel, None, None], rr <= 1.0, np.maximum(np.abs(uu), np.abs(vv)) <= 0.9)
            # Texture coordinates in periods; random phases so the window does not fix the pattern.
            tu = u[sel] / p[sel] + ph0[sel]
            tv = v[sel] / p[sel] + ph1[sel]
            if k in (5, 6, 8):  # stripes: bands across v, half of each period filled
                pattern = (tv - np.floor(tv)) < 0.5
            elif k == 7:  # checkerboard, one period = two cells
                pattern = ((np.floor(2 * tu) + np.floor(2 * tv)) % 2) == 0
            else:  # dots on a square lattice, dot radius 0.3 period
                fu, fv = tu - np.floor(tu) - 0.5, tv - np.floor(tv) - 0.5
                pattern = fu * fu + fv * fv <= 0.3**2
            mk = window & pattern
        m[sel] = mk
    # Box filter the supersampled mask down: soft, anti-aliased coverage.
    return m.reshape(b, res, SUPERSAMPLE, res, SUPERSAMPLE).mean(axis=(2, 4), dtype=np.float32)


def _render_chunk(rng: np.random.Generator, n: int, res: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (uint8, (n, res, res, 3)) and labels of one chunk; every draw comes from ``rng``."""
    labels = rng.permutation(np.arange(n) % len(CLASSES)).astype(np.int64)
    grid = (np.arange(res, dtype=np.float32) + 0.5) / res
    yy, xx = grid[None, :, None, None], grid[None, None, :, None]  # (1, H, W, 1)

    bg = rng.random((n, 3))
    fg = _contrasting_colours(rng, bg, min_dist=0.35)
    # Background clutter: a linear colour gradient plus a low-frequency wave, per channel.
    grad_dir = rng.uniform(0, 2 * np.pi, n)
    grad_amp = rng.uniform(-0.15, 0.15, (n, 3))
    wave_dir = rng.uniform(0, 2 * np.pi, n)
    wave_freq = rng.uniform(1.0, 3.0, n)  # cycles per image side: far coarser than any texture
    wave_phase = rng.uniform(0, 2 * np.pi, n)
    wave_amp = rng.uniform(0, 0.12, (n, 3))

    def c4(a: np.ndarray) -> np.ndarray:
        return a.astype(np.float32).reshape(n, 1, 1, -1)

    along = c4(np.cos(grad_dir)) * (xx - 0.5) + c4(np.sin(grad_dir)) * (yy - 0.5)
    wave_pos = c4(np.cos(wave_dir)) * xx + c4(np.sin(wave_dir)) * yy
    wave = np.sin(2 * np.pi * c4(wave_freq) * wave_pos + c4(wave_phase))
    background = c4(bg) + c4(grad_amp) * along + c4(wave_amp) * wave

    mask = _masks(labels, rng, res)[..., None]
    img = background * (1 - mask) + c4(fg) * mask

    # Distractor on half the images: a soft Gaussian blob of a random colour, smaller than any object.
    has_blob = rng.random(n) < 0.5
    blob_c = rng.random((n, 2))
    blob_sigma = rng.uniform(0.03, 0.06, n)
    blob_colour = rng.random((n, 3))
    d2 = (xx - c4(blob_c[:, 0])) ** 2 + (yy - c4(blob_c[:, 1])) ** 2
    blob = c4(0.8 * has_blob) * np.exp(-d2 / (2 * c4(blob_sigma) ** 2))
    img = img * (1 - blob) + c4(blob_colour) * blob

    # Sensor noise, a different level per image.
    noise_sigma = rng.uniform(0.0, 0.06, n)
    img = img + c4(noise_sigma) * rng.standard_normal((n, res, res, 3), dtype=np.float32)
    images = np.clip(np.rint(img * 255), 0, 255).astype(np.uint8)
    return images, labels


def generate(split: str, size: int, resolution: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8, (size, resolution, resolution, 3)) and int64 labels, without any cache."""
    if split not in SPLITS:
        raise ValueError(f"synthetic split {split!r} is not one of {SPLITS}")
    if size < 1 or resolution < 8:
        raise ValueError(f"synthetic size must be >= 1 and resolution >= 8, got size={size}, resolution={resolution}")
    images = np.empty((size, resolution, resolution, 3), dtype=np.uint8)
    labels = np.empty(size, dtype=np.int64)
    for c, start in enumerate(range(0, size, CHUNK)):
        # Always draw a full chunk and cut it, so that the first images never depend on `size`.
        x, y = _render_chunk(_chunk_rng(seed, split, c), CHUNK, resolution)
        stop = min(start + CHUNK, size)
        images[start:stop] = x[: stop - start]
        labels[start:stop] = y[: stop - start]
    return images, labels


def cache_path(cache_dir: str | os.PathLike, split: str, size: int, resolution: int, seed: int) -> Path:
    """Where the arrays for these settings are cached; the name encodes version and settings."""
    name = f"shapes-v{GENERATOR_VERSION}-{split}-n{size}-r{resolution}-s{seed}.npz"
    return Path(cache_dir) / "synthetic" / name


def _load_cached(path: Path, size: int, resolution: int) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            images, labels = f["images"], f["labels"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
        warnings.warn(f"ignoring unreadable synthetic cache {path}: {e}", stacklevel=3)
        return None
    if images.shape != (size, resolution, resolution, 3) or labels.shape != (size,) or images.dtype != np.uint8:
        found = f"{images.dtype} {images.shape}"
        warnings.warn(f"ignoring synthetic cache {path} holding an unexpected {found} array", stacklevel=3)
        return None
    return images, labels


def _save_atomic(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=images, labels=labels)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SyntheticShapes(Dataset):
    """Ten classes of shapes and textures; see the module docstring for what varies and why.

    Items are ``(uint8 tensor (3, H, W), int label)``; ``images`` (N, H, W, 3) uint8 and ``labels``
    (N,) int64 hold the whole split in memory (10 000 images of 32 px are 30 MB).
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 10000,
        resolution: int = 32,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.split, self.size, self.resolution, self.seed = split, size, resolution, seed
        self.classes: list[str] = list(CLASSES)
        path = cache_path(cache_dir if cache_dir is not None else default_cache_dir(), split, size, resolution, seed)
        cached = _load_cached(path, size, resolution)
        if cached is None:
            cached = generate(split, size, resolution, seed)
            try:
                _save_atomic(path, *cached)
            except OSError as e:  # a read-only home must not stop a run that can regenerate in seconds
                warnings.warn(f"could not cache synthetic data at {path}: {e}", stacklevel=2)
        self.images: np.ndarray = cached[0]
        self.labels: np.ndarray = cached[1]
        self.cache_file = path

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.images[i]).permute(2, 0, 1).contiguous(), int(self.labels[i])
