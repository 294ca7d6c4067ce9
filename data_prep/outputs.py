"""Output files: atomic writes, JSON sidecars, and the "already done" check that makes runs idempotent.

A sidecar ``<name>.json`` sits next to every output. It is written last, after the data files were
renamed into place (and read back, with ``--verify``), with ``"complete": true``; an output counts
as done only when its sidecar says so, its settings equal the requested ones, it was made from the
source as it is now (``Source.digest``), and the files it lists still have their recorded sizes.
The sidecar also records each file's SHA-256, which ``--verify`` checks on every run.

Temporary files are named ``.<name>.tmp-<host>-<pid>``; a run removes those of writers on this host
whose process is gone (killed, or a machine that rebooted), and never those of live writers or of
other hosts sharing the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from data_prep.processes import pid_alive
from data_prep.sources import PrepError

log = logging.getLogger("data_prep")
_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_TMP = re.compile(r"^\..+\.tmp-(?P<host>[A-Za-z0-9_.]+)-(?P<pid>\d+)$")


def tmp_name(path: Path) -> Path:
    """A temporary sibling of ``path``: same folder (so the rename is atomic), unique per process."""
    return path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}")


def remove_dead_tmp(folder: Path) -> list[str]:
    """Deletes the temporary files in ``folder`` left by dead writers of this host; returns their names."""
    removed = []
    if not folder.is_dir():
        return removed
    for entry in os.scandir(folder):
        m = _TMP.match(entry.name)
        if m and m["host"] == _HOST and not pid_alive(int(m["pid"])) and not entry.is_dir(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):  # another cleaner was first
                os.unlink(entry.path)
                removed.append(entry.name)
    if removed:
        log.info("removed %d temporary file(s) of dead writers in %s: %s", len(removed), folder, ", ".join(removed))
    return removed


def write_text_atomic(path: Path, text: str) -> None:
    tmp = tmp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def file_digests(paths: list[Path], base: Path) -> dict[str, str]:
    """{path relative to ``base``: SHA-256}, what ``check_digests`` compares."""
    return {p.relative_to(base).as_posix(): sha256_of(p) for p in paths}


def check_digests(sidecar: Path) -> None:
    """Raises PrepError when a file listed in ``sidecar`` no longer has its recorded SHA-256, after
    removing the sidecar (so the output no longer counts as done and the next run rebuilds it)."""
    meta = read_json(sidecar) or {}
    digests: dict[str, str] = meta.get("sha256") or {}
    if not digests:
        sidecar.unlink(missing_ok=True)
        raise PrepError(f"{sidecar} recorded no checksums (an older data_prep); run again to rebuild the output")
    for rel, digest in digests.items():
        if sha256_of(sidecar.parent / rel) != digest:
            sidecar.unlink(missing_ok=True)
            raise PrepError(f"{sidecar.parent / rel} differs from the file that was written (SHA-256 in {sidecar}); "
                            "it was damaged since; run again to rebuild it")


def is_done(sidecar: Path, settings: dict[str, Any], source_digest: str) -> bool:
    """True when ``sidecar`` records a complete output made with ``settings`` from the source as it is
    now (``source_digest``) whose files still have their sizes."""
    meta = read_json(sidecar)
    if not meta or not meta.get("complete") or meta.get("settings") != settings:
        return False
    if meta.get("source_digest") != source_digest:
        log.info("the source changed since %s was written (files added, removed or modified): rebuilding", sidecar)
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


def check_writable(target: Path, *, folders: tuple[Path, ...] = (), files: tuple[Path, ...] = ()) -> None:
    """Raises PrepError unless folder ``target`` exists or can be made and a file can be created in it,
    ``folders`` are folders where they exist and ``files`` are not folders. Creates nothing."""
    for f in files:
        if f.is_dir():
            raise PrepError(f"output {f} is an existing folder; remove it or choose another output")
    for d in folders:
        if d.exists() and not d.is_dir():
            raise PrepError(f"output folder {d} exists and is not a folder; remove it or choose another output")
    probe = target
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise PrepError(f"cannot create the output folder {target}: {probe} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(dir=probe, prefix=".data_prep-write-test-")
    except OSError as e:
        where = "" if probe == target else f" (its nearest existing parent {probe})"
        raise PrepError(f"cannot write to the output folder {target}{where}: {e.strerror}") from e
    os.close(fd)
    os.unlink(name)
