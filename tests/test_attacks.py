"""Tests of advft.attacks: threat model, strength, the FARE step-0 pitfall, purity, sharding, losses.

Everything runs on CPU in a few seconds. The classifier is trained here on synthetic images: five
classes, each a random prototype image of low contrast plus Gaussian noise. Clean accuracy is ~100%,
but the prototypes differ by only a few grey levels per pixel, so eps = 5/255 breaks about half of
the test set: robust accuracy is neither 0 nor 1, and a weaker attack shows.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advft.attacks import (
    _loss_and_grad,
    _top_other_classes,
    apgd,
    apgd_checkpoints,
    ce_loss,
    dlr_loss,
    embedding_loss,
    pgd,
    robust_correct,
    targeted_dlr_loss,
)

N_CLASSES = 5
SHAPE = (3, 8, 8)
EPS = 5 / 255


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: a second thread only adds contention


def _images(n: int, prototypes: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    x = (prototypes[y] + 0.05 * torch.randn(n, *SHAPE, generator=g)).clamp(0.0, 1.0)
    return x, y


def _trained_classifier() -> tuple[nn.Module, Tensor, Tensor]:
    """A small MLP trained for about a second; returns (model in eval mode, x_test, y_test)."""
    g = torch.Generator().manual_seed(0)
    prototypes = 0.5 + 0.1 * (torch.rand(N_CLASSES, *SHAPE, generator=g) - 0.5)
    x_train, y_train = _images(2048, prototypes, g)
    x_test, y_test = _images(256, prototypes, g)
    init_g = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), 64), nn.ReLU(), nn.Linear(64, N_CLASSES))
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.1, 0.1, generator=init_g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        idx = torch.randint(0, len(x_train), (256,), generator=g)
        loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return model, x_test, y_test


@pytest.fixture(scope="module")
def task() -> tuple[nn.Module, Tensor, Tensor]:
    return _trained_classifier()


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def _encoder() -> nn.Module:
    g = torch.Generator().manual_seed(2)
    enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 16))
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0.0, 0.2, generator=g)
    return enc.eval()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------ schedule, losses


def test_checkpoint_schedule_matches_the_paper() -> None:
    # p = 0, .22, .41, .57, .70, .80, .87, .93, .99, 1.05 -> w = ceil(p * n), last iteration excluded.
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    # ceil(2.2, 4.1, 5.7, 7.0, 8.0, 8.7, 9.3, 9.9); 7.0 must not round up to 8 by float error.
    assert apgd_checkpoints(10) == [3, 5, 6, 7, 8, 9]
    assert apgd_checkpoints(1) == []


def test_embedding_loss_is_per_sample_sum_of_squares() -> None:
    target = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    out = torch.tensor([[1.0, 0.0, 4.0], [3.0, -4.0, 0.0]])
    torch.testing.assert_close(embedding_loss(target)(out), torch.tensor([4.0 + 1.0, 9.0 + 16.0]))
    assert embedding_loss(target)(target).abs().max().item() == 0.0


def test_ce_loss_is_per_sample() -> None:
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    expected = torch.tensor([math.log(2.0), math.log(1.0 + math.exp(2.0))])
    torch.testing.assert_close(ce_loss(torch.tensor([1, 1]))(logits), expected)


def test_dlr_loss_on_hand_computed_examples() -> None:
    logits = torch.tensor([[4.0, 1.0, 2.0, 0.0], [1.0, 5.0, 3.0, 0.0]])
    labels = torch.tensor([0, 0])
    # sample 0: correct; z_y=4, best other=2, z_pi1 - z_pi3 = 4 - 1 -> -(4 - 2) / 3
    # sample 1: wrong;   z_y=1, best other=5, z_pi1 - z_pi3 = 5 - 1 -> -(1 - 5) / 4
    torch.testing.assert_close(dlr_loss(labels)(logits), torch.tensor([-2.0 / 3.0, 1.0]))
    # invariant to shifting and (positive) scaling of the logits
    torch.testing.assert_close(dlr_loss(labels)(3.0 * logits + 7.0), torch.tensor([-2.0 / 3.0, 1.0]))


def test_targeted_dlr_loss_on_hand_computed_examples() -> None:
    logits = torch.tensor([[4.0, 1.0, 2.0, 0.0, -2.0], [1.0, 5.0, 3.0, 0.0, 2.0]])
    labels = torch.tensor([0, 0])
    targets = torch.tensor([1, 2])
    # sample 0: sorted 4, 2, 1, 0, -2: -(4 - 1) / (4 - (1 + 0) / 2) = -3 / 3.5
    # sample 1: sorted 5, 3, 2, 1, 0:  -(1 - 3) / (5 - (2 + 1) / 2) = 2 / 3.5
    expected = torch.tensor([-3.0 / 3.5, 2.0 / 3.5])
    torch.testing.assert_close(targeted_dlr_loss(labels, targets)(logits), expected)


# ---------------------------------------------------------------------------------------- threat model


def _in_threat_model(x_adv: Tensor, x: Tensor, eps: float) -> None:
    assert x_adv.dtype == torch.float32
    assert x_adv.shape == x.shape
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0


@pytest.mark.parametrize("attack", [apgd, pgd])
@pytest.mark.parametrize("bf16", [False, True])
def test_result_inside_ball_and_image_range(attack, bf16: bool, task) -> None:
    model, x, y = task
    # Push some pixels to the borders of [0, 1] so that the range clamp is exercised.
    x = x.clone()
    x[:, 0, :2] = 0.0
    x[:, 1, :2] = 1.0
    eps = 8 / 255
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with autocast:
        x_adv = attack(model, x, ce_loss(y), eps=eps, n_iter=5, generator=_gen(0))
    _in_threat_model(x_adv, x, eps)
    assert (x_adv != x).any()  # it moved
    # bf16 input is promoted: the attack state never lives in bf16
    with autocast:
        x_adv16 = attack(model, x.bfloat16(), ce_loss(y), eps=eps, n_iter=3, generator=_gen(0))
    assert x_adv16.dtype == torch.float32


def test_embedding_attack_under_bf16_autocast_stays_fp32() -> None:
    enc = _encoder()
    x = torch.rand(8, *SHAPE, generator=_gen(3))
    with torch.no_grad():
        target = enc(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = apgd(enc, x, embedding_loss(target), eps=8 / 255, n_iter=4, generator=_gen(0))
    _in_threat_model(x_adv, x, 8 / 255)


def test_a_loss_returned_in_bf16_is_compared_in_fp32(task) -> None:
    model, x, y = task
    ce = ce_loss(y)
    as_bf16 = apgd(model, x, lambda out: ce(out).bfloat16(), eps=EPS, n_iter=10, generator=_gen(0))
    as_fp32 = apgd(model, x, lambda out: ce(out).bfloat16().float(), eps=EPS, n_iter=10, generator=_gen(0))
    assert as_bf16.dtype == torch.float32
    assert torch.equal(as_bf16, as_fp32)


# ------------------------------------------------------------------------------------------- strength


def test_apgd_at_least_as_strong_as_pgd_and_both_break_the_classifier(task) -> None:
    model, x, y = task
    clean = _accuracy(model, x, y)
    adv_apgd = _accuracy(model, apgd(model, x, ce_loss(y), eps=EPS, n_iter=10, generator=_gen(0)), y)
    adv_pgd = _accuracy(model, pgd(model, x, ce_loss(y), eps=EPS, n_iter=10, generator=_gen(0)), y)
    noise = _accuracy(model, (x + EPS * (2 * torch.rand(x.shape, generator=_gen(0)) - 1)).clamp(0, 1), y)
    assert clean >= 0.95
    assert noise >= clean - 0.02  # random noise of the same size does not do it; the gradient does
    assert adv_pgd <= clean - 0.2
    assert adv_apgd <= clean - 0.2
    assert adv_apgd <= adv_pgd + 1 / len(y)  # at most one sample of slack


# ------------------------------------------------------------------------ APGD against a plain reference


def _reference_checkpoints(n_iter: int) -> list[int]:
    """Algorithm 1's checkpoints in exact rational arithmetic, independently of advft.attacks."""
    p = [Fraction(0), Fraction(22, 100)]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - Fraction(3, 100), Fraction(6, 100)))
    return sorted({math.ceil(q * n_iter) for q in p[1:]})


def _reference_apgd_one(
    f: Callable[[Tensor], Tensor], x: Tensor, eps: float, n_iter: int, init: Tensor,
    momentum: float = 0.75, rho: float = 0.75,
) -> tuple[list[Tensor], list[int]]:
    """Algorithm 1 of Croce & Hein (2020) for ONE sample, written with plain Python control flow.

    ``f`` maps a (1, ...) image to a (1,) loss. Returns every evaluated point and the iterations
    after which the step size was halved.
    """

    def project(z: Tensor) -> Tensor:
        return torch.min(torch.max(z, x - eps), x + eps).clamp(0.0, 1.0)

    def value_and_grad(z: Tensor) -> tuple[float, Tensor]:
        z = z.clone().requires_grad_(True)
        loss = f(z).sum()
        (g,) = torch.autograd.grad(loss, z)
        return loss.item(), g

    checkpoints = set(_reference_checkpoints(n_iter))
    eta = 2 * eps
    x_cur = project(x + eps * init)
    f_cur, g_cur = value_and_grad(x_cur)
    x_prev = x_cur
    f_best, x_best, g_best = f_cur, x_cur, g_cur
    points = [x_cur]
    last_w, eta_at_last_w, f_best_at_last_w, increases, halvings = 0, eta, f_best, 0, []
    for t in range(1, n_iter + 1):
        z = project(x_cur + eta * g_cur.sign())
        if t > 1:
            z = project(x_cur + momentum * (z - x_cur) + (1 - momentum) * (x_cur - x_prev))
        f_new, g_new = value_and_grad(z)
        points.append(z)
        increases += f_new > f_cur
        if f_new > f_best:
            f_best, x_best, g_best = f_new, z, g_new
        x_prev, x_cur, f_cur, g_cur = x_cur, z, f_new, g_new
        if t in checkpoints and t < n_iter:
            condition_1 = increases < rho * (t - last_w)
            condition_2 = eta == eta_at_last_w and f_best == f_best_at_last_w
            eta_at_last_w = eta
            if condition_1 or condition_2:
                eta /= 2
                x_cur, f_cur, g_cur = x_best, f_best, g_best
                halvings.append(t)
            last_w, f_best_at_last_w, increases = t, f_best, 0
    return points, halvings


def _wavy() -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """A bumpy, batch-independent float64 'encoder' and a batch of images: halvings vary per sample."""
    g = _gen(13)
    # periods of 0.02-0.06 against steps of up to 2 * 8/255: the loss along the path is erratic
    freq = 100 + 200 * torch.rand(SHAPE, generator=g, dtype=torch.float64)
    phase = 6.3 * torch.rand(SHAPE, generator=g, dtype=torch.float64)

    def forward(z: Tensor) -> Tensor:
        return torch.sin(freq * z + phase).flatten(1)

    x = torch.rand(8, *SHAPE, generator=g, dtype=torch.float64)
    return forward, x


@pytest.mark.parametrize("rho", [0.75, 0.0])  # rho = 0 switches condition 1 off: only condition 2 halves
def test_apgd_follows_algorithm_1_step_by_step(rho: float) -> None:
    forward, x = _wavy()
    target = forward(x) + 0.3
    eps, n_iter = 8 / 255, 20
    init = 2 * torch.rand(x.shape, generator=_gen(14), dtype=torch.float64) - 1
    seen: list[Tensor] = []

    def recording_forward(z: Tensor) -> Tensor:
        seen.append(z.detach().clone())
        return forward(z)

    x_adv = apgd(recording_forward, x, embedding_loss(target), eps=eps, n_iter=n_iter, init=init, rho=rho)
    assert x_adv.dtype == torch.float64
    assert len(seen) == n_iter + 1  # n_iter gradients (random start included) + the last point's loss
    halvings = []
    for i in range(len(x)):
        one = embedding_loss(target[i : i + 1])
        points, halved_at = _reference_apgd_one(
            lambda z, one=one: one(forward(z)), x[i : i + 1], eps, n_iter, init[i : i + 1], rho=rho
        )
        ours = torch.cat([p[i : i + 1] for p in seen])
        torch.testing.assert_close(ours, torch.cat(points), rtol=0, atol=1e-12)
        halvings.append(tuple(halved_at))
    # the example exercises the per-sample step-size logic: samples halve at different checkpoints,
    # and condition 2 also fires at the first checkpoint (step size unchanged since the start)
    assert len(set(halvings)) > 1
    first_checkpoint = _reference_checkpoints(n_iter)[0]
    assert any(first_checkpoint in h for h in halvings)


@pytest.mark.parametrize("attack", [apgd, pgd])
def test_returns_exactly_the_best_point_seen(attack) -> None:
    forward, x = _wavy()
    target = forward(x) + 0.3
    losses: list[Tensor] = []
    loss = embedding_loss(target)

    def recording_loss(out: Tensor) -> Tensor:
        value = loss(out)
        losses.append(value.detach().clone())
        return value

    x_adv = attack(forward, x, recording_loss, eps=8 / 255, n_iter=10, generator=_gen(0))
    seen = torch.stack(losses)  # (n_iter + 1, B)
    torch.testing.assert_close(loss(forward(x_adv)), seen.max(dim=0).values, rtol=0, atol=1e-12)
    assert (seen[-1] < seen.max(dim=0).values).any()  # the last iterate is not always the best


def test_apgd_returns_best_iterate_not_below_its_start(task) -> None:
    model, x, y = task
    init = 2 * torch.rand(x.shape, generator=_gen(5)) - 1
    start = (x + EPS * init).clamp(x - EPS, x + EPS).clamp(0, 1)
    loss = ce_loss(y)
    x_adv = apgd(model, x, loss, eps=EPS, n_iter=10, init=init)
    with torch.no_grad():
        at_start, at_end = loss(model(start)), loss(model(x_adv))
    assert (at_end >= at_start - 1e-6).all()
    assert (at_end > at_start).float().mean().item() > 0.9


def test_fare_step_zero_identity_pitfall() -> None:
    """phi == phi_org: loss and gradient are exactly zero at z = x; only the random start moves it."""
    phi = _encoder()
    x = torch.rand(16, *SHAPE, generator=_gen(4))
    with torch.no_grad():
        target = phi(x)
    loss = embedding_loss(target)

    z = x.clone().requires_grad_(True)
    (grad_at_x,) = torch.autograd.grad(loss(phi(z)).sum(), z)
    assert grad_at_x.abs().max().item() == 0.0  # plain PGD from x (no random start) would never move

    eps = 8 / 255
    init = 2 * torch.rand(x.shape, generator=_gen(6)) - 1
    start = (x + eps * init).clamp(0, 1)
    x_adv = apgd(phi, x, loss, eps=eps, n_iter=10, init=init)
    with torch.no_grad():
        at_start, at_end = loss(phi(start)), loss(phi(x_adv))
    assert (at_end > 0).all()
    assert (at_end > 10 * at_start).all()


# -------------------------------------------------------------------------------------------- purity


@pytest.mark.parametrize("attack", [apgd, pgd])
def test_same_seed_same_result_different_seed_different(attack, task) -> None:
    model, x, y = task
    a = attack(model, x, ce_loss(y), eps=EPS, n_iter=5, generator=_gen(7))
    b = attack(model, x, ce_loss(y), eps=EPS, n_iter=5, generator=_gen(7))
    c = attack(model, x, ce_loss(y), eps=EPS, n_iter=5, generator=_gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("attack", [apgd, pgd])
@pytest.mark.parametrize("seeded", [True, False])
def test_global_rng_is_left_alone(attack, seeded: bool, task) -> None:
    model, x, y = task
    torch.manual_seed(123)
    before = torch.get_rng_state()
    attack(model, x, ce_loss(y), eps=EPS, n_iter=3, generator=_gen(0) if seeded else None)
    assert torch.equal(torch.get_rng_state(), before)


def test_generator_none_draws_fresh_noise(task) -> None:
    model, x, y = task
    a = apgd(model, x, ce_loss(y), eps=EPS, n_iter=2)
    b = apgd(model, x, ce_loss(y), eps=EPS, n_iter=2)
    assert not torch.equal(a, b)


def test_parameters_and_their_grad_untouched() -> None:
    phi = _encoder()
    assert all(p.requires_grad for p in phi.parameters())
    before = {k: v.clone() for k, v in phi.state_dict().items()}
    x = torch.rand(4, *SHAPE, generator=_gen(9))
    with torch.no_grad():
        target = phi(x) + 0.1
    apgd(phi, x, embedding_loss(target), eps=EPS, n_iter=4, generator=_gen(0))
    pgd(phi, x, embedding_loss(target), eps=EPS, n_iter=4, generator=_gen(0))
    assert all(p.grad is None for p in phi.parameters())
    assert all(torch.equal(before[k], v) for k, v in phi.state_dict().items())


@pytest.mark.parametrize("attack", [apgd, pgd])
def test_wrt_params_takes_the_parameter_gradients_too_and_changes_nothing_else(attack) -> None:
    """The costlier route (a full backward's work, results dropped) finds the same points, leaves .grad
    alone, and really differentiates the parameters once per gradient evaluation."""
    phi = _encoder()
    x = torch.rand(4, *SHAPE, generator=_gen(9))
    with torch.no_grad():
        loss_fn = embedding_loss(phi(x) + 0.1)
    n_iter = 4
    calls = {"n": 0}

    def count(grad: Tensor) -> None:
        calls["n"] += 1

    hooks = [p.register_hook(count) for p in phi.parameters()]
    plain = attack(phi, x, loss_fn, eps=EPS, n_iter=n_iter, generator=_gen(0))
    assert calls["n"] == 0
    full = attack(phi, x, loss_fn, eps=EPS, n_iter=n_iter, generator=_gen(0), wrt_params=phi.parameters())
    for h in hooks:
        h.remove()
    assert calls["n"] == n_iter * len(list(phi.parameters()))  # every gradient evaluation, every parameter
    assert not torch.equal(plain, x)
    torch.testing.assert_close(full, plain, rtol=0, atol=1e-7)
    assert all(p.grad is None for p in phi.parameters())
    z = x + EPS * (2 * torch.rand(x.shape, generator=_gen(3)) - 1)
    (loss_a, grad_a), (loss_b, grad_b) = (_loss_and_grad(phi, loss_fn, z, True, params)
                                          for params in ((), tuple(phi.parameters())))
    torch.testing.assert_close(grad_b, grad_a, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    with pytest.raises(ValueError, match="wrt_params"):
        attack(phi, x, loss_fn, eps=EPS, n_iter=2, wrt_params=[torch.zeros(3)])


def test_works_when_called_under_no_grad(task) -> None:
    model, x, y = task
    with torch.no_grad():
        x_adv = apgd(model, x, ce_loss(y), eps=EPS, n_iter=5, generator=_gen(0))
    assert _accuracy(model, x_adv, y) < _accuracy(model, x, y)


def _refuse(name: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"host synchronisation inside the attack: Tensor.{name}")

    return refuse


def _patch_host_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every Python-level way of reading a tensor value on the host raise."""
    for name in ["item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy", "nonzero"]:
        monkeypatch.setattr(torch.Tensor, name, _refuse(name), raising=True)
    monkeypatch.setattr(torch, "nonzero", _refuse("nonzero"))
    getitem, setitem = torch.Tensor.__getitem__, torch.Tensor.__setitem__

    def _has_mask(index) -> bool:
        parts = index if isinstance(index, tuple) else (index,)
        return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)

    def checked_getitem(self, index):
        if _has_mask(index):
            raise AssertionError("host synchronisation inside the attack: boolean-mask indexing")
        return getitem(self, index)

    def checked_setitem(self, index, value):
        if _has_mask(index):
            raise AssertionError("host synchronisation inside the attack: boolean-mask assignment")
        return setitem(self, index, value)

    monkeypatch.setattr(torch.Tensor, "__getitem__", checked_getitem)
    monkeypatch.setattr(torch.Tensor, "__setitem__", checked_setitem)


@pytest.mark.parametrize("attack", [apgd, pgd])
def test_no_host_sync_in_the_attack(attack, task, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x, y = task
    phi = _encoder()
    with torch.no_grad():
        target = phi(x[:32])
    _patch_host_syncs(monkeypatch)
    # the patch bites: a function that reads a value or masks on the host is caught
    with pytest.raises(AssertionError):
        bool(x[0, 0, 0, 0] > 0)
    with pytest.raises(AssertionError):
        x[x > 0.5]
    for loss_fn, fwd, xb in [
        (ce_loss(y), model, x),
        (dlr_loss(y), model, x),
        (embedding_loss(target), phi, x[:32]),
    ]:
        attack(fwd, xb, loss_fn, eps=EPS, n_iter=10, generator=_gen(0))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for torch.cuda.set_sync_debug_mode")
def test_no_host_sync_on_gpu() -> None:
    phi = _encoder().cuda()
    x = torch.rand(8, *SHAPE, device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        target = phi(x)
    g = torch.Generator("cuda").manual_seed(0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            x_adv = apgd(phi, x, embedding_loss(target), eps=8 / 255, n_iter=10, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _in_threat_model(x_adv, x, 8 / 255)


# ---------------------------------------------------------------------------------- init and sharding


@pytest.mark.parametrize("attack", [apgd, pgd])
def test_init_overrides_generator(attack, task) -> None:
    model, x, y = task
    init = 2 * torch.rand(x.shape, generator=_gen(10)) - 1
    a = attack(model, x, ce_loss(y), eps=EPS, n_iter=5, init=init, generator=_gen(0))
    b = attack(model, x, ce_loss(y), eps=EPS, n_iter=5, init=init, generator=_gen(1))
    c = attack(model, x, ce_loss(y), eps=EPS, n_iter=5, init=init)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_init_with_wrong_shape_is_rejected(task) -> None:
    model, x, y = task
    with pytest.raises(ValueError, match="init"):
        apgd(model, x, ce_loss(y), eps=EPS, n_iter=2, init=torch.zeros(1, *SHAPE))


def test_two_shards_equal_one_process() -> None:
    """What a data-parallel job does: one global noise tensor, each rank attacks its slice."""
    # float64: a batch of 8 and a batch of 16 may round a conv differently in the last bit; in float32
    # such a difference could flip the sign of a near-zero gradient and the test would be flaky.
    phi = _encoder().double()
    x = torch.rand(16, *SHAPE, generator=_gen(11), dtype=torch.float64)
    with torch.no_grad():
        target = phi(x) + 0.05  # away from the identity, so that the attack does not start at zero loss
    init = 2 * torch.rand(x.shape, generator=_gen(12), dtype=torch.float64) - 1
    eps = 8 / 255
    whole = apgd(phi, x, embedding_loss(target), eps=eps, n_iter=10, init=init)
    halves = [
        apgd(phi, x[s], embedding_loss(target[s]), eps=eps, n_iter=10, init=init[s])
        for s in (slice(0, 8), slice(8, 16))
    ]
    torch.testing.assert_close(whole, torch.cat(halves), atol=1e-12, rtol=0)
    assert (whole != (x + eps * init).clamp(0, 1)).any()  # the attack moved away from the start


# ------------------------------------------------------------------------------------------ arguments


def test_bad_arguments_are_rejected(task) -> None:
    model, x, y = task
    with pytest.raises(ValueError, match="one value per sample"):
        apgd(model, x, lambda out: out.sum(), eps=EPS, n_iter=2)
    with pytest.raises(TypeError, match="floating point"):
        apgd(model, (x * 255).to(torch.uint8), ce_loss(y), eps=EPS, n_iter=2)
    with pytest.raises(ValueError, match="n_iter"):
        pgd(model, x, ce_loss(y), eps=EPS, n_iter=0)
    with pytest.raises(ValueError, match="eps"):
        apgd(model, x, ce_loss(y), eps=-1.0, n_iter=2)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        apgd(model, x, ce_loss(y), eps=EPS, n_iter=2)


# --------------------------------------------------------------------------------------- robust_correct


def test_robust_correct_orders_clean_untargeted_targeted(task) -> None:
    model, x, y = task
    with torch.no_grad():
        clean = model(x).argmax(dim=1) == y
    untargeted = robust_correct(model, x, y, eps=EPS, n_iter=10, generator=_gen(0))
    # Same seed: the APGD-CE stage is identical, APGD-T can only remove more samples.
    targeted = robust_correct(model, x, y, eps=EPS, n_iter=10, n_targets=3, generator=_gen(0))
    assert untargeted.dtype == torch.bool and untargeted.shape == y.shape
    assert not (untargeted & ~clean).any()  # robust implies clean-correct
    assert not (targeted & ~untargeted).any()
    assert targeted.sum() <= untargeted.sum() < clean.sum() - 0.2 * len(y)
    # the targeted stage adds something (a target equal to the true class would add nothing)
    one_target = robust_correct(model, x, y, eps=EPS, n_iter=10, n_targets=1, generator=_gen(0))
    assert one_target.sum() < untargeted.sum()
    # counting any misclassified iterate is at least as strong as checking APGD's best-loss point
    at_best_loss = _accuracy(model, apgd(model, x, ce_loss(y), eps=EPS, n_iter=10, generator=_gen(0)), y)
    assert untargeted.float().mean().item() <= at_best_loss + 1 / len(y)


def test_targets_are_the_top_non_true_classes() -> None:
    logits = torch.tensor([[5.0, 1.0, 3.0, 4.0], [0.0, 2.0, 1.0, -1.0]])
    labels = torch.tensor([0, 2])
    assert _top_other_classes(logits, labels, 2).tolist() == [[3, 2], [1, 0]]


def _trap(z: Tensor) -> Tensor:
    """Logits of one-pixel images where the CE maximiser (pixel 1) is classified correctly (class 0)
    but pixels below 0.8 are not (class 1 wins); CE decreases below pixel ~0.28 and increases above."""
    s = z.flatten(1)[:, 0]
    rising = -3.0 + 2.9 * s
    return torch.stack([torch.zeros_like(s), 0.4 - 0.5 * s, rising, rising], dim=1)


def test_robust_correct_counts_any_misclassified_iterate() -> None:
    x = torch.full((200, 1, 1, 1), 0.9)
    y = torch.zeros(200, dtype=torch.long)
    eps = 0.9  # the ball covers [0, 1]
    # The highest-CE point is correct, so APGD-CE's returned point is mostly classified correctly ...
    x_best = apgd(_trap, x, ce_loss(y), eps=eps, n_iter=10, generator=_gen(0))
    correct_at_best_loss = (_trap(x_best).argmax(dim=1) == y).float().mean().item()
    # ... but every sample whose random start (or any later iterate) lay below 0.8 was broken.
    robust = robust_correct(_trap, x, y, eps=eps, n_iter=10, generator=_gen(0))
    start = (x + eps * (2 * torch.rand(x.shape, generator=_gen(0)) - 1)).clamp(0, 1)
    assert correct_at_best_loss > 0.75
    assert not (robust & (start.flatten() < 0.8)).any()
    assert robust.float().mean().item() < correct_at_best_loss - 0.2


def test_robust_correct_without_budget_is_clean_correct(task) -> None:
    model, x, y = task
    with torch.no_grad():
        clean = model(x).argmax(dim=1) == y
    y_wrong = y.clone()
    y_wrong[:20] = (y_wrong[:20] + 1) % N_CLASSES  # some samples clean-wrong
    clean_wrong = clean.clone()
    clean_wrong[:20] = False
    assert torch.equal(robust_correct(model, x, y_wrong, eps=0.0, n_iter=3, n_targets=2), clean_wrong)


def test_robust_correct_in_chunks(task) -> None:
    model, x, y = task
    chunked = robust_correct(model, x, y, eps=EPS, n_iter=5, generator=_gen(0), batch_size=100)
    whole = robust_correct(model, x, y, eps=EPS, n_iter=5, generator=_gen(0))
    assert chunked.shape == y.shape
    # different noise per chunk, same attack: the counts agree up to a few samples
    assert abs(chunked.sum().item() - whole.sum().item()) <= 0.05 * len(y)
    with pytest.raises(ValueError, match="n_targets"):
        robust_correct(model, x, y, eps=EPS, n_iter=2, n_targets=N_CLASSES)
