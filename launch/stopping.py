"""Stop requests for a running engine run (fine-tuning or pretraining): signals and a file that only raise a flag.

The engine polls the flag at log steps, at start-up and between evaluation chunks (``advft.engine.stop``), so a run
stops at a step boundary on which all ranks agree, after a checkpoint, and never in the middle of a step or a collective.
"""
from __future__ import annotations

import os
import signal
from types import FrameType


class StopFlag:
    """Callable flag: True once one of the installed signals arrived or the stop file exists."""

    anywhere = True  # a plain read: the engine may poll it at start-up and inside evaluations too

    def __init__(self, stop_file: str | os.PathLike | None = None) -> None:
        self.received: list[int] = []
        self.stop_file = stop_file

    def handler(self, signum: int, frame: FrameType | None) -> None:
        # no logging here: a handler may run while the interrupted code holds the logging lock
        self.received.append(signum)

    def install(self, signums: list[int]) -> dict[int, object]:
        """Route these signals to the flag; returns the previous handlers (to restore or call later)."""
        return {s: signal.signal(s, self.handler) for s in signums}

    def __call__(self) -> bool:
        return bool(self.received) or (bool(self.stop_file) and os.path.exists(self.stop_file))


def parse_signals(text: str) -> list[int]:
    """``"TERM,USR1"`` -> [SIGTERM, SIGUSR1]; ValueError naming the bad entry."""
    out = []
    for name in filter(None, (t.strip().upper() for t in text.split(","))):
        sig = getattr(signal, name if name.startswith("SIG") else "SIG" + name, None)
        if not isinstance(sig, signal.Signals) or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ValueError(f"{name!r} is not a signal that can be caught (e.g. TERM, USR1, USR2, INT)")
        out.append(sig)
    return out
