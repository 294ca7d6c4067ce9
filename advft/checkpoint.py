"""Atomic, checksummed, self-pruning checkpoints in ``<run>/checkpoints/``.

Layout: ``step_00001000.pt`` plus ``step_00001000.pt.sha256``. A save writes both to temporary names,
fsyncs, renames the checksum first and the data file last, so a checkpoint is *complete* exactly when its
data file exists and its checksum matches. A crash at any moment (even SIGKILL mid-write) leaves either
the previous state or the new complete one; a truncated or bit-flipped file is detected by the checksum
and skipped with a warning for the previous one. Loading always uses ``weights_only=True``.
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions): the previous ones are intact."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def ckpt_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint data file, newest first (validity not checked)."""
    d = ckpt_dir(run_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), d / n) for n in os.listdir(d) if (m := _NAME.match(n))]
    return sorted(found, reverse=True)


def save(run_dir: str | os.PathLike, step: int, state: dict[str, Any], keep_last: int = 3) -> Path:
    """Write ``state`` as the checkpoint of ``step`` atomically; prune to the newest ``keep_last``.

    Raises :class:`CheckpointError` (e.g. ENOSPC) after removing its temporary files; the previous
    checkpoints are untouched in that case.
    """
    d = ckpt_dir(run_dir)
    final = d / f"step_{step:08d}.pt"
    tmp = d / f".{final.name}.{os.getpid()}.tmp"
    tmp_sum = d / f".{final.name}.sha256.{os.getpid()}.tmp"
    sink = None
    try:
        d.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            sink = _ErrorKeepingWriter(f)
            torch.save(state, sink)
            f.flush()
            os.fsync(f.fileno())
        digest = _sha256(tmp)
        with open(tmp_sum, "w") as f:
            f.write(digest + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_sum, d / (final.name + ".sha256"))
        os.replace(tmp, final)
        _fsync_dir(d)
    except (OSError, RuntimeError) as e:
        # torch.save turns the OSError of a failed write into an opaque "unexpected pos" RuntimeError: report
        # the OSError it swallowed ("[Errno 28] No space left on device") when there is one
        cause = (sink.error if sink is not None else None) or e
        for p in (tmp, tmp_sum):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        raise CheckpointError(f"could not write checkpoint {final}: {cause}; the previous checkpoints are intact") from None
    prune(run_dir, keep_last)
    return final


class _ErrorKeepingWriter:
    """The file torch.save writes to, keeping the OSError of a failed write for the error message."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def prune(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` checkpoints, and stale temporary files."""
    d = ckpt_dir(run_dir)
    for _, p in list_checkpoints(run_dir)[keep_last:]:
        for q in (p, p.with_name(p.name + ".sha256")):
            try:
                q.unlink()
            except FileNotFoundError:
                pass
    for n in os.listdir(d):  # temporaries of a process that died mid-write; not ours (ours are renamed)
        if n.startswith(".") and n.endswith(".tmp") and f".{os.getpid()}." not in n:
            try:
                (d / n).unlink()
            except FileNotFoundError:
                pass


def verify(path: Path) -> str | None:
    """None when the checkpoint is complete and its checksum matches, else the reason it is not."""
    sum_file = path.with_name(path.name + ".sha256")
    if not sum_file.is_file():
        return "no checksum file (write not completed)"
    expected = sum_file.read_text().strip()
    actual = _sha256(path)
    if actual != expected:
        return f"checksum mismatch (file damaged: expected {expected[:12]}..., got {actual[:12]}...)"
    return None


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """torch.load with weights_only=True (argparse.Namespace allowed, nothing else)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_latest(run_dir: str | os.PathLike) -> tuple[int, dict[str, Any]] | None:
    """Newest complete checkpoint of the run as (step, state), skipping damaged ones with a warning."""
    for step, path in list_checkpoints(run_dir):
        problem = verify(path)
        if problem is None:
            try:
                return step, load_file(path)
            except Exception as e:  # noqa: BLE001 - any unreadable file is skipped, never a crash on load
                problem = f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        log.warning("skipping checkpoint %s: %s; trying the previous one", path, problem)
    return None


# ---- RNG state, in a form weights_only=True can load (tensors, ints, lists) ----

def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _py_state_to_list(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def _py_state_to_list(s: tuple) -> list:
    version, internal, gauss = s
    return [version, list(internal), gauss]
