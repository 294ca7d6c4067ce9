"""Evaluation of a (frozen) encoder: linear probe re-fit on its features, clean and robust accuracy.

Protocol: features of a fixed training subset -> a multinomial logistic-regression probe (full batch,
standardised features, folded back into one ``nn.Linear`` so the attack sees a plain linear head on the
raw encoder). Then on a fixed held-out subset: clean accuracy, and robust accuracy under APGD-CE
(``n_iter`` steps) and, when ``n_targets > 0``, APGD-T with the targeted DLR loss over the top
``n_targets`` classes, worst case per sample. ``eval.head = "fixed"`` uses a given head instead of a probe.

``final=True`` marks the strong evaluations (step 0 and the end): the data callables are asked for their
final sets (``eval.final_probe_train_size`` / ``eval.final_test_size`` images, see
:func:`advft.data.eval_data`) and ``eval.final_attack = "autoattack"`` replaces advft's APGD by AutoAttack's
standard ensemble (:mod:`advft.autoattack`). Every accuracy comes with its 95 % Wilson interval and its n.
Optionally the same attack at a second radius (``eps_extra``) on the same images and head.

Every rank evaluates: batch i of a pass goes to rank i mod N (every rank reads the same batches, only its own
go through the encoder), probe features are gathered in batch order and the counts of correct images summed,
so N ranks give the numbers of one process. Each batch's attack is seeded from (seed, batch index), not from
the batches before it. ``check`` is called before each round of N batches (all ranks call it equally often):
the engine's stop poll, which raises to abandon the evaluation when a stop was requested.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from advft.attacks import robust_correct
from advft.distributed import autocast
from advft.engine.seeding import EVAL_STREAM, step_generator
from advft.report.stats import wilson

# a fresh pass over the batches; advft.data.eval_data's also take final=True (the final evaluation's sets)
Batches = Callable[..., Iterable[tuple[Tensor, Tensor]]]
Check = Callable[[], None]
EXTRA_STREAM = EVAL_STREAM + 1  # the attack at eps_extra


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rounds(batches: Iterable[tuple[Tensor, Tensor]], check: Check | None) -> Iterator[list[tuple[int, Tensor, Tensor]]]:
    """Rounds of N consecutive batches (i, x, y), N = world size; ``check`` before each round."""
    _, world = _world()
    batch_iter = enumerate(batches)
    while True:
        if check is not None:
            check()
        rnd = [(i, x, y) for _, (i, (x, y)) in zip(range(world), batch_iter)]
        if not rnd:
            return
        yield rnd


@torch.no_grad()
def extract_features(encoder: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device,
                     precision: str = "fp32", check: Check | None = None) -> tuple[Tensor, Tensor]:
    """Features (N, D) in fp32 and labels (N,), on ``device``, in batch order, on every rank; each rank runs
    the encoder on its share of the batches (the encoder must already be in eval mode)."""
    rank, world = _world()
    mine, sizes, labels = [], [], []
    for rnd in _rounds(batches, check):
        for i, x, y in rnd:
            sizes.append((i % world, int(y.shape[0])))
            labels.append(y.to(device))
            if i % world == rank:
                with autocast(device, precision):
                    mine.append(encoder(x.to(device)).float())
    y_all = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    if world == 1:
        return (torch.cat(mine) if mine else torch.zeros(0, 0, device=device)), y_all
    return _gather_in_order(mine, sizes, device), y_all


def _gather_in_order(mine: list[Tensor], sizes: list[tuple[int, int]], device: torch.device) -> Tensor:
    """All ranks' feature rows back in batch order (batch i from rank i mod N), on every rank."""
    import torch.distributed as dist

    _, world = _world()
    dim = torch.tensor([mine[0].shape[1] if mine else 0], device=device)
    dist.all_reduce(dim, op=dist.ReduceOp.MAX)  # a rank without batches still needs the width
    rows = [sum(n for r, n in sizes if r == k) for k in range(world)]
    local = torch.cat(mine) if mine else torch.zeros(0, int(dim), device=device)
    padded = torch.zeros(max(rows), int(dim), device=device)
    padded[:local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    offset, out = [0] * world, []
    for r, n in sizes:
        out.append(parts[r][offset[r]:offset[r] + n])
        offset[r] += n
    return torch.cat(out)


def broadcast_head(head: nn.Linear) -> nn.Linear:
    """Rank 0's probe on every rank: ranks on different hardware could fit slightly different probes."""
    import torch.distributed as dist

    if _world()[1] > 1:
        for t in (head.weight, head.bias):
            dist.broadcast(t.data, src=0)
    return head


def fit_probe(feats: Tensor, labels: Tensor, n_classes: int, epochs: int = 100, lr: float = 0.1,
              weight_decay: float = 1e-4) -> nn.Linear:
    """Multinomial logistic regression on standardised features, returned as ONE linear layer on the raw
    features (standardisation folded in). Zero init + full-batch Adam: deterministic, no RNG."""
    mu = feats.mean(0)
    sd = feats.std(0).clamp_min(1e-6)
    fn = (feats - mu) / sd
    w = torch.zeros(n_classes, feats.shape[1], device=feats.device, requires_grad=True)
    b = torch.zeros(n_classes, device=feats.device, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    with torch.enable_grad():
        for _ in range(epochs):
            loss = nn.functional.cross_entropy(fn @ w.t() + b, labels) + weight_decay * w.pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    head = nn.Linear(feats.shape[1], n_classes).to(feats.device)
    with torch.no_grad():
        head.weight.copy_(w / sd)
        head.bias.copy_(b - (w / sd) @ mu)
    return head.requires_grad_(False)


def _with_interval(out: dict[str, Any], key: str, correct: int, n: int) -> None:
    """out[key] = accuracy in %, out[key + '_ci95'] = its 95 % Wilson interval [lo, hi] in %."""
    acc = 100.0 * correct / max(n, 1)
    out[key] = acc
    out[f"{key}_ci95"] = list(wilson(acc, n)) if n else None


def evaluate(encoder: nn.Module, probe_data: Batches, test_data: Batches, *, cfg: Any,
             device: torch.device, n_iter: int, n_targets: int = 0, head: nn.Module | None = None,
             seed: int = 0, precision: str | None = None, final: bool = False,
             eps_extra: float = 0.0, check: Check | None = None) -> dict[str, Any]:
    """Clean and robust accuracy (in %, on the test subset) of a probe (or the fixed ``head``) on ``encoder``,
    each with ``<key>_ci95`` (95 % Wilson interval, in %) and ``n_test``; ``ci`` names the method.

    ``cfg`` is the run's Config: eps (attack.eps, 1/255 units), probe epochs are read from it, and the
    precision unless ``precision`` gives the run's resolved one (:func:`advft.distributed.resolve_precision`).
    ``final``: the strong evaluation (the final sets and ``eval.final_attack``; see the module docstring).
    ``eps_extra`` > 0 (1/255 units) adds ``robust_acc_eps_extra``: robust accuracy at that radius too.
    Call it on every rank (see the module docstring); every rank returns the same result.
    """
    encoder.eval()
    precision = precision or cfg.run.precision
    sets = {"final": True} if final else {}
    autoattack = final and getattr(cfg.eval, "final_attack", "apgd") == "autoattack"
    out: dict[str, Any] = {}
    if head is None:
        f, y = extract_features(encoder, probe_data(**sets), device, precision, check)
        # classes = largest label + 1 of the probe set (no dataset metadata needed for ffcv/dali files)
        head = broadcast_head(fit_probe(f, y, int(y.max()) + 1, epochs=cfg.eval.probe_epochs))
        _with_interval(out, "probe_train_acc", int((head(f).argmax(1) == y).sum()), int(y.numel()))
        out["probe_n"] = int(y.numel())

    def logits(x: Tensor) -> Tensor:
        with autocast(device, precision):
            return head(encoder(x)).float()

    rank, world = _world()
    counts = torch.zeros(4, dtype=torch.long, device=device)  # images, clean, robust, robust at eps_extra
    for rnd in _rounds(test_data(**sets), check):
        for i, x, y in rnd:
            if i % world != rank:
                continue
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                counts[1] += (logits(x).argmax(1) == y).sum()
            # per batch, so that a batch's attack does not depend on which rank ran the batches before it;
            # the second radius has its own stream, so adding it leaves the first one's numbers unchanged
            gen = step_generator(seed, i, device, stream=EVAL_STREAM)
            gen_extra = step_generator(seed, i, device, stream=EXTRA_STREAM)
            with torch.enable_grad():
                if autoattack:
                    from advft.autoattack import autoattack_correct

                    correct = autoattack_correct(logits, x, y, eps=cfg.attack.eps_pixels, seed=gen.initial_seed())
                    if eps_extra > 0:
                        counts[3] += autoattack_correct(logits, x, y, eps=eps_extra / 255.0,
                                                        seed=gen_extra.initial_seed()).sum()
                else:
                    correct = robust_correct(logits, x, y, eps=cfg.attack.eps_pixels, n_iter=n_iter,
                                             n_targets=n_targets, generator=gen)
                    if eps_extra > 0:
                        counts[3] += robust_correct(logits, x, y, eps=eps_extra / 255.0, n_iter=n_iter,
                                                    n_targets=n_targets, generator=gen_extra).sum()
                counts[2] += correct.sum()
            counts[0] += y.numel()
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(counts)
    n, clean, robust, robust_extra = (int(c) for c in counts)
    _with_interval(out, "clean_acc", clean, n)
    _with_interval(out, "robust_acc", robust, n)
    attack = "autoattack-standard" if autoattack else (
        f"apgd-ce{n_iter}" + (f"+apgd-t{n_iter}x{n_targets}" if n_targets else ""))
    out.update({"n_test": n, "n_clean_correct": clean, "n_robust_correct": robust, "ci": "wilson",
                "attack": attack, "eps": cfg.attack.eps, "precision": precision})
    if eps_extra > 0:
        out["eps_extra"] = float(eps_extra)
        _with_interval(out, "robust_acc_eps_extra", robust_extra, n)
    return out
