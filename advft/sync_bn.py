"""Synchronised BatchNorm for the training forward: N ranks normalise with the statistics of the GLOBAL batch,
as one process with that batch would.

On CUDA this is torch's ``nn.SyncBatchNorm``. torch's layer refuses CPU tensors, so on CPU (gloo) ranks
:class:`GlobalBatchNorm` all-reduces the batch statistics through ``torch.distributed.nn.functional``,
whose all-reduce has a backward: the gradient flows through the other ranks' statistics as through one
process's. In eval mode both layers are plain BatchNorm over the running statistics (the attack and the
evaluation never synchronise), and both keep BatchNorm's parameter and buffer names, so a converted
encoder's state dict loads into a plain one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def _all_reduce(t: Tensor) -> Tensor:
    from torch.distributed.nn.functional import all_reduce  # differentiable; imported where it is needed

    return all_reduce(t, op=dist.ReduceOp.SUM)


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm whose train-mode mean and variance are those of the batch summed over all ranks.

    Two all-reduces per layer: (sum, count), then the sum of squared deviations from the global mean (two
    passes rather than E[x^2] - E[x]^2, which cancels in fp32). Statistics in fp32 (fp64 for fp64 input).
    """

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {x.dim()}D")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return super().forward(x)
        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        count = torch.tensor([x.numel() // c], dtype=xf.dtype, device=x.device)
        total = _all_reduce(torch.cat([xf.sum(dims), count]))
        n = total[c]
        mean = total[:c] / n
        shape = (1, c) + (1,) * (x.dim() - 2)
        centred = xf - mean.view(shape)
        var = _all_reduce(centred.pow(2).sum(dims)) / n  # biased, as BatchNorm normalises
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), n.detach())
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, n: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        # BatchNorm's rule: momentum None means a cumulative average; the running variance is unbiased
        m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
        unbiased = var * n / (n - 1).clamp(min=1)
        self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)


def _converted(bn: _BatchNorm, cls: type[_BatchNorm]) -> _BatchNorm:
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias  # the same Parameters: optimiser and saving see no change
    if bn.track_running_stats:
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
    new.train(bn.training)
    return new


def convert_sync_bn(module: nn.Module, device_type: str) -> nn.Module:
    """``module`` with every BatchNorm layer synchronised over the process group (in place where possible).

    ``device_type`` "cuda": torch's ``nn.SyncBatchNorm``; anything else: :class:`GlobalBatchNorm`. Convert
    before compiling and wrapping in DDP, and before building the optimiser (parameters are reused, so an
    optimiser built earlier still holds the right ones).
    """
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        return _converted(module, GlobalBatchNorm)
    for name, child in module.named_children():
        new = convert_sync_bn(child, device_type)
        if new is not child:
            setattr(module, name, new)
    return module


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in module.modules())
