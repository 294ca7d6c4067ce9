"""Output files: atomic writes, JSON sidecars, and the "already done" check that makes runs idempotent.

A sidecar ``<name>.json`` sits next to every output. It is written last, after the data files were
renamed into place, with ``"complete": true``; an output counts as done only when its sidecar says
so, its settings equal the requested ones, and the files it lists still have their recorded sizes.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any


def tmp_name(path: Path) -> Path:
    """A temporary sibling of ``path``: same folder (so the rename is atomic), unique per process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_text_atomic(path: Path, text: str) -> None:
    tmp = tmp_name(path)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at ``path``, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def file_sizes(paths: list[Path], base: Path) -> dict[str, int]:
    """{path relative to ``base``: size in bytes}, the record ``is_done`` checks."""
    return {p.relative_to(base).as_posix(): p.stat().st_size for p in paths}


def is_done(sidecar: Path, settings: dict[str, Any]) -> bool:
    """True when ``sidecar`` records a complete output made with ``settings`` whose files are intact."""
    meta = read_json(sidecar)
    if not meta or not meta.get("complete") or meta.get("settings") != settings:
        return False
    folder = sidecar.parent
    sizes: dict[str, int] = meta.get("files", {})
    return bool(sizes) and all(
        (folder / rel).is_file() and (folder / rel).stat().st_size == size for rel, size in sizes.items()
    )


def provenance() -> dict[str, Any]:
    """Host, time and installed versions of the packages that shape the output, for the sidecar."""
    # Distribution metadata, not module attributes: ffcv 1.0.2 reports a stale __version__.
    versions: dict[str, str] = {"python": platform.python_version()}
    for dist in ("numpy", "pillow", "ffcv", "opencv-python", "nvidia-dali-cuda120", "nvidia-dali-cuda130"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {"host": socket.gethostname(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions}
