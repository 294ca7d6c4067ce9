"""Per-step randomness as a pure function of (seed, step, stream): a resumed run draws what an
uninterrupted one draws, and N ranks draw what one process draws."""
from __future__ import annotations

import torch

ATTACK_STREAM = 0  # fine-tuning's attack start noise
AUGMENT_STREAM = 1  # pretraining's augmentations
EVAL_STREAM = 2  # the evaluation attack's start noise, per test batch


def step_generator(seed: int, step: int, device: torch.device, stream: int = 0) -> torch.Generator:
    """A generator for one step's randomness, a pure function of (seed, step, stream)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7919 + stream * 104_729) % (2**63 - 1))
    return g

