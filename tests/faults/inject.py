#!/usr/bin/env python
"""``launch/train.py`` with a fault armed for THIS process only: the fault suite's subprocess driver.

    python tests/faults/inject.py [--sweep] [--nan-at STEP [--nan-in TEXT]] [--pause-ckpt STEP:SECONDS]
                                  [--enospc-ckpt STEP] -- ARGS

ARGS are launch/train.py's own arguments (with --sweep: launch/sweep.py's; use ``--cluster debug`` so the
runs execute in this process, where the fault is armed); its ``main`` runs unchanged, with one of these armed:

--nan-at STEP         a transient device fault: the loss of global step STEP (0-based, as in
                      ``run.fail_at_step``) is made non-finite through the engine's own injection point, but
                      the run's config (and so its hash and folder) stays the one the user gave. A rerun
                      without the flag is the same run, as after a flaky GPU. With --nan-in TEXT only runs
                      whose run.name contains TEXT are hit (one run of a sweep).
--pause-ckpt S:SECS   the save of the checkpoint of step S pauses SECS seconds twice inside its write window:
                      once with the temporary data file complete and no checksum yet, once with the checksum
                      renamed into place and the data file not yet. A test SIGKILLs the process there.
--enospc-ckpt STEP    the write of the checkpoint of STEP fails half-way with ENOSPC (a full disk where no
                      small filesystem can be mounted).

Each fault is armed by patching this process only, here, so the library carries no test hooks; the code
paths that meet the fault (the non-finite check, the atomic save, the error messages) are the real ones.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]


def transient_nan(fare_step: Callable[..., Any], at_step: int, when: Callable[[Any], bool] = lambda cfg: True):
    """``fare_step`` whose call for global step ``at_step`` runs with ``run.fail_at_step = at_step`` (for configs
    where ``when(cfg)``): the loss turns NaN there, exactly as the engine's injection point does it."""
    from advft import config as C

    def faulty(m, opt, x, y, step, cfg, **kw):
        if step == at_step and when(cfg):
            cfg = C.replace(cfg, **{"run.fail_at_step": at_step})
        return fare_step(m, opt, x, y, step, cfg, **kw)

    return faulty


def ckpt_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def pause_checkpoint(step: int, seconds: float) -> None:
    import advft.checkpoint as K

    name = ckpt_name(step)
    sha256 = K._sha256

    def slow_sha256(path: Path) -> str:
        if path.name.startswith(f".{name}.") and path.name.endswith(".tmp"):
            time.sleep(seconds)  # window 1: temporary data file written and fsynced, no checksum yet
        return sha256(path)

    class SlowReplaceOs:
        """``os`` for advft.checkpoint only, pausing right after the checksum's rename."""

        def __getattr__(self, attr: str) -> Any:
            return getattr(os, attr)

        @staticmethod
        def replace(src: Any, dst: Any) -> None:
            os.replace(src, dst)
            if Path(dst).name == name + ".sha256":
                time.sleep(seconds)  # window 2: checksum in place, data file not renamed yet

    K._sha256 = slow_sha256
    K.os = SlowReplaceOs()


def enospc_checkpoint(step: int) -> None:
    import advft.checkpoint as K

    name = ckpt_name(step)

    class FullDiskFile:
        """A file that accepts 64 KiB, then fails every write as a full disk does."""

        def __init__(self, f: Any) -> None:
            self.f, self.room = f, 64 * 1024

        def write(self, data: Any) -> int:
            n = len(memoryview(data))
            if n > self.room:
                self.f.write(memoryview(data)[: self.room])
                self.room = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= n
            return self.f.write(data)

        def __getattr__(self, attr: str) -> Any:
            return getattr(self.f, attr)

        def __enter__(self) -> "FullDiskFile":
            return self

        def __exit__(self, *exc: Any) -> None:
            self.f.close()

    def full_open(path: Any, mode: str = "r", *args: Any, **kw: Any) -> Any:
        f = open(path, mode, *args, **kw)
        return FullDiskFile(f) if Path(path).name.startswith(f".{name}.") and "w" in mode else f

    K.open = full_open  # module global shadows the builtin inside advft.checkpoint only


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tests/faults/inject.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--nan-at", type=int)
    p.add_argument("--nan-in", default="")
    p.add_argument("--pause-ckpt", metavar="STEP:SECONDS")
    p.add_argument("--enospc-ckpt", type=int)
    p.add_argument("train_args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    rest = a.train_args[1:] if a.train_args[:1] == ["--"] else a.train_args
    sys.path.insert(0, str(ROOT))
    if a.nan_at is not None:
        import advft.train as T

        T.fare_step = transient_nan(T.fare_step, a.nan_at, lambda cfg: a.nan_in in cfg.run.name)
    if a.pause_ckpt:
        step, _, seconds = a.pause_ckpt.partition(":")
        pause_checkpoint(int(step), float(seconds))
    if a.enospc_ckpt is not None:
        enospc_checkpoint(a.enospc_ckpt)
    if a.sweep:
        from launch.sweep import main as sweep_main

        sys.argv = [str(ROOT / "launch" / "sweep.py"), *rest]
        return sweep_main(rest)
    from launch.train import main as train_main

    sys.argv = [str(ROOT / "launch" / "train.py"), *rest]
    return train_main(rest)


if __name__ == "__main__":
    sys.exit(main())
