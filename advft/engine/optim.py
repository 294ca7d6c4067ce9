"""The optimizer both tasks start from."""
from __future__ import annotations

import torch


def adamw(params, *, lr: float, betas: tuple[float, float], weight_decay: float, fused: bool,
          device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where this device has one (the plain one otherwise)."""
    fused = fused and device.type in ("cuda", "cpu")
    try:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)
    except (RuntimeError, TypeError):  # fused kernel unavailable for this device/dtype
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
