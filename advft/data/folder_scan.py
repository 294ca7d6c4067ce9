"""Which files of an ImageFolder split folder (``<split>/<class>/<image>``) are samples: one rule for
``python -m data_prep`` and the training loaders (the folder dataset, DALI reading a folder).

Classes are the sorted subfolders whose names do not start with "."; a label is its class's position, as
torchvision's ImageFolder assigns them. Images are the files with an extension PIL decodes, also nested
below the class folder, in walk order with sorted names.

Links: symbolic links are followed (a class folder or an image may be a link, as in subsets built from
links into a full copy), but every real folder is read once and every real file counted once: a link back
up the tree, or a second link to a folder or file already read, is skipped and recorded in ``excluded``.
Only regular files are images: a FIFO, socket or device named ``x.jpg`` and a dangling link are never
opened, only recorded there.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Extensions PIL decodes (torchvision's list); anything else in a class folder is ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class FolderScan:
    """A scanned split folder: ``files[i]`` is sample i's path relative to it (POSIX separators),
    ``labels[i]`` indexes ``classes``; ``excluded`` lists ``{path, error}`` never opened; ``lines``
    names every listed and excluded path with its size and mtime (what a fingerprint of the source covers)."""

    classes: list[str]
    files: list[str]
    labels: np.ndarray
    excluded: list[dict[str, str]]
    lines: list[str]


def class_dirs(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def has_images(folder: Path) -> bool:
    return any(e.is_file() and is_image_name(e.name) for e in os.scandir(folder))


def _file_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class _Walk:
    """One pass over the class folders of a split, remembering every real folder and file seen."""

    def __init__(self, split_dir: Path, classes: list[str]) -> None:
        self.split_dir = split_dir
        # Each class root belongs to its class: a link into another class is not read twice.
        self.seen_dirs = {_file_id(os.stat(split_dir)): "the split folder",
                          **{_file_id(os.stat(split_dir / c)): c for c in classes}}
        self.seen_files: dict[tuple[int, int], str] = {}
        self.excluded: list[dict[str, str]] = []
        self.lines: list[str] = []

    def _exclude(self, rel: str, why: str) -> None:
        self.excluded.append({"path": rel, "error": why})
        self.lines.append(f"x\t{rel}\t{why}")

    def files_of(self, name: str) -> list[str]:
        found: list[str] = []
        # Walk below the class folder too: some trees nest images one level deeper.
        for dirpath, dirnames, filenames in os.walk(self.split_dir / name, followlinks=True):
            rel = Path(dirpath).relative_to(self.split_dir).as_posix()
            keep = []
            for d in sorted(dirnames):
                try:
                    st = os.stat(os.path.join(dirpath, d))
                except OSError:
                    continue  # vanished since the listing
                first = self.seen_dirs.setdefault(_file_id(st), f"{rel}/{d}")
                if first == f"{rel}/{d}":
                    keep.append(d)
                elif not d.startswith("."):
                    self._exclude(f"{rel}/{d}", f"folder already read as {first} (a link); read once")
            dirnames[:] = keep
            for f in sorted(filenames):
                if is_image_name(f):
                    found += self._regular_file(f"{rel}/{f}")
        return found

    def _regular_file(self, rel: str) -> list[str]:
        try:
            st = os.stat(self.split_dir / rel)
        except OSError as e:
            self._exclude(rel, f"cannot be read: {e.strerror} (a dangling link?)")
            return []
        if not stat.S_ISREG(st.st_mode):
            self._exclude(rel, "not a regular file (FIFO, socket or device); never opened")
            return []
        first = self.seen_files.setdefault(_file_id(st), rel)
        if first != rel:
            self._exclude(rel, f"same file as {first} (a link); counted once")
            return []
        self.lines.append(f"f\t{rel}\t{st.st_size}\t{st.st_mtime_ns}")
        return [rel]


def scan_split(split_dir: Path) -> FolderScan:
    """The samples of ``split_dir`` by the rule above; ``files`` is empty when it holds no image."""
    split_dir = Path(split_dir)
    classes = class_dirs(split_dir)
    walk = _Walk(split_dir, classes)
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = walk.files_of(name)
        files += found
        labels += [label] * len(found)
    return FolderScan(classes, files, np.asarray(labels, dtype=np.int64), walk.excluded, walk.lines)
