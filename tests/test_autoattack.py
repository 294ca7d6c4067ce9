"""advft's final attack against the field's standard: AutoAttack (pyautoattack, the reference implementation)
on a small model trained here, on the CPU. advft's APGD-CE + APGD-T must be within one point of it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from advft import autoattack as AA
from advft import config as C
from advft.attacks import robust_correct
from advft.evaluate import evaluate
from conftest import require_or_skip

pytestmark = [pytest.mark.autoattack, pytest.mark.usefixtures("one_torch_thread")]
EPS = 8 / 255


def _need() -> None:
    require_or_skip("ADVFT_REQUIRE_EXTRAS", AA.available(), "pyautoattack")


def _data(n: int, g: torch.Generator, protos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """10 classes of 3x8x8 images: a class prototype plus Gaussian noise, clipped to [0, 1]."""
    y = torch.randint(0, 10, (n,), generator=g)
    return (protos[y] + 0.15 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 1), y


@pytest.fixture(scope="module")
def trained():
    """A 2-layer MLP fitted (full-batch Adam) on 2000 images, 500 test images. The prototypes are close
    enough that about half the test images survive an attack at 8/255: neither trivially 0 nor 100 %."""
    g = torch.Generator().manual_seed(0)
    protos = 0.4 + 0.2 * torch.rand(10, 3, 8, 8, generator=g)
    x_train, y_train = _data(2000, g, protos)
    x_test, y_test = _data(500, g, protos)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        loss = nn.functional.cross_entropy(model(x_train), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval().requires_grad_(False), (x_train, y_train), (x_test, y_test)


def test_advft_apgd_is_within_one_point_of_autoattack(trained) -> None:
    _need()
    model, _, (x, y) = trained
    ours = robust_correct(model, x, y, eps=EPS, n_iter=100, n_targets=9, generator=torch.Generator().manual_seed(1))
    rng = torch.get_rng_state()
    theirs = AA.autoattack_correct(model, x, y, eps=EPS, seed=0)
    assert torch.equal(torch.get_rng_state(), rng)  # AutoAttack reseeds torch's RNG; the caller's is restored
    ours_acc, theirs_acc = 100.0 * ours.float().mean().item(), 100.0 * theirs.float().mean().item()
    clean = 100.0 * (model(x).argmax(1) == y).float().mean().item()
    assert 20.0 < theirs_acc < clean - 20.0, (theirs_acc, clean)  # a setting where the attack has work to do
    # ours may not be weaker: at most one point (5 of 500 images) above AutoAttack's robust accuracy
    assert abs(ours_acc - theirs_acc) <= 1.0, (ours_acc, theirs_acc)


def test_final_evaluation_can_use_autoattack(trained) -> None:
    """evaluate(final=True) with eval.final_attack = "autoattack" reports AutoAttack's robust accuracy (the
    routine evaluation keeps advft's APGD) with its interval; the probe sits on the MLP's hidden layer."""
    _need()
    model, (x_train, y_train), (x_test, y_test) = trained
    encoder = model[:3]
    cfg = C.load(None, ["eval.final_attack=autoattack", "eval.probe_epochs=100"])

    def batches(x, y):
        return lambda final=False: [(x[i:i + 250], y[i:i + 250]) for i in range(0, len(y), 250)]

    args = dict(cfg=cfg, device=torch.device("cpu"), n_iter=100, n_targets=9, seed=0, precision="fp32")
    probe, test = batches(x_train, y_train), batches(x_test[:200], y_test[:200])
    strong = evaluate(encoder, probe, test, final=True, **args)
    routine = evaluate(encoder, probe, test, **args)
    assert strong["attack"] == "autoattack-standard" and routine["attack"] == "apgd-ce100+apgd-t100x9"
    assert strong["n_test"] == 200 and strong["ci"] == "wilson"
    lo, hi = strong["robust_acc_ci95"]
    assert lo <= strong["robust_acc"] <= hi
    assert 10.0 < strong["robust_acc"] < strong["clean_acc"]
    assert abs(strong["robust_acc"] - routine["robust_acc"]) <= 1.0


def test_autoattack_without_the_package_is_refused_at_validation(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyautoattack" else real(name, *a))
    with pytest.raises(C.ConfigError) as e:
        C.validate(C.load(None, ["eval.final_attack=autoattack"]), check_paths=False)
    assert str(e.value) == ("eval.final_attack = 'autoattack' needs the pyautoattack package, which is not "
                            "installed; install it with: bash scripts/install_extras.sh")
