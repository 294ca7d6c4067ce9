"""L-inf attacks as pure functions: APGD (Croce & Hein, ICML 2020), sign-gradient PGD, their losses.

Conventions shared by everything in this file:

- Pixels are in [0, 1]. ``eps`` and step sizes are in pixel units (the caller converts ``8`` to
  ``8/255``). Normalisation belongs inside ``forward``.
- ``forward`` maps a batch of [0, 1] images to outputs (logits or embeddings); ``loss_fn`` maps those
  outputs to a per-sample loss of shape ``(B,)`` that the attack MAXIMISES. The loss builders below
  return such callables.
- An attack is a function of its arguments only: it draws its random start from ``generator`` (or an
  explicit ``init``), never from torch's global RNG, keeps no state, and never calls ``.backward()``:
  input gradients come from ``torch.autograd.grad``, so parameter ``.grad`` fields stay untouched.
  ``wrt_params`` makes every gradient evaluation differentiate the given parameters too (the work of a
  full backward, results dropped): the same iterates at a higher cost, for benchmarks that measure it.
- The iteration loops contain no host synchronisation (no ``.item()``, no Python branch on a tensor
  value, no data-dependent indexing): every per-sample decision is a ``torch.where``. On a GPU the
  whole attack is queued without waiting for the device.
- Adversarial images are kept in float32 (float64 if ``x`` is float64) also when ``forward`` runs under
  bf16 autocast: near 1.0 one bf16 step is 1/255, so an iterate stored in bf16 could not take the
  eps/8 steps that APGD reaches after three halvings. Losses are computed and compared in float32 (or
  float64) for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

Forward = Callable[[Tensor], Tensor]
LossFn = Callable[[Tensor], Tensor]

__all__ = [
    "apgd",
    "apgd_checkpoints",
    "ce_loss",
    "dlr_loss",
    "embedding_loss",
    "pgd",
    "robust_correct",
    "targeted_dlr_loss",
]


# --------------------------------------------------------------------------------------------- losses


def _at_least_fp32(t: Tensor) -> Tensor:
    """bf16/fp16 outputs of an autocast forward -> float32; float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def embedding_loss(target: Tensor) -> LossFn:
    """FARE's inner objective: ``||phi(z) - target||_2^2`` per sample, summed over all feature dims.

    Label-free. Returns a callable ``outputs (B, ...) -> (B,)`` in float32 (float64 for float64
    outputs); no mean over the batch
    (the attack needs one value per sample). ``target`` is the frozen encoder's embedding of the clean
    images and is treated as a constant.
    """
    target = target.detach()

    def loss(outputs: Tensor) -> Tensor:
        diff = _at_least_fp32(outputs) - _at_least_fp32(target)
        return diff.flatten(1).pow(2).sum(dim=1)

    return loss


def ce_loss(labels: Tensor) -> LossFn:
    """Per-sample cross-entropy of logits ``(B, K)`` against ``labels`` ``(B,)``, no reduction, float32+."""

    def loss(logits: Tensor) -> Tensor:
        return F.cross_entropy(_at_least_fp32(logits), labels, reduction="none")

    return loss


def dlr_loss(labels: Tensor) -> LossFn:
    """Untargeted difference-of-logits-ratio loss of Croce & Hein (2020), per sample, float32+.

    ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)`` where ``z_pi1 >= z_pi2 >= ...`` are the
    sorted logits. Positive exactly when the sample is misclassified; invariant to shifting and
    scaling the logits, so it cannot be defeated by logit scaling. Needs at least 3 classes.
    """

    def loss(logits: Tensor) -> Tensor:
        z = _at_least_fp32(logits)
        if z.shape[1] < 3:
            raise ValueError(f"dlr_loss needs at least 3 classes, got logits of shape {tuple(z.shape)}")
        top = z.topk(3, dim=1).values
        z_y = z.gather(1, labels[:, None]).squeeze(1)
        others = z.scatter(1, labels[:, None], float("-inf"))
        return -(z_y - others.amax(dim=1)) / (top[:, 0] - top[:, 2] + 1e-12)

    return loss


def targeted_dlr_loss(labels: Tensor, target_labels: Tensor) -> LossFn:
    """Targeted DLR loss of Croce & Hein (2020), per sample, float32+.

    ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` with ``t = target_labels``; maximising it
    pushes the target logit above the true one. Needs at least 4 classes.
    """

    def loss(logits: Tensor) -> Tensor:
        z = _at_least_fp32(logits)
        if z.shape[1] < 4:
            raise ValueError(
                f"targeted_dlr_loss needs at least 4 classes, got logits of shape {tuple(z.shape)}"
            )
        top = z.topk(4, dim=1).values
        z_y = z.gather(1, labels[:, None]).squeeze(1)
        z_t = z.gather(1, target_labels[:, None]).squeeze(1)
        return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)

    return loss


# ------------------------------------------------------------------------------------------- helpers


def apgd_checkpoints(n_iter: int) -> list[int]:
    """Iterations after which APGD may halve its step size: ``w_j = ceil(p_j * n_iter)`` for ``j >= 1``.

    ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``. Computed in exact
    integer hundredths, because summed in floating point p_4 comes out as ``0.7000000000000001`` and
    ``ceil(p_4 * 10)`` would be 8 instead of 7. Only checkpoints before the last iteration are
    returned (a halving after the last step has no effect), without duplicates, in increasing order.
    (The authors' code uses a slightly different integer schedule; this is the paper's.)
    """
    prev, cur = 0, 22  # p in units of 1/100
    out: list[int] = []
    while True:
        w = -(-cur * n_iter // 100)  # exact ceil(cur * n_iter / 100)
        if w >= n_iter:
            return out
        if w > 0 and (not out or w > out[-1]):
            out.append(w)
        prev, cur = cur, cur + max(cur - prev - 3, 6)


def _work_dtype(x: Tensor) -> torch.dtype:
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating point image batch in [0, 1], got dtype {x.dtype}")
    return torch.promote_types(x.dtype, torch.float32)


def _random_start(
    x: Tensor, eps: float, generator: torch.Generator | None, init: Tensor | None
) -> Tensor:
    """Offset in units of eps, uniform in [-1, 1]^d, drawn without touching the global RNG."""
    if init is not None:
        if init.shape != x.shape:
            raise ValueError(f"init has shape {tuple(init.shape)}, x has shape {tuple(x.shape)}")
        return init.to(device=x.device, dtype=x.dtype)
    if generator is None:
        # A private generator seeded from the OS: fresh noise per call, global RNG left alone.
        generator = torch.Generator(device=x.device)
        generator.seed()
    # Draw where the generator lives (a CPU generator may drive a CUDA attack), then move.
    u = torch.rand(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return (2.0 * u - 1.0).to(x.device, non_blocking=True)


def _loss_and_grad(
    forward: Forward, loss_fn: LossFn, x_adv: Tensor, need_grad: bool, wrt_params: tuple[Tensor, ...] = ()
) -> tuple[Tensor, Tensor | None]:
    """Per-sample loss at ``x_adv`` (in x_adv's dtype) and, if asked, its input gradient.

    The gradient comes from ``autograd.grad`` w.r.t. the input (and ``wrt_params``, whose gradients are
    dropped), so parameters that require grad are differentiated through but their ``.grad`` is never written.
    """
    with torch.enable_grad() if need_grad else torch.no_grad():
        z = x_adv.detach().requires_grad_(need_grad)
        loss = loss_fn(forward(z))
        if loss.shape != (x_adv.shape[0],):
            raise ValueError(
                f"loss_fn must return one value per sample, shape ({x_adv.shape[0]},); "
                f"got {tuple(loss.shape)}"
            )
        loss = loss.to(x_adv.dtype)  # bf16 under autocast -> fp32 before any comparison
        if not need_grad:
            return loss, None
        grad = torch.autograd.grad(loss.sum(), (z, *wrt_params))[0]
    return loss.detach(), grad


def _params(wrt_params: Iterable[Tensor]) -> tuple[Tensor, ...]:
    params = tuple(wrt_params)
    if not all(p.requires_grad for p in params):
        raise ValueError("wrt_params: every tensor must require grad (a frozen parameter has no gradient to take)")
    return params


def _check_args(eps: float, n_iter: int) -> None:
    if torch.is_inference_mode_enabled():
        # enable_grad cannot undo inference_mode: autograd would fail with a less helpful message.
        raise RuntimeError("attacks need input gradients: call them outside torch.inference_mode()")
    if eps < 0:
        raise ValueError(f"eps must be >= 0 (pixel units, e.g. 8/255), got {eps}")
    if n_iter < 1:
        raise ValueError(f"n_iter must be >= 1, got {n_iter}")


def _per_sample(mask: Tensor, like: Tensor) -> Tensor:
    """Reshape a (B,) mask so that it broadcasts over the image dims of ``like``."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


# -------------------------------------------------------------------------------------------- attacks


@torch.no_grad()
def apgd(
    forward: Forward,
    x: Tensor,
    loss_fn: LossFn,
    *,
    eps: float,
    n_iter: int,
    generator: torch.Generator | None = None,
    init: Tensor | None = None,
    momentum: float = 0.75,
    rho: float = 0.75,
    wrt_params: Iterable[Tensor] = (),
) -> Tensor:
    """L-inf APGD (Croce & Hein, ICML 2020, Algorithm 1): maximise ``loss_fn(forward(z))`` over the ball.

    Returns, per sample, the highest-loss iterate seen (the random start included), detached, in
    float32 (float64 if ``x`` is), inside ``|z - x|_inf <= eps`` and inside [0, 1].

    Args:
        forward: [0, 1] images -> outputs. Its parameters may require grad; they are not changed and
            their ``.grad`` is not touched. Put it in eval mode if it has batch statistics.
        x: clean images in [0, 1], shape (B, ...).
        loss_fn: outputs -> per-sample loss (B,) to maximise (see the loss builders in this module).
        eps: radius in pixel units.
        n_iter: number of steps; there are ``n_iter`` gradient evaluations (random start included)
            plus one forward pass at the last iterate.
        generator: source of the random start. ``None`` uses a private, OS-seeded generator (fresh
            noise, not reproducible). torch's global RNG is never used.
        init: optional random-start offset in units of eps, same shape as ``x``, values in [-1, 1].
            Overrides ``generator``. Lets data-parallel ranks shard one global noise tensor so that
            N ranks compute what one process would.
        momentum: weight of the new projected point against the previous step (alpha in the paper);
            the first step takes no momentum.
        rho: condition 1 halves the step size when fewer than ``rho`` of the steps since the last
            checkpoint increased the loss.
        wrt_params: tensors that require grad (a model's parameters) to differentiate at every gradient
            evaluation besides the input, as ``loss.backward()`` would; their gradients are dropped and
            ``.grad`` is not written. Empty (default): the input gradient only, which skips the weight
            gradients' work. The iterates are the same either way; the benchmarks use it to measure that work.

    Step size starts at ``2 * eps``. At each checkpoint (see ``apgd_checkpoints``) and per sample,
    the step size is halved and the iterate restarts from the best point when (1) the loss increased
    in fewer than ``rho`` of the steps since the last checkpoint, or (2) the step size was not halved
    at the last checkpoint and the best loss has not improved since then. Condition 2 is active at the
    first checkpoint too (the step size is unchanged since the start), as in the paper; the authors'
    code skips it there.
    """
    _check_args(eps, n_iter)
    params = _params(wrt_params)
    dtype = _work_dtype(x)
    x = x.detach().to(dtype)
    lo = (x - eps).clamp_(min=0.0)
    hi = (x + eps).clamp_(max=1.0)

    def project(z: Tensor) -> Tensor:
        return torch.clamp(z, min=lo, max=hi)

    x_cur = project(x + eps * _random_start(x, eps, generator, init))
    loss_cur, grad_cur = _loss_and_grad(forward, loss_fn, x_cur, need_grad=True, wrt_params=params)
    assert grad_cur is not None
    x_prev = x_cur
    x_best, loss_best, grad_best = x_cur, loss_cur, grad_cur

    # One step size per sample, shaped (B, 1, ..., 1) to broadcast over the image; halved per sample.
    step = torch.full_like(_per_sample(loss_cur, x), 2.0 * eps)
    checkpoints = set(apgd_checkpoints(n_iter))
    last_checkpoint = 0
    n_increase = torch.zeros_like(loss_cur)
    loss_best_at_checkpoint = loss_best
    halved_at_checkpoint = torch.zeros_like(loss_cur, dtype=torch.bool)

    for t in range(1, n_iter + 1):
        z = project(x_cur + step * grad_cur.sign())
        if t > 1:
            z = project(x_cur + momentum * (z - x_cur) + (1.0 - momentum) * (x_cur - x_prev))
        # The last iterate only needs its loss: skip its backward pass.
        need_grad = t < n_iter
        loss_new, grad_new = _loss_and_grad(forward, loss_fn, z, need_grad, params)

        n_increase += (loss_new > loss_cur).to(dtype)
        improved = loss_new > loss_best
        improved_img = _per_sample(improved, x)
        x_best = torch.where(improved_img, z, x_best)
        loss_best = torch.where(improved, loss_new, loss_best)
        x_prev, x_cur, loss_cur = x_cur, z, loss_new
        if not need_grad:
            break
        assert grad_new is not None
        grad_best = torch.where(improved_img, grad_new, grad_best)
        grad_cur = grad_new

        if t in checkpoints:
            few_increases = n_increase < rho * (t - last_checkpoint)
            stalled = ~halved_at_checkpoint & (loss_best <= loss_best_at_checkpoint)
            halve = few_increases | stalled
            halve_img = _per_sample(halve, x)
            step = torch.where(halve_img, 0.5 * step, step)
            # Restart from the best point; x_prev stays, so the next momentum term points from the
            # pre-restart iterate to the best one, as in the paper.
            x_cur = torch.where(halve_img, x_best, x_cur)
            grad_cur = torch.where(halve_img, grad_best, grad_cur)
            loss_cur = torch.where(halve, loss_best, loss_cur)
            halved_at_checkpoint = halve
            loss_best_at_checkpoint = loss_best
            n_increase = torch.zeros_like(n_increase)
            last_checkpoint = t

    return x_best


@torch.no_grad()
def pgd(
    forward: Forward,
    x: Tensor,
    loss_fn: LossFn,
    *,
    eps: float,
    n_iter: int,
    step_size: float | None = None,
    generator: torch.Generator | None = None,
    init: Tensor | None = None,
    wrt_params: Iterable[Tensor] = (),
) -> Tensor:
    """Random-start L-inf PGD with sign gradients and a fixed step (baseline for ``apgd``).

    Same conventions and guarantees as ``apgd`` (pixel units, no global RNG, no host sync, input
    gradients only unless ``wrt_params`` names more, per-sample best iterate returned in float32 inside the
    ball and [0, 1]). ``step_size`` defaults to ``2.5 * eps / n_iter``, so the steps together can cross the ball.
    """
    _check_args(eps, n_iter)
    step = 2.5 * eps / n_iter if step_size is None else step_size
    params = _params(wrt_params)
    dtype = _work_dtype(x)
    x = x.detach().to(dtype)
    lo = (x - eps).clamp_(min=0.0)
    hi = (x + eps).clamp_(max=1.0)

    x_cur = torch.clamp(x + eps * _random_start(x, eps, generator, init), min=lo, max=hi)
    loss_cur, grad = _loss_and_grad(forward, loss_fn, x_cur, need_grad=True, wrt_params=params)
    x_best, loss_best = x_cur, loss_cur
    for t in range(1, n_iter + 1):
        assert grad is not None
        x_cur = torch.clamp(x_cur + step * grad.sign(), min=lo, max=hi)
        loss_cur, grad = _loss_and_grad(forward, loss_fn, x_cur, need_grad=t < n_iter, wrt_params=params)
        improved = loss_cur > loss_best
        x_best = torch.where(_per_sample(improved, x), x_cur, x_best)
        loss_best = torch.where(improved, loss_cur, loss_best)
    return x_best


# ----------------------------------------------------------------------------------------- evaluation


# Larger than any value of CE or DLR; finite so that sums over the batch stay finite.
_SUCCESS = 1e30


def _success_first(loss_fn: LossFn, labels: Tensor) -> LossFn:
    """Wrap a classification loss so that any misclassified point counts as the best one.

    APGD returns the highest-loss iterate, but for robust accuracy what matters is whether *any*
    iterate was misclassified (a misclassified point may have lower CE than a correct one). Mapping
    misclassified points to a constant larger than any loss value makes the best iterate a
    misclassified one whenever one was seen. The gradient of such a sample becomes zero, which only
    stops an attack that has already succeeded; samples still correct are attacked exactly as before.
    """

    def loss(logits: Tensor) -> Tensor:
        value = loss_fn(logits)
        wrong = logits.argmax(dim=1) != labels
        return torch.where(wrong, torch.full_like(value, _SUCCESS), value)

    return loss


def _top_other_classes(logits: Tensor, labels: Tensor, k: int) -> Tensor:
    """(B, k) indices of the k highest logits other than the true class, highest first."""
    others = logits.float().scatter(1, labels[:, None], float("-inf"))
    return others.topk(k, dim=1).indices


@torch.no_grad()
def _predict(forward_logits: Forward, x: Tensor) -> Tensor:
    return forward_logits(x).argmax(dim=1)


def _robust_correct_chunk(
    forward_logits: Forward,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    n_iter: int,
    n_targets: int,
    generator: torch.Generator | None,
) -> Tensor:
    with torch.no_grad():
        clean_logits = forward_logits(x)
    robust = clean_logits.argmax(dim=1) == y
    n_classes = clean_logits.shape[1]
    if n_targets > n_classes - 1:
        raise ValueError(f"n_targets={n_targets} but there are only {n_classes - 1} non-true classes")
    targets = _top_other_classes(clean_logits, y, n_targets)

    losses: list[Callable[[Tensor], LossFn]] = [lambda idx: ce_loss(y[idx])]
    for k in range(n_targets):
        losses.append(lambda idx, k=k: targeted_dlr_loss(y[idx], targets[idx, k]))

    for make_loss in losses:
        idx = robust.nonzero().squeeze(1)  # attack only what is still standing (host sync is fine here)
        if idx.numel() == 0:
            break
        loss_fn = _success_first(make_loss(idx), y[idx])
        x_adv = apgd(forward_logits, x[idx], loss_fn, eps=eps, n_iter=n_iter, generator=generator)
        robust[idx] = _predict(forward_logits, x_adv) == y[idx]
    return robust


def robust_correct(
    forward_logits: Forward,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    n_iter: int,
    n_targets: int = 0,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> Tensor:
    """Which samples stay correctly classified under APGD-CE and, if ``n_targets > 0``, APGD-T.

    Returns a (B,) bool tensor: True where the clean prediction is correct AND the prediction is still
    correct after APGD-CE (``n_iter`` steps) AND after targeted-DLR APGD towards each of the
    ``n_targets`` highest-scoring non-true classes (ranked by clean logits). Worst case per sample:
    each attack only runs on the samples that survived the previous ones, and a sample broken by any
    attack counts as not robust. A sample counts as broken if any APGD iterate was misclassified.

    ``eps`` is in pixel units; ``forward_logits`` maps [0, 1] images to logits and should be in eval
    mode. Samples are processed in chunks of ``batch_size`` (all at once if None). Unlike the attacks,
    this helper synchronises with the host (it selects the surviving samples); use it for evaluation.
    """
    _check_args(eps, n_iter)
    if n_targets < 0:
        raise ValueError(f"n_targets must be >= 0, got {n_targets}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    chunk = x.shape[0] if batch_size is None else batch_size
    if chunk < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    y = y.to(x.device)
    parts = [
        _robust_correct_chunk(
            forward_logits,
            x[i : i + chunk],
            y[i : i + chunk],
            eps=eps,
            n_iter=n_iter,
            n_targets=n_targets,
            generator=generator,
        )
        for i in range(0, x.shape[0], chunk)
    ]
    if not parts:
        return torch.zeros(0, dtype=torch.bool, device=x.device)
    return torch.cat(parts)
