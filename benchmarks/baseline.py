"""THE BASELINE of the benchmarks: one FARE step written the way the report's code ran it. Not used for training.

It computes what advft's step computes (same APGD iterates from the same start, same loss), with the
performance habits of the report's code kept on purpose, so the benchmark measures what advft's engine
changed and nothing else:

- fp32, eager, NCHW (the caller builds the models that way);
- the attack runs phi in eval mode with its parameters still requiring grad and takes input gradients with
  ``loss.backward()``: the parameter gradients are computed too, then thrown away (advft freezes the
  parameters and asks autograd for the input gradient only);
- APGD evaluates the gradient at every iterate, the last one included, where it is never used (advft
  evaluates only the loss there); its step-size decisions are taken on the host (``.tolist()``), and it
  logs the mean best loss with ``.item()`` at every iteration: a host synchronisation per iteration;
- the clean forward runs even at alpha = 0, separately from the adversarial one (advft: one forward of the
  concatenated batch, none at alpha = 0);
- plain (non-fused) AdamW and a ``loss.item()`` after every step.

Conventions as in ``advft.attacks``: pixels in [0, 1], ``eps`` in pixel units, the random start is given
(offsets in units of eps), losses in float32 and maximised.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from advft.attacks import apgd_checkpoints
from advft.schedule import lr_factor


def _sq_dist(a: Tensor, b: Tensor) -> Tensor:
    """Squared L2 distance per sample, summed over the feature dimension (as advft's FARE loss)."""
    return (a.float() - b.float()).pow(2).sum(1)


def _loss_and_full_grad(model: nn.Module, z: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample embedding loss at z and its input gradient, through a full backward pass."""
    z = z.detach().clone().requires_grad_(True)
    loss = _sq_dist(model(z), target)
    model.zero_grad(set_to_none=True)
    loss.sum().backward()  # also fills every parameter's .grad: wasted work, kept on purpose
    model.zero_grad(set_to_none=True)
    return loss.detach(), z.grad.detach()


def baseline_apgd(model: nn.Module, x: Tensor, target: Tensor, *, eps: float, n_iter: int, init: Tensor,
                  momentum: float = 0.75, rho: float = 0.75, log: list[float] | None = None) -> Tensor:
    """APGD on ||model(z) - target||^2, the report's way; returns the best iterate per sample.

    The same algorithm and iterates as ``advft.attacks.apgd`` with ``init`` (tests check this); only the
    cost differs (see the module docstring). ``log`` receives the mean best loss after each iteration.
    """
    x = x.detach()
    lo, hi = (x - eps).clamp(min=0.0), (x + eps).clamp(max=1.0)
    checkpoints = apgd_checkpoints(n_iter)
    log = [] if log is None else log

    x_cur = torch.max(torch.min(x + eps * init, hi), lo)
    loss_cur, grad_cur = _loss_and_full_grad(model, x_cur, target)
    x_prev = x_cur.clone()
    x_best, loss_best, grad_best = x_cur.clone(), loss_cur.clone(), grad_cur.clone()
    step = torch.full((x.shape[0], 1, 1, 1), 2.0 * eps, device=x.device)
    n_increase = [0] * x.shape[0]
    loss_best_at_checkpoint = loss_best.tolist()
    halved_at_checkpoint = [False] * x.shape[0]
    last_checkpoint = 0

    for t in range(1, n_iter + 1):
        z = torch.max(torch.min(x_cur + step * grad_cur.sign(), hi), lo)
        if t > 1:
            z = torch.max(torch.min(x_cur + momentum * (z - x_cur) + (1 - momentum) * (x_cur - x_prev), hi), lo)
        loss_new, grad_new = _loss_and_full_grad(model, z, target)  # also at t == n_iter, never used there

        increased = (loss_new > loss_cur).tolist()
        n_increase = [n + int(i) for n, i in zip(n_increase, increased)]
        improved = loss_new > loss_best
        x_best[improved] = z[improved]
        loss_best[improved] = loss_new[improved]
        grad_best[improved] = grad_new[improved]
        x_prev, x_cur, loss_cur, grad_cur = x_cur, z, loss_new, grad_new
        log.append(loss_best.mean().item())  # progress log: a host sync per iteration

        if t in checkpoints and t < n_iter:
            best = loss_best.tolist()
            halve = [n < rho * (t - last_checkpoint) or (not h and b <= b0)
                     for n, h, b, b0 in zip(n_increase, halved_at_checkpoint, best, loss_best_at_checkpoint)]
            for i in (i for i, h in enumerate(halve) if h):
                step[i] /= 2
                x_cur[i], grad_cur[i], loss_cur[i] = x_best[i], grad_best[i], loss_best[i]
            halved_at_checkpoint, loss_best_at_checkpoint = halve, best
            n_increase = [0] * x.shape[0]
            last_checkpoint = t
    return x_best


def baseline_fare_step(phi: nn.Module, phi_org: nn.Module, opt: torch.optim.Optimizer, x: Tensor, init: Tensor,
                       step: int, cfg) -> float:
    """One FARE step the report's way (attack, clean and adversarial forwards, AdamW); returns loss.item().

    ``cfg`` is an advft Config; it supplies the same eps, attack steps, alpha, lr schedule and BN mode as
    advft's step. ``init`` is the attack's random start (units of eps), the one advft's step would draw.
    """
    for g in opt.param_groups:
        g["lr"] = cfg.optim.lr * lr_factor(step, cfg.optim.warmup_steps, cfg.optim.steps, cfg.optim.min_lr_ratio)
    with torch.no_grad():
        target = phi_org(x)
    phi.eval()
    z = baseline_apgd(phi, x, target, eps=cfg.attack.eps_pixels, n_iter=cfg.attack.steps, init=init)
    phi.train(cfg.model.bn == "train")
    clean = phi(x)  # even at alpha = 0
    adv = phi(z)
    loss = _sq_dist(adv, target).mean() + cfg.loss.alpha * _sq_dist(clean, target).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()  # logged every step: a host sync per step
