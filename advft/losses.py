"""The loss registry: each fine-tuning objective is a pure function of the encoder outputs, plus the
inner objective its attack maximises.

Notation: phi is the trainable encoder, phi_org the frozen original, x the clean batch, z the adversarial
batch (||z - x||_inf <= eps) and t = phi_org(x), a constant.

Conventions: ``d2`` is the squared L2 distance **summed over the embedding dimension** (``reduction =
"sum"``, FARE's) or averaged over it (``"mean"``, i.e. divided by D); ``dcos(a, b) = 1 - cos(a, b)``, the
cosine distance, has no reduction to choose. Every term is averaged over the batch and computed in fp32.

Weights: ``alpha`` weights a clean anchor term added to a FARE-shaped loss; ``beta`` weights the robust
term of a TRADES-shaped loss. A loss reads only the weights named in its :class:`Loss` entry, each with a
default; :func:`resolve_weights` refuses a weight (or a ``mean`` reduction) the loss does not read.

Forwards (:func:`training_loss`): phi(z) and phi(x) are two separate forwards, so that with BatchNorm in
train mode the adversarial term's batch statistics are z's own: its value and gradient depend neither on
alpha nor on the clean batch. Where BN uses running statistics the two are one concatenated forward
(``joint=True``), which computes the same outputs with fewer launches.

Metrics, the same keys for every loss: ``loss`` (what is minimised), ``adv_loss`` and ``clean_loss`` (the
unweighted terms, as each loss defines them; differentiable), ``adv_cos`` / ``clean_cos`` (cosine
similarity of phi(z) / phi(x) to t, detached). ``clean_*`` is absent when no clean forward ran.

Adding a loss: one pure function ``(adv, clean, target, weights) -> dict``, its test, one registry line.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor

from advft.attacks import LossFn, embedding_loss


def squared_distance(a: Tensor, b: Tensor, reduction: str = "sum") -> Tensor:
    """Per-sample squared L2 distance (B,), in fp32: summed (``"sum"``) or averaged (``"mean"``) over dim 1."""
    d = (a.float() - b.float()).pow(2).flatten(1)
    if reduction == "sum":
        return d.sum(1)
    if reduction == "mean":
        return d.mean(1)
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def cosine_distance(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample ``1 - cos(a, b)`` (B,), in fp32: 0 when aligned, 2 when opposite, blind to the norms."""
    return 1 - torch.cosine_similarity(a.float().flatten(1), b.float().flatten(1), dim=1)


def _cos(a: Tensor, t: Tensor) -> Tensor:
    return torch.cosine_similarity(a.detach().float().flatten(1), t.float().flatten(1), dim=1).mean()


@dataclass(frozen=True)
class Weights:
    """The resolved weights of one run (a weight the loss does not read keeps its 0 and is never used)."""

    alpha: float = 0.0
    beta: float = 0.0
    reduction: str = "sum"


# ------------------------------------------------------------------------------------- the losses


def fare(adv: Tensor, clean: Tensor | None, t: Tensor, w: Weights) -> dict[str, Tensor]:
    """FARE (Schlarmann et al., ICML 2024) with the report's clean term:
    ``d2(phi(z), t) + alpha * d2(phi(x), t)``; the attack maximises ``d2(phi(z), t)``."""
    out = {"adv_loss": squared_distance(adv, t, w.reduction).mean(), "adv_cos": _cos(adv, t)}
    out["loss"] = out["adv_loss"]
    if clean is not None:
        out["clean_loss"] = squared_distance(clean, t, w.reduction).mean()
        out["clean_cos"] = _cos(clean, t)
        out["loss"] = out["adv_loss"] + w.alpha * out["clean_loss"]
    return out


def cosine(adv: Tensor, clean: Tensor | None, t: Tensor, w: Weights) -> dict[str, Tensor]:
    """Scale-free FARE: ``dcos(phi(z), t) + alpha * dcos(phi(x), t)``; the attack maximises ``dcos(phi(z), t)``.

    The cosine alignment to a frozen encoder's embedding used by the embedding-alignment methods for CLIP and
    SSL encoders (e.g. the second stage of DeACL, Zhang et al., ECCV 2022), in FARE's structure."""
    out = {"adv_loss": cosine_distance(adv, t).mean(), "adv_cos": _cos(adv, t)}
    out["loss"] = out["adv_loss"]
    if clean is not None:
        out["clean_loss"] = cosine_distance(clean, t).mean()
        out["clean_cos"] = _cos(clean, t)
        out["loss"] = out["adv_loss"] + w.alpha * out["clean_loss"]
    return out


def trades(adv: Tensor, clean: Tensor | None, t: Tensor, w: Weights) -> dict[str, Tensor]:
    """TRADES (Zhang et al., ICML 2019) in embedding space: ``d2(phi(x), t) + beta * d2(phi(z), phi(x))``.

    The attack maximises ``d2(phi(z), phi(x))`` from the CURRENT clean embedding (as TRADES' inner KL moves
    away from the current clean prediction); the robust term's gradient flows through phi(z) and phi(x)."""
    assert clean is not None, "trades needs the clean forward"
    out = {"clean_loss": squared_distance(clean, t, w.reduction).mean(),
           "adv_loss": squared_distance(adv, clean, w.reduction).mean(),
           "adv_cos": _cos(adv, t), "clean_cos": _cos(clean, t)}
    out["loss"] = out["clean_loss"] + w.beta * out["adv_loss"]
    return out


def deacl(adv: Tensor, clean: Tensor | None, t: Tensor, w: Weights) -> dict[str, Tensor]:
    """DeACL's second stage (Zhang et al., "Decoupled Adversarial Contrastive Learning for Self-supervised
    Adversarial Robustness", ECCV 2022): ``dcos(phi(x), t) + beta * dcos(phi(z), phi(x))``.

    The frozen SSL encoder is the teacher (t); the attack maximises ``dcos(phi(z), t)``, away from the
    teacher's embedding (not from the current clean one, unlike trades). The paper writes the terms as
    negative cosine similarities; 1 - cos differs by a constant, so gradients are the same."""
    assert clean is not None, "deacl needs the clean forward"
    out = {"clean_loss": cosine_distance(clean, t).mean(), "adv_loss": cosine_distance(adv, clean).mean(),
           "adv_cos": _cos(adv, t), "clean_cos": _cos(clean, t)}
    out["loss"] = out["clean_loss"] + w.beta * out["adv_loss"]
    return out


TrainFn = Callable[[Tensor, "Tensor | None", Tensor, Weights], dict[str, Tensor]]


@dataclass(frozen=True)
class Loss:
    """A registry entry. ``weights``: the weights the loss reads, with their defaults. ``reduction``: whether
    it reads loss.reduction (squared-L2 losses). ``attack_from``: ``"original"`` (the attack moves phi(z)
    away from t) or ``"current"`` (away from phi(x), the encoder being trained). ``attack_distance``: the
    per-sample distance the attack maximises. ``clean_needed``: whether phi(x) must be computed."""

    fn: TrainFn
    weights: Mapping[str, float]
    reduction: bool
    attack_from: str
    attack_distance: Callable[[Tensor], LossFn]
    clean_needed: Callable[[Weights], bool]


def cosine_objective(anchor: Tensor) -> LossFn:
    """Per-sample ``1 - cos(outputs, anchor)`` for the attack to maximise (anchor a constant)."""
    anchor = anchor.detach()
    return lambda outputs: cosine_distance(outputs, anchor)


def _alpha_positive(w: Weights) -> bool:
    return w.alpha > 0


def _always(w: Weights) -> bool:
    return True


# defaults: alpha as the report's middle value; trades' beta weighs both terms equally (TRADES' own beta sets a
# KL against a cross-entropy, a scale that does not carry over); deacl's beta is the DeACL code's default
LOSSES: dict[str, Loss] = {
    "fare": Loss(fare, {"alpha": 0.1}, True, "original", embedding_loss, _alpha_positive),
    "cosine": Loss(cosine, {"alpha": 0.1}, False, "original", cosine_objective, _alpha_positive),
    "trades": Loss(trades, {"beta": 1.0}, True, "current", embedding_loss, _always),
    "deacl": Loss(deacl, {"beta": 2.0}, False, "original", cosine_objective, _always),
}


# ------------------------------------------------------------------------------ the machinery


def resolve_weights(name: str, alpha: float | None = None, beta: float | None = None,
                    reduction: str = "sum") -> Weights:
    """The weights loss ``name`` runs with: the given ones, the loss's defaults for those left None.

    Raises ValueError (one line naming the key) for an unknown loss, a weight the loss does not read, a
    negative weight, or ``reduction = "mean"`` for a loss without a reduction to choose.
    """
    if name not in LOSSES:
        raise ValueError(f"loss.name = {name!r} is not valid; choose one of: {', '.join(LOSSES)}")
    spec = LOSSES[name]
    reads = ", ".join(f"loss.{k}" for k in spec.weights)
    given = {"alpha": alpha, "beta": beta}
    for key, value in given.items():
        if value is None:
            continue
        if key not in spec.weights:
            raise ValueError(f"loss.{key} = {value} is not read by loss.name = {name!r} (it reads {reads}); "
                             f"remove loss.{key}")
        if value < 0:
            raise ValueError(f"loss.{key} = {value} must be >= 0")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"loss.reduction = {reduction!r} is not valid; choose one of: sum, mean")
    if reduction != "sum" and not spec.reduction:
        raise ValueError(f"loss.reduction = {reduction!r} is not read by loss.name = {name!r} (a cosine distance "
                         f"has no reduction over the dimension); remove loss.reduction")
    vals = {k: float(given[k]) if given[k] is not None else float(d) for k, d in spec.weights.items()}
    return Weights(reduction=reduction, **vals)


def attack_objective(name: str, forward: Callable[[Tensor], Tensor], x: Tensor, target: Tensor) -> LossFn:
    """The per-sample objective the attack maximises for loss ``name``.

    ``forward`` is the attack's view of phi (eval mode, frozen, under the run's autocast); a loss that
    attacks from the current clean embedding computes phi(x) with it once, without gradient.
    """
    spec = LOSSES[name]
    if spec.attack_from == "original":
        return spec.attack_distance(target)
    with torch.no_grad():
        anchor = forward(x).float()
    return spec.attack_distance(anchor)


def training_loss(name: str, encoder: Callable[[Tensor], Tensor], z: Tensor, x: Tensor, target: Tensor,
                  weights: Weights, joint: bool = False) -> dict[str, Tensor]:
    """The training loss of one batch: the encoder's forwards, then the loss's formula.

    ``joint=True`` runs phi(z) and phi(x) as one concatenated forward: only for an encoder whose BatchNorm
    layers use running statistics (then the outputs are the same); otherwise two forwards, z first.
    The clean forward is skipped when the loss does not need it (fare/cosine at alpha = 0).
    Returns the differentiable ``loss`` and terms beside detached cosines (module docstring).
    """
    spec = LOSSES[name]
    if not spec.clean_needed(weights):
        return spec.fn(encoder(z), None, target, weights)
    if joint:
        b = x.shape[0]
        out = encoder(torch.cat([z, x], 0))
        adv, clean = out[:b], out[b:]
    else:
        adv, clean = encoder(z), encoder(x)
    return spec.fn(adv, clean, target, weights)

