"""The fast paths compute what the slow ones compute.

- bf16 autocast does not weaken the attack: robust accuracy under a bf16 APGD within 1 point of an fp32 one;
- the compiled FARE step is numerically the eager one;
- the benchmarks compare like with like: the report-style baseline attack finds the same adversarial batch
  as advft's, and the ablation switches change the cost, not the result.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import advft.fare.step as S
from advft import config as C
from advft.attacks import apgd, ce_loss
from advft.distributed import autocast
from advft.models import build_encoder
from advft.fare import build_optimizer
from benchmarks.baseline import baseline_apgd

CPU = torch.device("cpu")


def synthetic_task(n: int, seed: int, templates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy copies of one template per class, around grey, pixels in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, templates.shape[0], (n,), generator=g)
    x = 0.5 + 0.05 * templates[y] + 0.12 * torch.randn(n, *templates.shape[1:], generator=g)
    return x.clamp(0, 1), y


def trained_classifier() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small conv net fit on the synthetic task (~86 % clean accuracy), and 2000 test points."""
    templates = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x_train, y_train = synthetic_task(1000, 1, templates)
    x_test, y_test = synthetic_task(2000, 2, templates)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(60):  # full batch
        loss = nn.functional.cross_entropy(net(x_train), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False), x_test, y_test


def test_bf16_attack_is_as_strong_as_fp32() -> None:
    net, x, y = trained_classifier()
    eps = 3 / 255  # puts robust accuracy near the middle, where a weaker attack would show

    def robust(precision: str) -> torch.Tensor:
        def forward(z: torch.Tensor) -> torch.Tensor:
            with autocast(CPU, precision):
                return net(z)

        x_adv = apgd(forward, x, ce_loss(y), eps=eps, n_iter=10, generator=torch.Generator().manual_seed(3))
        assert (x_adv - x).abs().max() <= eps + 1e-6
        return net(x_adv).argmax(1) == y  # both judged by the same fp32 model

    clean = (net(x).argmax(1) == y).float().mean().item()
    r32, r16 = robust("fp32"), robust("bf16")
    acc32, acc16 = r32.float().mean().item(), r16.float().mean().item()
    # 1 point is 20 of the 2000 test points; the attack itself moves accuracy by ~40 points
    assert clean > 0.8 and 0.2 < acc32 < clean - 0.2, (clean, acc32)
    assert abs(acc16 - acc32) <= 0.01, (acc32, acc16)
    assert (r32 != r16).float().mean().item() <= 0.02  # and it is mostly the same points that stand


def _tiny_setup(precision: str = "fp32", bn: str = "train") -> tuple[C.Config, S.StepModels, torch.optim.Optimizer]:
    cfg = C.from_dict({}, {"model.arch": "tiny", "model.stem": "cifar", "model.bn": bn, "data.resolution": 16,
                           "data.batch_size": 4, "attack.steps": 3, "loss.alpha": 0.1, "run.precision": precision,
                           "run.channels_last": False, "optim.lr": 1e-3, "optim.warmup_steps": 0,
                           "optim.steps": 10, "optim.fused": False})
    torch.manual_seed(0)
    phi_org = build_encoder("tiny", "cifar").eval().requires_grad_(False)
    phi = copy.deepcopy(phi_org).requires_grad_(True)
    models = S.StepModels(phi=phi, phi_fn=phi, phi_ddp=phi, phi_org=phi_org)
    return cfg, models, build_optimizer(phi.parameters(), cfg.optim, CPU)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(5)), torch.zeros(4, dtype=torch.long)


def test_baseline_attack_finds_the_same_batch_as_advft() -> None:
    cfg, m, _ = _tiny_setup()
    x, y = _batch()
    with torch.no_grad():
        target = m.phi_org(x)
    init = S.attack_init(cfg.run.seed, 0, x.shape, 0, 1, CPU)
    z_advft = S.adversarial_batch(m, x, y, target, 0, S.FareSpec.of(cfg))
    m.phi.eval()
    z_base = baseline_apgd(m.phi, x, target, eps=cfg.attack.eps_pixels, n_iter=cfg.attack.steps, init=init)
    assert not torch.equal(z_advft, x)
    torch.testing.assert_close(z_base, z_advft, rtol=0, atol=1e-6)
    assert all(p.grad is None for p in m.phi.parameters())  # the baseline threw its parameter grads away


def test_ablation_switches_change_cost_not_result() -> None:
    """FareSpec's routes (what ``benchmarks/throughput.py --ablate`` flips) do the costlier work they name and
    compute the same attack and the same step."""
    cfg, m, _ = _tiny_setup(bn="eval")  # eval BN: two forwards then see the same statistics as one
    x, y = _batch()
    with torch.no_grad():
        target = m.phi_org(x)
    spec = S.FareSpec.of(cfg)
    assert (spec.attack_grads, spec.join_forwards) == ("input", True)  # the engine's defaults
    param_grads = {"n": 0}
    hooks = [p.register_hook(lambda g: param_grads.update(n=param_grads["n"] + 1)) for p in m.phi.parameters()]
    z = S.adversarial_batch(m, x, y, target, 0, spec)
    assert param_grads["n"] == 0  # frozen: input gradients only
    z_full = S.adversarial_batch(m, x, y, target, 0, dataclasses.replace(spec, attack_grads="full_backward"))
    assert param_grads["n"] > 0  # the parameters' gradients were computed as well
    for h in hooks:
        h.remove()
    assert not torch.equal(z, x)
    torch.testing.assert_close(z_full, z, rtol=0, atol=1e-6)
    assert all(p.grad is None and p.requires_grad for p in m.phi.parameters())

    batches: list[int] = []
    steps = {}
    for join in (True, False):
        _, m2, opt = _tiny_setup(bn="eval")
        m2.phi.register_forward_hook(lambda mod, inp, out: batches.append(inp[0].shape[0]))
        batches.clear()
        steps[join] = S.fare_step(m2, opt, x, y, 0, dataclasses.replace(spec, join_forwards=join))
        assert (2 * x.shape[0] in batches) == join, batches  # one forward of [z; x], or two of x's size
    for k in ("loss", "adv_loss", "clean_loss"):
        torch.testing.assert_close(steps[False][k], steps[True][k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_step_matches_eager() -> None:
    """Two FARE steps (attack, [z; x] forward, backward, update) with phi compiled and eager, same weights.

    BN runs in eval mode here: with train-mode BN the first stage's gradient is ill-conditioned, and fp32
    compiled or eager (which one depends on the batch) lands up to a few % from float64 there, while
    compiled float64 equals eager float64 (``benchmarks/compile_numerics.py`` shows both).
    SGD rather than AdamW: Adam's first update is +-lr for ANY gradient, so rounding-level differences in
    near-zero gradients would become lr-sized weight differences and hide what we compare.
    """
    x, y = _batch()
    runs = []
    for compiled in (False, True):
        cfg, m, _ = _tiny_setup(bn="eval")
        opt = torch.optim.SGD(m.phi.parameters(), lr=0.05)
        w0 = m.phi.net.conv1.weight.detach().clone()
        if compiled:
            fn = torch.compile(m.phi)
            m = S.StepModels(phi=m.phi, phi_fn=fn, phi_ddp=fn, phi_org=m.phi_org)
        losses = [S.fare_step(m, opt, x, y, step, S.FareSpec.of(cfg))["loss"] for step in range(2)]
        assert all(p.grad is None for p in m.phi.parameters())
        runs.append((torch.stack(losses), {k: v.detach().clone() for k, v in m.phi.state_dict().items()}))
    (l_eager, w_eager), (l_comp, w_comp) = runs
    assert l_eager[0] > 0 and not torch.equal(w_eager["net.conv1.weight"], w0)  # the steps did something
    torch.testing.assert_close(l_comp, l_eager, rtol=1e-4, atol=1e-6)
    for k in w_eager:
        torch.testing.assert_close(w_comp[k], w_eager[k], rtol=1e-4, atol=1e-5, msg=k)
