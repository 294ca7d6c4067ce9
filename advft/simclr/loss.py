"""NT-Xent on the global batch: the loss of two views, and a differentiable gather of every rank's rows.

The loss is computed on the gathered global batch by every rank: the gather's backward sums the gradients
of all ranks and DDP averages, which together give exactly the gradient of the global loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def nt_xent_logits(z1: Tensor, z2: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(2N, 2N) cosine-similarity logits with the diagonal at -inf, and each row's positive column."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = (z @ z.t()) / temperature
    # An anchor is never its own negative: -inf drops it from the softmax denominator.
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    idx = torch.arange(n, device=z.device)
    return logits, torch.cat([idx + n, idx])


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """NT-Xent (normalized temperature-scaled cross entropy) of two views of N images, a scalar.

    ``z1``, ``z2``: (N, D); row i of each is one view of image i, so (z1[i], z2[i]) is a positive pair.
    Rows are L2-normalised here. Each of the 2N rows is an anchor a with similarity s(a, b) = cos / T to
    every other row; its positive is its pair, its 2N - 2 negatives are all other rows (never itself):
    loss_a = -log( exp s(a, pos) / sum_{b != a} exp s(a, b) ). Returned: the mean over the 2N anchors,
    computed in fp32 whatever the input dtype.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent expects two (N, D) tensors of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    logits, targets = nt_xent_logits(z1, z2, temperature)
    return F.cross_entropy(logits, targets)


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 (rank order) whose backward sums every rank's gradient of this rank's rows.

    Written here rather than taken from torch.distributed.nn (deprecated) or _functional_collectives (private,
    renamed between releases); the backward is an all-reduce then a slice, tiny for (2B, proj_dim) tensors.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # sum: each rank's loss depends on every rank's rows
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_views(z1: Tensor, z2: Tensor) -> tuple[Tensor, Tensor]:
    """The projections of all ranks in rank order (the global batch), differentiable; identity on one process.

    The backward sums every rank's gradient for this rank's rows, so a loss computed identically on every
    rank, followed by DDP's gradient averaging, gives exactly the gradient of that one global loss.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z1, z2
    both = _GatherRows.apply(torch.stack([z1, z2], dim=1))  # one collective for both views: (G, 2, D)
    return both[:, 0], both[:, 1]
