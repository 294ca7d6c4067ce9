"""How a run ends early: a stop request honoured at a step boundary, or a non-finite loss."""
from __future__ import annotations

import torch


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the run stops and its last good checkpoint stays."""

    def __init__(self, step: int, last_good: int | None = -1):
        """``last_good``: the step of the newest checkpoint (None: none was written; -1: not known)."""
        if last_good is None:
            after = ("no checkpoint was written before it, so there is nothing to resume from: a rerun starts "
                     "over; look for non-finite values in model.checkpoint or the data, or lower optim.lr")
        elif last_good < 0:
            after = "the last good checkpoint is kept and a rerun resumes from it"
        else:
            after = f"the last good checkpoint (step {last_good}) is kept and a rerun resumes from it"
        super().__init__(f"non-finite loss at step {step}; stopped without saving; {after}")
        self.step = step


class Interrupted(RuntimeError):
    """The run checkpointed at a step boundary because a stop was requested (requeue signal)."""

    def __init__(self, step: int):
        super().__init__(f"stopped at step {step} on request; checkpoint written, resume by rerunning")
        self.step = step


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on any rank (ranks must agree on the step they stop at)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)
