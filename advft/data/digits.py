"""Real handwritten digits that ship inside scikit-learn: the demo's data, with no download.

``sklearn.datasets.load_digits`` holds 1797 grayscale 8 x 8 scans of the digits 0-9 (ink counts 0-16),
read from a file inside the scikit-learn package. Here each becomes a uint8 RGB image (the grey value on
all three channels, 0-16 mapped to 0-255), upsampled bilinearly to the requested resolution, and the
images are split ONCE, by a seeded permutation, into a fixed held-out set of ``HELD_OUT`` images and a
training set of the rest. The split depends on the seed only, so pretraining, fine-tuning and the probe
all train on "train" and every evaluation tests on "test" images none of them has seen.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from advft.data.transforms import resize

SPLITS = ("train", "test")
HELD_OUT = 597  # a third of the 1797 images, leaving 1200 to train on
NATIVE = 8  # pixels per side of the scans
_SPLIT_STREAM = 3  # first seed word of the split permutation (loader.py uses 0-2 for its streams)


def split_indices(n: int, seed: int) -> dict[str, np.ndarray]:
    """Sorted, disjoint index sets {"train", "test"} covering range(n); a pure function of (n, seed)."""
    order = np.random.Generator(np.random.PCG64(np.random.SeedSequence([_SPLIT_STREAM, seed]))).permutation(n)
    return {"test": np.sort(order[:HELD_OUT]), "train": np.sort(order[HELD_OUT:])}


def _load_scans() -> tuple[np.ndarray, np.ndarray]:
    """All scans as uint8 (N, 8, 8) in 0-255 and int64 labels; scikit-learn is imported only here."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("data.format = 'digits' needs scikit-learn, which is not installed; "
                          "install it with: pip install -e '.[demo]' (bash scripts/setup.sh does)") from None
    bunch = load_digits()
    scans = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0))
    return scans.clip(0, 255).astype(np.uint8), np.asarray(bunch.target, dtype=np.int64)


class Digits(Dataset):
    """One split of the scikit-learn digits at ``resolution`` px; items ``(uint8 tensor (3, H, W), int label)``.

    ``images`` (N, H, W, 3) uint8 and ``labels`` (N,) int64 hold the split in memory; ``indices`` are the
    positions of its images in ``load_digits()``.
    """

    def __init__(self, split: str = "train", resolution: int = 16, seed: int = 0) -> None:
        if split not in SPLITS:
            raise ValueError(f"digits split {split!r} is not one of {SPLITS}")
        scans, labels = _load_scans()
        self.split, self.resolution, self.seed = split, resolution, seed
        self.classes: list[str] = [str(d) for d in range(10)]
        self.indices: np.ndarray = split_indices(len(labels), seed)[split]
        grey = torch.from_numpy(scans[self.indices])[:, None].expand(-1, 3, -1, -1)
        big = torch.stack([resize(img, (resolution, resolution)) for img in grey])
        self.images: np.ndarray = big.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels: np.ndarray = labels[self.indices]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.images[i]).permute(2, 0, 1).contiguous(), int(self.labels[i])
