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
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from advft.attacks import robust_correct
from advft.distributed import autocast
from advft.report.stats import wilson

# a fresh pass over the batches; advft.data.eval_data's also take final=True (the final evaluation's sets)
Batches = Callable[..., Iterable[tuple[Tensor, Tensor]]]


@torch.no_grad()
def extract_features(encoder: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device,
                     precision: str = "fp32") -> tuple[Tensor, Tensor]:
    """Features (N, D) in fp32 and labels (N,), on ``device``; the encoder must already be in eval mode."""
    feats, labels = [], []
    for x, y in batches:
        with autocast(device, precision):
            feats.append(encoder(x.to(device)).float())
        labels.append(y.to(device))
    return torch.cat(feats), torch.cat(labels)


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
             eps_extra: float = 0.0) -> dict[str, Any]:
    """Clean and robust accuracy (in %, on the test subset) of a probe (or the fixed ``head``) on ``encoder``,
    each with ``<key>_ci95`` (95 % Wilson interval, in %) and ``n_test``; ``ci`` names the method.

    ``cfg`` is the run's Config: eps (attack.eps, 1/255 units), probe epochs are read from it, and the
    precision unless ``precision`` gives the run's resolved one (:func:`advft.distributed.resolve_precision`).
    ``final``: the strong evaluation (the final sets and ``eval.final_attack``; see the module docstring).
    ``eps_extra`` > 0 (1/255 units) adds ``robust_acc_eps_extra``: robust accuracy at that radius too.
    """
    encoder.eval()
    precision = precision or cfg.run.precision
    sets = {"final": True} if final else {}
    autoattack = final and getattr(cfg.eval, "final_attack", "apgd") == "autoattack"
    out: dict[str, Any] = {}
    if head is None:
        f, y = extract_features(encoder, probe_data(**sets), device, precision)
        # classes = largest label + 1 of the probe set (no dataset metadata needed for ffcv/dali files)
        head = fit_probe(f, y, int(y.max()) + 1, epochs=cfg.eval.probe_epochs)
        _with_interval(out, "probe_train_acc", int((head(f).argmax(1) == y).sum()), int(y.numel()))
        out["probe_n"] = int(y.numel())

    def logits(x: Tensor) -> Tensor:
        with autocast(device, precision):
            return head(encoder(x)).float()

    gen = torch.Generator(device=device)
    gen.manual_seed(seed + 12345)
    # its own random stream, so that adding the second radius leaves the first one's numbers unchanged
    gen_extra = torch.Generator(device=device)
    gen_extra.manual_seed(seed + 54321)
    n = clean = robust = robust_extra = 0
    for x, y in test_data(**sets):
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            clean += int((logits(x).argmax(1) == y).sum())
        with torch.enable_grad():
            if autoattack:
                from advft.autoattack import autoattack_correct

                correct = autoattack_correct(logits, x, y, eps=cfg.attack.eps_pixels, seed=seed + 12345)
                if eps_extra > 0:
                    robust_extra += int(autoattack_correct(logits, x, y, eps=eps_extra / 255.0,
                                                           seed=seed + 54321).sum())
            else:
                correct = robust_correct(logits, x, y, eps=cfg.attack.eps_pixels, n_iter=n_iter,
                                         n_targets=n_targets, generator=gen)
                if eps_extra > 0:
                    robust_extra += int(robust_correct(logits, x, y, eps=eps_extra / 255.0, n_iter=n_iter,
                                                       n_targets=n_targets, generator=gen_extra).sum())
            robust += int(correct.sum())
        n += int(y.numel())
    _with_interval(out, "clean_acc", clean, n)
    _with_interval(out, "robust_acc", robust, n)
    attack = "autoattack-standard" if autoattack else (
        f"apgd-ce{n_iter}" + (f"+apgd-t{n_iter}x{n_targets}" if n_targets else ""))
    out.update({"n_test": n, "ci": "wilson", "attack": attack, "eps": cfg.attack.eps})
    if eps_extra > 0:
        out["eps_extra"] = float(eps_extra)
        _with_interval(out, "robust_acc_eps_extra", robust_extra, n)
    return out
