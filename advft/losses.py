"""FARE loss: keep the adversarial (and, weighted by alpha, the clean) embedding at the frozen original.

    L = ||phi(z) - phi_org(x)||^2 + alpha * ||phi(x) - phi_org(x)||^2

Convention: squared L2 **summed over the embedding dimension**, then averaged over the batch (FARE's);
``reduction="mean"`` averages over the dimension too (what the report's code did), i.e. divides by D.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def squared_distance(a: Tensor, b: Tensor, reduction: str = "sum") -> Tensor:
    """Per-sample squared L2 distance (B,), in fp32: summed (``"sum"``) or averaged (``"mean"``) over dim 1."""
    d = (a.float() - b.float()).pow(2).flatten(1)
    if reduction == "sum":
        return d.sum(1)
    if reduction == "mean":
        return d.mean(1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def fare_loss(encoder: Callable[[Tensor], Tensor], z: Tensor, x: Tensor, target: Tensor, alpha: float,
              reduction: str = "sum") -> dict[str, Tensor]:
    """FARE + clean-consistency loss for one batch.

    ``encoder`` is the trainable phi (possibly DDP-wrapped), ``z`` the adversarial batch, ``x`` the clean
    batch, ``target`` = phi_org(x) (detached). When ``alpha > 0`` the adversarial and clean batches go
    through the encoder as ONE concatenated forward (one kernel launch sequence, and with BN in train mode
    one set of batch statistics); when ``alpha == 0`` the clean forward is skipped entirely.

    Returns detached metrics beside the differentiable ``loss``: ``adv_loss``, ``clean_loss`` (absent when
    alpha == 0), and cosine similarities ``adv_cos`` / ``clean_cos`` to the target.
    """
    b = x.shape[0]
    if alpha > 0:
        out = encoder(torch.cat([z, x], 0))
        adv, clean = out[:b], out[b:]
    else:
        adv, clean = encoder(z), None
    adv_per = squared_distance(adv, target, reduction)
    adv_loss = adv_per.mean()
    metrics: dict[str, Tensor] = {
        "adv_loss": adv_loss.detach(),
        "adv_cos": torch.cosine_similarity(adv.detach().float(), target.float(), dim=1).mean(),
    }
    loss = adv_loss
    if clean is not None:
        clean_loss = squared_distance(clean, target, reduction).mean()
        loss = loss + alpha * clean_loss
        metrics["clean_loss"] = clean_loss.detach()
        metrics["clean_cos"] = torch.cosine_similarity(clean.detach().float(), target.float(), dim=1).mean()
    metrics["loss"] = loss
    return metrics
