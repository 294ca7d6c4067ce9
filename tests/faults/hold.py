"""Make the moment happen: a run that waits at a chosen point until the test has acted.

A test that signals, requeues, preempts or kills a run must not bet that the run is still at work when
its action lands: machines differ several-fold in speed, and a short run may finish first. With
``ADVFT_TEST_HOLD`` in a run's environment (see :func:`environment`), the first ``starts`` processes of
the run that reach their ``poll``-th stop-request poll at site ``at`` (``advft.engine.stop.SITES``: "step",
the log steps, by default; "start"; "eval", between evaluation chunks; rank 0 only: the other ranks wait for
it in the all-reduce of the poll) stop there and wait:

- ``"stop"``: until the stop request has come (a signal or the stop file; the run then stops at that
  step boundary);
- a signal name (``"USR2"``): until that signal has come (a test that sends SIGTERM then USR2 needs both
  to have arrived before the run decides how to stop);
- ``"release"``: until the test creates ``<dir>/release-<i>`` (or a stop request comes).

``until`` may be a list, one entry per hold (the last one repeats).

Hold ``i`` (0, 1, ... in the order the holds are reached) first creates ``<dir>/hold-<i>``: the moment a
test waits for (:func:`wait_held`) before it acts. A hold that waits past ``deadline_s`` fails the run
loudly, naming the variable. The patch reaches every python of the run through
``tests/faults/site/sitecustomize.py`` on PYTHONPATH (submitit jobs, ``launch/train.py`` under srun and
``accelerate launch``), so the library carries no test hook; the polls and the stop are the real ones.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

ENV = "ADVFT_TEST_HOLD"
SITE = Path(__file__).resolve().parent / "site"
DEADLINE_S = 600.0  # far beyond any wait a working test has; only a broken one reaches it


def environment(folder: Path, *, starts: int = 1, poll: int = 1, until: str | list[str] = "stop", at: str = "step",
                deadline_s: float = DEADLINE_S, base: dict[str, str] | None = None) -> dict[str, str]:
    """The variables that arm the hold in every python started with them (merged into ``base``, default
    this process's environment): ADVFT_TEST_HOLD and PYTHONPATH with the sitecustomize folder first."""
    until = [until] if isinstance(until, str) else list(until)
    for u in until:
        if u not in ("stop", "release") and _signal(u) is None:
            raise ValueError(f"until = {u!r}: 'stop', 'release' or a signal name such as 'USR2'")
    if at not in ("step", "start", "eval"):
        raise ValueError(f"at = {at!r}: 'step', 'start' or 'eval'")
    folder.mkdir(parents=True, exist_ok=True)
    base = dict(os.environ if base is None else base)
    spec = {"dir": str(folder), "starts": starts, "poll": poll, "until": until, "at": at, "deadline_s": deadline_s}
    path = os.pathsep.join(p for p in (str(SITE), base.get("PYTHONPATH", "")) if p)
    return {ENV: json.dumps(spec), "PYTHONPATH": path}


def wait_held(folder: Path, i: int = 0, timeout_s: float = DEADLINE_S,
              alive: Callable[[], bool] | None = None) -> None:
    """Wait until hold ``i`` is reached (the run waits there now); fail when ``alive`` says the run ended."""
    import conftest

    marker = folder / f"hold-{i}"

    def probe() -> bool:
        if alive is not None and not marker.exists() and not alive():
            raise AssertionError(f"the run ended before it reached hold {i} ({marker})")
        return marker.exists()

    conftest.wait_for(probe, f"the run to reach hold {i} ({marker})", timeout_s, poll_s=0.05)


def release(folder: Path, i: int = 0) -> None:
    (folder / f"release-{i}").touch()


class _Hold:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.dir = Path(spec["dir"])
        self.starts, self.poll, self.until = int(spec["starts"]), int(spec["poll"]), list(spec["until"])
        self.at = spec.get("at", "step")
        self.deadline_s = float(spec["deadline_s"])
        self.polls = 0

    def _claim(self) -> int | None:
        """The first free hold index of this run, taken atomically (several starts, one process each)."""
        for i in range(self.starts):
            try:
                fd = os.open(self.dir / f"hold-{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.write(fd, f"pid {os.getpid()} at poll {self.poll}\n".encode())
            os.close(fd)
            return i
        return None

    def __call__(self, flag: Any, peek: Callable[[], bool], poll: Callable[[], bool]) -> bool:
        """``poll()`` is the engine's own poll (an all-reduce), ``peek()`` this rank's flag alone; ``flag`` the
        StopFlag (its ``received`` signals)."""
        self.polls += 1
        if self.polls != self.poll or os.environ.get("RANK", "0") != "0":
            return poll()
        i = self._claim()
        if i is None:
            return poll()
        until = self.until[min(i, len(self.until) - 1)]
        released = self.dir / f"release-{i}"
        sig = None if until in ("stop", "release") else _signal(until)

        def done() -> bool:
            if sig is not None:
                return sig in flag.received
            return peek() or (until == "release" and released.exists())

        deadline = time.monotonic() + self.deadline_s
        while not done():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{ENV}: hold {i} waited {self.deadline_s:.0f} s for the test ({until}); "
                                   f"the test never acted")
            time.sleep(0.05)
        return poll()


def arm() -> None:
    """Patch this process's stop polls with the hold of ``$ADVFT_TEST_HOLD`` (called by sitecustomize)."""
    from advft.engine.stop import StopPoll

    hold = _Hold(json.loads(os.environ[ENV]))
    poll = StopPoll.__call__

    def held(self: StopPoll, site: str) -> bool:
        flag = self.should_stop
        if site != hold.at or flag is None or (site != "step" and not self.anywhere):
            return poll(self, site)
        return hold(flag, lambda: bool(flag()), lambda: poll(self, site))

    StopPoll.__call__ = held


def _signal(name: str) -> int | None:
    import signal

    sig = getattr(signal, "SIG" + name.upper().removeprefix("SIG"), None)
    return sig if isinstance(sig, signal.Signals) else None
