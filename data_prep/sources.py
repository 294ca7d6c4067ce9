"""Where the images come from: an ImageFolder tree or a CIFAR-10 root, resolved to one ``Source``.

Layouts accepted (SRC is the command-line argument):
- ``SRC/<split>/<class>/<image>`` (the ImageNet train/val layout with the split folder above it),
- ``SRC/<class>/<image>`` (SRC is already the split folder),
- a CIFAR-10 root as torchvision downloads it (``SRC/cifar-10-batches-py/`` or that folder itself);
  splits ``train`` and ``test``.

Labels are the positions of the class folders in sorted order, as torchvision's ImageFolder assigns
them, so a converted dataset has the same labels as the built-in folder loader.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Extensions PIL decodes (torchvision's list); anything else in a class folder is ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CIFAR_SPLITS = ("train", "test")


class PrepError(Exception):
    """A bad source, output or setting; the message names the path or value and what is valid."""


@dataclass
class Source:
    """A resolved split of a dataset.

    ``kind`` is "folder" or "cifar10". For folders ``root`` is the split folder and ``files[i]`` the
    path of sample i relative to it (POSIX separators); for CIFAR-10 ``arrays`` holds the uint8
    (N, 32, 32, 3) RGB images and ``files`` is empty. ``labels[i]`` indexes ``classes``.
    """

    kind: str
    root: Path
    split: str
    classes: list[str]
    labels: np.ndarray
    files: list[str]
    arrays: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def name_of(self, i: int) -> str:
        """A human-readable identity of sample i for logs and sidecars."""
        return self.files[i] if self.kind == "folder" else f"{self.split}[{i}]"

    def counts_per_class(self, keep: np.ndarray | None = None) -> dict[str, int]:
        labels = self.labels if keep is None else self.labels[keep]
        counts = np.bincount(labels, minlength=len(self.classes))
        return {name: int(c) for name, c in zip(self.classes, counts)}

    def take(self, indices: np.ndarray) -> Source:
        """The samples at ``indices`` (in that order), same classes."""
        indices = np.asarray(indices, dtype=np.int64)
        return Source(
            kind=self.kind,
            root=self.root,
            split=self.split,
            classes=self.classes,
            labels=self.labels[indices],
            files=[self.files[i] for i in indices] if self.files else [],
            arrays=None if self.arrays is None else self.arrays[indices],
        )


def _is_cifar_root(src: Path) -> Path | None:
    for folder in (src, src / "cifar-10-batches-py"):
        if (folder / "batches.meta").is_file():
            return folder
    return None


def _class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _has_images(folder: Path) -> bool:
    return any(e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS) for e in os.scandir(folder))


def _scan_folder(split_dir: Path, split: str) -> Source:
    classes = _class_dirs(split_dir)
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found: list[str] = []
        # Walk below the class folder too: some trees nest images one level deeper.
        for dirpath, dirnames, filenames in os.walk(split_dir / name, followlinks=True):
            dirnames.sort()
            rel = Path(dirpath).relative_to(split_dir).as_posix()
            found += [f"{rel}/{f}" for f in sorted(filenames)
                      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
        files += found
        labels += [label] * len(found)
    if not files:
        raise PrepError(f"no images under {split_dir}/<class>/ (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return Source("folder", split_dir, split, classes, np.asarray(labels, dtype=np.int64), files)


def _load_cifar(folder: Path, split: str) -> Source:
    if split not in CIFAR_SPLITS:
        raise PrepError(f"CIFAR-10 split {split!r} is not one of {CIFAR_SPLITS}")
    # The reader of the built-in loader: same arrays, same labels, and its unpickler refuses code.
    from advft.data.datasets import CIFAR10, DataError

    try:
        ds = CIFAR10(folder, split)
    except DataError as e:
        raise PrepError(str(e)) from e
    return Source("cifar10", folder, split, list(ds.classes), ds.labels.astype(np.int64), [], ds.images)


def resolve(src: str | os.PathLike, split: str) -> Source:
    """The ``split`` of the dataset at ``src`` (see the module docstring for the layouts)."""
    path = Path(src).expanduser().resolve()
    if not path.exists():
        raise PrepError(f"source {path} does not exist")
    if not path.is_dir():
        raise PrepError(f"source {path} is not a folder; expected an ImageFolder tree or a CIFAR-10 root")
    cifar = _is_cifar_root(path)
    if cifar is not None:
        return _load_cifar(cifar, split)
    if (path / split).is_dir():
        return _scan_folder(path / split, split)
    classes = _class_dirs(path)
    if classes and any(_has_images(path / c) for c in classes):
        return _scan_folder(path, split)
    raise PrepError(
        f"cannot read {path} as a dataset: expected {path}/{split}/<class>/<image>, "
        f"{path}/<class>/<image> or a CIFAR-10 root (cifar-10-batches-py); folders there: {classes or 'none'}"
    )


def subset_indices(n: int, size: int, seed: int) -> np.ndarray:
    """The first ``size`` of a permutation seeded by ``seed``, sorted so the source order is kept."""
    if size < 1:
        raise PrepError(f"--subset must be >= 1, got {size}")
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])
