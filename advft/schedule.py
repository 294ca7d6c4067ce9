"""Learning-rate schedule: linear warmup, then cosine decay. A pure function of the step.

Being stateless, the schedule needs nothing in a checkpoint but the step, so a resumed run gets exactly
the same learning rates as an uninterrupted one.
"""
from __future__ import annotations

import math


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based).

    Warmup: ``(step + 1) / warmup_steps`` for step < warmup_steps, so the first update is not wasted and
    the last warmup step reaches the peak. Then cosine from 1 at ``warmup_steps`` to ``min_ratio`` at
    ``total_steps`` (and ``min_ratio`` beyond it).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    t = min((step - warmup_steps) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
