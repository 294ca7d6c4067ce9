"""Where the images come from: an ImageFolder tree or a CIFAR-10 root, resolved to one ``Source``.

Layouts accepted (SRC is the command-line argument):
- ``SRC/<split>/<class>/<image>`` (the ImageNet train/val layout with the split folder above it),
- ``SRC/<class>/<image>`` (SRC is already the split folder),
- a CIFAR-10 root as torchvision downloads it (``SRC/cifar-10-batches-py/`` or that folder itself);
  splits ``train`` and ``test``.

Labels are the positions of the class folders in sorted order, as torchvision's ImageFolder assigns
them, so a converted dataset has the same labels as the built-in folder loader.

Which files of a folder are samples (links followed but every real folder read once and every real file
counted once; only regular files opened) is ``advft.data.folder_scan``'s rule, the training loaders' too;
what it skips is recorded in ``Source.excluded``, like unreadable images.

``Source.digest`` fingerprints the source as it is now (for folders every listed and excluded path
with its size and mtime; for CIFAR-10 its batch files): an output records it, and a rerun whose
source changed rebuilds instead of trusting the old output.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from advft.data.folder_scan import IMAGE_EXTENSIONS, class_dirs, has_images, scan_split

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
    excluded: list[dict[str, str]] = field(default_factory=list)  # [{path, error}]: never opened
    digest: str = ""

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
            excluded=self.excluded,
            digest=self.digest,
        )


def _is_cifar_root(src: Path) -> Path | None:
    for folder in (src, src / "cifar-10-batches-py"):
        if (folder / "batches.meta").is_file():
            return folder
    return None


def _scan_folder(split_dir: Path, split: str) -> Source:
    scan = scan_split(split_dir)
    if not scan.files:
        raise PrepError(f"no images under {split_dir}/<class>/ (extensions {', '.join(IMAGE_EXTENSIONS)})")
    digest = _digest([f"c\t{c}" for c in scan.classes] + scan.lines)
    return Source("folder", split_dir, split, scan.classes, scan.labels, scan.files, excluded=scan.excluded,
                  digest=digest)


def _digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogateescape")).hexdigest()


def _load_cifar(folder: Path, split: str) -> Source:
    if split not in CIFAR_SPLITS:
        raise PrepError(f"CIFAR-10 split {split!r} is not one of {CIFAR_SPLITS}")
    # The reader of the built-in loader: same arrays, same labels, and its unpickler refuses code.
    from advft.data.datasets import CIFAR10, DataError

    try:
        ds = CIFAR10(folder, split)
    except DataError as e:
        raise PrepError(str(e)) from e
    stats = [(f.name, f.stat()) for f in sorted(folder.iterdir()) if f.is_file()]
    digest = _digest([f"{name}\t{st.st_size}\t{st.st_mtime_ns}" for name, st in stats])
    return Source("cifar10", folder, split, list(ds.classes), ds.labels.astype(np.int64), [], ds.images,
                  digest=digest)


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
    classes = class_dirs(path)
    if classes and any(has_images(path / c) for c in classes):
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
