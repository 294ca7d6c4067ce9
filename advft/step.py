"""One FARE training step, shared by the training loop and the benchmarks.

The step is written so that nothing in it waits for the device: metrics come back as detached tensors and
are only read on the host at log steps.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

from advft.attacks import apgd, ce_loss, embedding_loss, pgd
from advft.distributed import autocast
from advft.losses import fare_loss
from advft.schedule import lr_factor


@dataclass
class StepModels:
    """The views of the encoders one step needs (built once by the trainer, in a fixed order).

    phi:      the plain trainable encoder (mode switches, saving)
    phi_fn:   phi, compiled or not, NOT DDP-wrapped: the attack's forward (input gradients only)
    phi_ddp:  what the training forward goes through (DDP over phi_fn, or phi_fn on one process)
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


def step_generator(seed: int, step: int, device: torch.device, stream: int = 0) -> torch.Generator:
    """A generator for one step's randomness, a pure function of (seed, step, stream)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7919 + stream * 104_729) % (2**63 - 1))
    return g


def attack_init(seed: int, step: int, global_shape: torch.Size, rank: int, world: int,
                device: torch.device) -> Tensor:
    """Uniform [-1,1] start offsets (units of eps) drawn for the GLOBAL batch; this rank's contiguous rows.

    Drawing the global tensor on every rank costs little next to the attack and makes N ranks equal one
    process with the same global batch.
    """
    g = step_generator(seed, step, device)
    u = torch.rand(global_shape, generator=g, device=device).mul_(2).sub_(1)
    b = global_shape[0] // world
    return u[rank * b:(rank + 1) * b]


def adversarial_batch(m: StepModels, x: Tensor, y: Tensor, target: Tensor, step: int, cfg, *,
                      rank: int = 0, world: int = 1, precision: str | None = None) -> Tensor:
    """The attack of global step ``step`` on this rank's batch (float32, detached, inside the eps-ball).

    phi goes through ``m.phi_fn`` (never DDP), in eval mode, with its parameters frozen and under the run's
    autocast; its train/eval flag is restored afterwards. ``target`` = phi_org(x) in float32. Separate from
    :func:`fare_step` so that the benchmarks time exactly the attack the step runs. ``precision``: the
    run's resolved precision (:func:`advft.distributed.resolve_precision`); None = ``cfg.run.precision``.
    """
    if cfg.attack.objective == "ce_head":
        head, phi_fn = m.head, m.phi_fn
        fwd = lambda z: head(phi_fn(z))  # noqa: E731
        loss_fn = ce_loss(y)
    else:
        fwd, loss_fn = m.phi_fn, embedding_loss(target)
    init = attack_init(cfg.run.seed, step, torch.Size((cfg.data.batch_size, *x.shape[1:])), rank, world, x.device)
    attack = apgd if cfg.attack.name == "apgd" else pgd
    was_training = m.phi.training
    m.phi.eval()  # the attack never updates BN statistics
    with frozen(m.phi), autocast(x.device, precision or cfg.run.precision):
        z = attack(fwd, x, loss_fn, eps=cfg.attack.eps_pixels, n_iter=cfg.attack.steps, init=init)
    m.phi.train(was_training)
    return z


def fare_step(m: StepModels, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, step: int, cfg, *,
              rank: int = 0, world: int = 1, precision: str | None = None) -> dict[str, Tensor]:
    """Attack, FARE loss, backward and optimizer step for global step ``step``; detached metrics back.

    ``precision``: fp32 | bf16, resolved once per run (:func:`advft.distributed.resolve_precision`);
    None = ``cfg.run.precision``, which must then be fp32 or bf16, not auto.
    """
    device = x.device
    precision = precision or cfg.run.precision
    for g in opt.param_groups:
        g["lr"] = cfg.optim.lr * lr_factor(step, cfg.optim.warmup_steps, cfg.optim.steps, cfg.optim.min_lr_ratio)
    with torch.no_grad(), autocast(device, precision):
        target = m.phi_org(x).float()
    z = adversarial_batch(m, x, y, target, step, cfg, rank=rank, world=world, precision=precision)
    m.phi.train(cfg.model.bn == "train")
    mf = torch.channels_last if cfg.run.channels_last else torch.contiguous_format
    with autocast(device, precision):
        out = fare_loss(m.phi_ddp, z.contiguous(memory_format=mf), x, target, cfg.loss.alpha, cfg.loss.reduction)
    loss = out["loss"]
    if step == cfg.run.fail_at_step:  # fault injection (tests of the non-finite path)
        loss = loss * float("nan")
    loss.backward()
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(m.phi.parameters(), cfg.optim.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    out["loss"] = loss.detach()
    return out
