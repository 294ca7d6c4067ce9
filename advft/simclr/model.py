"""The pretrained network: an encoder with SimCLR's projection head, its optimizer, and the exported encoder."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from advft.checkpoint import CheckpointError
from advft.engine.optim import adamw
from advft.engine.rundir import atomic_write
from advft.models import Encoder, build_encoder, encoder_state_dict
from advft.simclr.config import PretrainModelConfig, PretrainOptimConfig


class ProjectionHead(nn.Sequential):
    """SimCLR's 2-layer MLP: Linear(in, hidden) [-> BatchNorm1d] -> ReLU -> Linear(hidden, out)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, bn: bool = True) -> None:
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden, bias=not bn)]  # BN's shift makes a bias redundant
        if bn:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)]
        super().__init__(*layers)


class SimCLRNet(nn.Module):
    """[0,1] images -> projections: ``head(encoder(x))``. The one module compiled and DDP-wrapped."""

    def __init__(self, encoder: Encoder, head: ProjectionHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


def build_simclr(cfg: PretrainModelConfig) -> SimCLRNet:
    """A freshly initialised encoder (global torch RNG, seed it first) with its projection head."""
    enc = build_encoder(cfg.arch, cfg.stem, cfg.normalize)
    head = ProjectionHead(enc.feature_dim, cfg.proj_hidden or enc.feature_dim, cfg.proj_dim, cfg.proj_bn)
    return SimCLRNet(enc, head)


def build_optimizer(model: nn.Module, cfg: PretrainOptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW or SGD+momentum; biases and BatchNorm weights (the 1-d tensors) get no weight decay."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return adamw(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=cfg.fused, device=device)


def save_encoder(encoder: Encoder, path: Path) -> None:
    """Write ``{'format': 'advft-encoder', 'model', 'arch', 'stem', 'normalize'}`` atomically (temp + rename)."""
    obj = {"format": "advft-encoder", "arch": encoder.arch, "stem": encoder.stem, "normalize": encoder.normalize,
           "model": {k: v.detach().cpu().clone() for k, v in encoder_state_dict(encoder).items()}}
    try:
        atomic_write(path, lambda f: torch.save(obj, f), sync=True)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"could not write {path}: {e}") from None
