"""One FARE training step, shared by the fine-tuning task and the benchmarks.

The step reads a :class:`FareSpec` (the dozen resolved values it needs), not the whole config. Nothing in
it waits for the device: metrics come back as detached tensors and are only read on the host at log steps.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch import Tensor, nn

from advft.attacks import apgd, ce_loss, pgd
from advft.distributed import autocast
from advft.engine.seeding import ATTACK_STREAM, step_generator
from advft.losses import Weights, attack_objective, resolve_weights, training_loss
from advft.schedule import lr_factor


@dataclass(frozen=True)
class FareSpec:
    """What one fine-tuning step reads, resolved once per run from the config (:meth:`of`)."""

    seed: int
    global_batch: int  # the attack's start noise is drawn for the global batch
    attack: str  # apgd | pgd
    eps: float  # L-inf radius in [0, 1] pixel units
    attack_steps: int
    objective: str  # embedding | ce_head
    loss: str  # a name in advft.losses.LOSSES: the training loss and the attack's objective
    weights: Weights  # the loss's resolved weights (alpha, beta, reduction)
    lr: float  # peak
    warmup_steps: int
    steps: int
    min_lr_ratio: float
    grad_clip: float  # 0 = off
    bn_train: bool  # BatchNorm in train mode for the training forward
    channels_last: bool
    precision: str  # fp32 | bf16 (resolved, never auto)
    # Not from the config: the same step by a costlier route, which the benchmarks time against the default.
    # "input": phi frozen, the attack takes input gradients only | "full_backward": phi trainable, every attack
    # gradient also computes (and drops) phi's parameter gradients, as a plain backward() would
    attack_grads: Literal["input", "full_backward"] = "input"
    join_forwards: bool = True  # phi(z), phi(x) as one forward of [z; x] where BN is in eval mode | always two

    @classmethod
    def of(cls, cfg, precision: str | None = None) -> "FareSpec":
        """The spec of a :class:`advft.config.Config`; ``precision`` = the run's resolved precision
        (:func:`advft.distributed.run_precision`), default ``cfg.run.precision`` (then fp32 or bf16)."""
        return cls(seed=cfg.run.seed, global_batch=cfg.data.batch_size, attack=cfg.attack.name,
                   eps=cfg.attack.eps_pixels, attack_steps=cfg.attack.steps, objective=cfg.attack.objective,
                   loss=cfg.loss.name,
                   weights=resolve_weights(cfg.loss.name, cfg.loss.alpha, cfg.loss.beta, cfg.loss.reduction),
                   lr=cfg.optim.lr,
                   warmup_steps=cfg.optim.warmup_steps, steps=cfg.optim.steps, min_lr_ratio=cfg.optim.min_lr_ratio,
                   grad_clip=cfg.optim.grad_clip, bn_train=cfg.model.bn == "train",
                   channels_last=cfg.run.channels_last, precision=precision or cfg.run.precision)


@dataclass
class StepModels:
    """The views of the encoders one step needs (built once by the trainer, in a fixed order).

    phi:      the plain trainable encoder (mode switches, saving)
    phi_fn:   phi, compiled or not, NOT DDP-wrapped: the attack's forward (input gradients only)
    phi_ddp:  what the training forward goes through (DDP over phi, compiled as a whole when phi_fn is; phi_fn on one process)
    phi_org:  the frozen reference: eval mode, no grad, never wrapped
    head:     optional fixed linear head (attack.objective = "ce_head")
    """

    phi: nn.Module
    phi_fn: nn.Module
    phi_ddp: nn.Module
    phi_org: nn.Module
    head: nn.Module | None = None


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad inside: backward through the module computes input grads only
    (about a third less work than a full backward, and no parameter .grad is touched)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


def attack_init(seed: int, step: int, global_shape: torch.Size, rank: int, world: int,
                device: torch.device) -> Tensor:
    """Uniform [-1,1] start offsets (units of eps) drawn for the GLOBAL batch; this rank's contiguous rows.

    Drawing the global tensor on every rank costs little next to the attack and makes N ranks equal one
    process with the same global batch.
    """
    g = step_generator(seed, step, device, stream=ATTACK_STREAM)
    u = torch.rand(global_shape, generator=g, device=device).mul_(2).sub_(1)
    b = global_shape[0] // world
    return u[rank * b:(rank + 1) * b]


def adversarial_batch(m: StepModels, x: Tensor, y: Tensor, target: Tensor, step: int, spec: FareSpec, *,
                      rank: int = 0, world: int = 1) -> Tensor:
    """The attack of global step ``step`` on this rank's batch (float32, detached, inside the eps-ball).

    It maximises the objective of the run's loss (:func:`advft.losses.attack_objective`), or the fixed
    head's cross-entropy with ``objective = "ce_head"``. phi goes through ``m.phi_fn`` (never DDP), in eval
    mode, with its parameters frozen (unless ``spec.attack_grads = "full_backward"``) and under the run's autocast;
    its train/eval flag is restored afterwards. ``target`` = phi_org(x) in float32. Separate from
    :func:`fare_step` so that the benchmarks time exactly the attack the step runs.
    """
    init = attack_init(spec.seed, step, torch.Size((spec.global_batch, *x.shape[1:])), rank, world, x.device)
    attack = apgd if spec.attack == "apgd" else pgd
    was_training = m.phi.training
    m.phi.eval()  # the attack never updates BN statistics
    full = spec.attack_grads == "full_backward"
    params = [p for p in m.phi.parameters() if p.requires_grad] if full else []
    with contextlib.nullcontext() if full else frozen(m.phi), autocast(x.device, spec.precision):
        if spec.objective == "ce_head":
            head, phi_fn = m.head, m.phi_fn
            fwd = lambda z: head(phi_fn(z))  # noqa: E731
            loss_fn = ce_loss(y)
        else:  # inside: a loss that attacks from phi(x) computes it with the attack's view of phi
            fwd, loss_fn = m.phi_fn, attack_objective(spec.loss, m.phi_fn, x, target)
        z = attack(fwd, x, loss_fn, eps=spec.eps, n_iter=spec.attack_steps, init=init, wrt_params=params)
    m.phi.train(was_training)
    return z


def fare_step(m: StepModels, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, step: int, spec: FareSpec, *,
              rank: int = 0, world: int = 1) -> dict[str, Tensor]:
    """Attack, the run's loss, backward and optimizer step for global step ``step``; detached metrics back
    (per term: :mod:`advft.losses`).

    phi(z) and phi(x) are separate forwards with train-mode BN (the adversarial term keeps its own batch
    statistics) and one concatenated forward with eval-mode BN, where that changes nothing.
    """
    device = x.device
    for g in opt.param_groups:
        g["lr"] = spec.lr * lr_factor(step, spec.warmup_steps, spec.steps, spec.min_lr_ratio)
    with torch.no_grad(), autocast(device, spec.precision):
        target = m.phi_org(x).float()
    z = adversarial_batch(m, x, y, target, step, spec, rank=rank, world=world)
    m.phi.train(spec.bn_train)
    mf = torch.channels_last if spec.channels_last else torch.contiguous_format
    with autocast(device, spec.precision):
        out = training_loss(spec.loss, m.phi_ddp, z.contiguous(memory_format=mf), x, target, spec.weights,
                            joint=spec.join_forwards and not spec.bn_train)
    out["loss"].backward()
    if spec.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(m.phi.parameters(), spec.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in out.items()}
