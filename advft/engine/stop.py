"""Where a run asks whether to stop: at log steps, at start-up and between evaluation chunks.

A requeue signal only sets a flag (launch/stopping.py); the run acts on it at the next poll. Polling only
at log steps would leave a signal that lands during start-up or an evaluation (the final one can take many
minutes) unanswered past the job's grace time, so the job would hit its time limit instead of requeueing.
Every poll is an all-reduce: all ranks poll at the same points and agree on the answer.
"""
from __future__ import annotations

from typing import Callable

import torch

from advft.engine.errors import any_rank

SITES = ("start", "eval", "step")


class StopRequested(Exception):
    """Raised inside an evaluation when a stop was requested: the evaluation is abandoned and repeated
    after the requeue (the engine turns it into :class:`advft.engine.errors.Interrupted`)."""


class StopPoll:
    """``poll(site)``: whether any rank's ``should_stop`` says stop, at ``site`` (one of :data:`SITES`).

    ``should_stop`` is polled at every log step. At start-up and between evaluation chunks it is polled only
    when it declares itself a plain read of a flag (``anywhere = True``, as :class:`launch.stopping.StopFlag`
    does); a callable that counts its calls (tests that stop at the k-th log step) is polled at log steps only.
    """

    def __init__(self, should_stop: Callable[[], bool] | None, device: torch.device) -> None:
        self.should_stop, self.device = should_stop, device
        self.anywhere = should_stop is not None and bool(getattr(should_stop, "anywhere", False))

    def __call__(self, site: str) -> bool:
        if site not in SITES:
            raise ValueError(f"stop poll site {site!r}: one of {', '.join(SITES)}")
        if self.should_stop is None or (site != "step" and not self.anywhere):
            return False
        return any_rank(bool(self.should_stop()), self.device)

    def check(self) -> None:
        """The evaluation's poll between chunks: raises :class:`StopRequested` when a stop was requested."""
        if self("eval"):
            raise StopRequested()
