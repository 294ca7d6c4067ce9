"""Stopping cleanly: signals in the main process, and worker processes that never outlive it.

SIGINT (Ctrl-C) and SIGTERM raise ``Interrupted`` in the main process, so its ``finally`` blocks stop
the workers and remove temporary files and shared memory before it exits with one line. Workers
(image check, FFCV writer, shard writers) are forked: they ignore SIGINT (a terminal sends it to the
whole process group; the main process decides), die silently on SIGTERM (how a pool is stopped),
and are killed by the kernel when their parent dies, even by SIGKILL (Linux ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

_PR_SET_PDEATHSIG = 1


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; a BaseException so that no ``except Exception`` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``Interrupted`` inside the block (main thread only)."""
    old = {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def worker_init() -> None:
    """First call in every forked worker (see the module docstring)."""
    parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if sys.platform.startswith("linux"):
        # The signal fires when the thread that forked us ends; the pools fork from long-lived threads.
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill()
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"
