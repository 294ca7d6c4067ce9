"""The loss registry: each loss against its formula, its attack objective, its weights, and BatchNorm
statistics that never couple the adversarial and the clean terms."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from advft.attacks import apgd
from advft.losses import (LOSSES, Weights, attack_objective, cosine_distance, resolve_weights, squared_distance,
                          training_loss)


def _encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(24, 5))


def _batches(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 3, 8, 8, generator=g)
    z = (x + 0.03 * (2 * torch.rand(x.shape, generator=g) - 1)).clamp(0, 1)
    return z, x, torch.randn(6, 5, generator=g)


def _d2(red):
    return lambda a, b: squared_distance(a, b, red)


# the formulas, written out from the docstrings: (adv, clean, t, w) -> loss
FORMULAS = {
    "fare": lambda a, c, t, w: _d2(w.reduction)(a, t).mean() + w.alpha * _d2(w.reduction)(c, t).mean(),
    "cosine": lambda a, c, t, w: (1 - torch.cosine_similarity(a, t)).mean()
    + w.alpha * (1 - torch.cosine_similarity(c, t)).mean(),
    "trades": lambda a, c, t, w: _d2(w.reduction)(c, t).mean() + w.beta * _d2(w.reduction)(a, c).mean(),
    "deacl": lambda a, c, t, w: (1 - torch.cosine_similarity(c, t)).mean()
    + w.beta * (1 - torch.cosine_similarity(a, c)).mean(),
}


def _settings():
    for name, spec in LOSSES.items():
        for value in (0.0, 0.3, 2.0):
            for red in ("sum", "mean") if spec.reduction else ("sum",):
                yield name, {k: value for k in spec.weights}, red


def test_every_registered_loss_has_a_formula_here():
    assert set(FORMULAS) == set(LOSSES)


@pytest.mark.parametrize("name,weights,reduction", list(_settings()))
def test_loss_equals_its_formula(name, weights, reduction):
    enc = _encoder().eval()  # running statistics: phi(z) and phi(x) below are what the loss saw
    z, x, t = _batches()
    w = resolve_weights(name, reduction=reduction, **weights)
    out = training_loss(name, enc, z, x, t, w)
    with torch.no_grad():
        expected = FORMULAS[name](enc(z), enc(x), t, w)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-6, atol=1e-6)
    assert out["loss"].requires_grad and out["adv_loss"].requires_grad
    with torch.no_grad():
        torch.testing.assert_close(out["adv_cos"], torch.cosine_similarity(enc(z), t).mean())


def test_the_losses_vanish_where_their_formulas_do():
    a = torch.randn(4, 5)
    w = Weights(alpha=1.0, beta=1.0)
    for name in LOSSES:
        assert LOSSES[name].fn(a, a, a, w)["loss"].abs().max() < 1e-6, name
    # cosine losses are blind to the norm, squared-L2 ones are not
    assert LOSSES["cosine"].fn(3 * a, 2 * a, a, w)["loss"].abs() < 1e-6
    assert LOSSES["fare"].fn(3 * a, 2 * a, a, w)["loss"] > 1
    torch.testing.assert_close(cosine_distance(a, -a), torch.full((4,), 2.0))


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 5)
        self.batches: list[int] = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.lin(x.flatten(1))


@pytest.mark.parametrize("name", list(LOSSES))
def test_forwards_separate_unless_joint_and_clean_skipped_when_unused(name):
    x, z, t = torch.rand(4, 3, 2, 2), torch.rand(4, 3, 2, 2), torch.randn(4, 5)
    enc = Counting()
    w = resolve_weights(name)
    out = training_loss(name, enc, z, x, t, w)
    assert enc.batches == [4, 4] and "clean_loss" in out
    enc.batches.clear()
    training_loss(name, enc, z, x, t, w, joint=True)
    assert enc.batches == [8]
    if "alpha" in LOSSES[name].weights:  # the clean term is weighted by alpha: no clean forward at 0
        enc.batches.clear()
        out = training_loss(name, enc, z, x, t, resolve_weights(name, alpha=0))
        assert enc.batches == [4] and "clean_loss" not in out


def _term_and_grad(enc, name, term, z, x, t, w, joint=False):
    out = training_loss(name, enc, z, x, t, w, joint)
    grads = torch.autograd.grad(out[term], list(enc.parameters()))
    return out[term].detach(), grads


def _same(a, b) -> bool:
    return torch.equal(a[0], b[0]) and all(torch.equal(u, v) for u, v in zip(a[1], b[1]))


@pytest.mark.parametrize("name", ["fare", "cosine"])
def test_adversarial_term_with_train_bn_depends_neither_on_alpha_nor_on_the_clean_batch(name):
    enc = _encoder().train()
    z, x, t = _batches()
    other_x = _batches(seed=7)[1]
    at = {a: _term_and_grad(enc, name, "adv_loss", z, x, t, resolve_weights(name, alpha=a)) for a in (0.0, 1.0)}
    other = _term_and_grad(enc, name, "adv_loss", z, other_x, t, resolve_weights(name, alpha=1.0))
    assert _same(at[0.0], at[1.0]) and _same(at[0.0], other)
    # the check has teeth: one concatenated forward in train mode (shared batch statistics) changes the term
    joint = _term_and_grad(enc, name, "adv_loss", z, x, t, resolve_weights(name, alpha=1.0), joint=True)
    assert not torch.allclose(joint[0], at[0.0][0], rtol=1e-4)


@pytest.mark.parametrize("name", list(LOSSES))
def test_clean_term_with_train_bn_does_not_depend_on_the_adversarial_batch(name):
    enc = _encoder().train()
    z, x, t = _batches()
    other_z = _batches(seed=7)[0]
    w = resolve_weights(name, **{k: 1.0 for k in LOSSES[name].weights})
    a = _term_and_grad(enc, name, "clean_loss", z, x, t, w)
    b = _term_and_grad(enc, name, "clean_loss", other_z, x, t, w)
    assert _same(a, b)


@pytest.mark.parametrize("name", list(LOSSES))
def test_joint_forward_equals_separate_forwards_with_eval_bn(name):
    enc = _encoder()
    enc[1].running_mean.normal_()  # non-trivial running statistics
    enc.eval()
    z, x, t = _batches()
    w = resolve_weights(name)
    one = training_loss(name, enc, z, x, t, w, joint=True)
    two = training_loss(name, enc, z, x, t, w)
    for k in ("loss", "adv_loss", "clean_loss"):
        torch.testing.assert_close(one[k], two[k], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ the attack


def test_attack_objectives_are_the_distances_each_loss_names():
    enc = _encoder().eval()
    z, x, t = _batches()
    with torch.no_grad():
        pz, px = enc(z), enc(x)
        for name, expected in {"fare": squared_distance(pz, t), "cosine": cosine_distance(pz, t),
                               "trades": squared_distance(pz, px), "deacl": cosine_distance(pz, t)}.items():
            torch.testing.assert_close(attack_objective(name, enc, x, t)(pz), expected, msg=name)


def test_trades_attacks_from_the_current_clean_embedding_not_the_original():
    enc = _encoder().eval()
    _, x, t = _batches()
    with torch.no_grad():
        px = enc(x)
    # at z = x there is nothing to move away from for trades; fare's objective is the distance to t
    assert attack_objective("trades", enc, x, t)(px).abs().max() == 0
    assert attack_objective("fare", enc, x, t)(px).min() > 0


@pytest.mark.parametrize("name", list(LOSSES))
def test_the_attack_maximises_its_loss_objective_beyond_random_noise(name):
    enc = _encoder().eval()
    _, x, _ = _batches()
    eps = 8 / 255
    for p in enc.parameters():
        p.requires_grad_(False)
    t = enc(x)  # phi_org = phi before fine-tuning: every objective starts near 0
    objective = attack_objective(name, enc, x, t)
    g = torch.Generator().manual_seed(3)
    noise = (x + eps * (2 * torch.rand(x.shape, generator=g) - 1)).clamp(0, 1)
    z = apgd(enc, x, objective, eps=eps, n_iter=20, generator=g)
    with torch.no_grad():
        assert objective(enc(z)).mean() > 2 * objective(enc(noise)).mean()
    assert (z - x).abs().max() <= eps + 1e-6


# ---------------------------------------------------------------------------------- the weights


def test_weights_default_per_loss_and_given_ones_win():
    assert resolve_weights("fare") == Weights(alpha=0.1)
    assert resolve_weights("fare", alpha=0) == Weights(alpha=0.0)
    assert resolve_weights("trades", beta=6) == Weights(beta=6.0)
    assert resolve_weights("deacl").beta == LOSSES["deacl"].weights["beta"]
    assert resolve_weights("trades", reduction="mean").reduction == "mean"


@pytest.mark.parametrize("name,kwargs,message", [
    ("fare", {"beta": 1.0},
     "loss.beta = 1.0 is not read by loss.name = 'fare' (it reads loss.alpha); remove loss.beta"),
    ("cosine", {"beta": 0.0}, "loss.beta = 0.0 is not read by loss.name = 'cosine'"),
    ("trades", {"alpha": 0.1}, "loss.alpha = 0.1 is not read by loss.name = 'trades' (it reads loss.beta)"),
    ("deacl", {"alpha": 1.0}, "loss.alpha = 1.0 is not read by loss.name = 'deacl'"),
    ("cosine", {"reduction": "mean"}, "loss.reduction = 'mean' is not read by loss.name = 'cosine'"),
    ("fare", {"alpha": -1.0}, "loss.alpha = -1.0 must be >= 0"),
    ("trades", {"beta": -0.5}, "loss.beta = -0.5 must be >= 0"),
    ("l1", {}, "loss.name = 'l1' is not valid; choose one of: fare, cosine, trades, deacl"),
])
def test_a_weight_the_loss_does_not_read_is_refused_in_one_line(name, kwargs, message):
    with pytest.raises(ValueError) as e:
        resolve_weights(name, **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)
