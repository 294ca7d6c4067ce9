"""How a run ends early: a stop request honoured at a step boundary, or a non-finite loss."""
from __future__ import annotations

import torch


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the run stops and its last good checkpoint stays."""

    def __init__(self, step: int):
        super().__init__(f"non-finite loss at step {step}; stopped without saving; the last good checkpoint "
                         f"is kept and a rerun resumes from it")
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
