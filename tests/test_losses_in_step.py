"""The losses inside the fine-tuning step and the sweep: the attack maximises the loss's own objective, the
metrics come per term, a saved step resumes bit-identically for every loss, and ``--grid loss.name=...``
crosses losses with the weights they read."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import advft.fare.step as S
from advft import config as C
from advft.attacks import apgd
from advft.fare.task import build_optimizer
from advft.losses import LOSSES, attack_objective
from advft.models import build_encoder
from launch.sweeper import grid as G
from launch import sweep as SW

CPU = torch.device("cpu")
TINY_JOB = Path(__file__).resolve().parent / "assets" / "test_tiny.toml"


def _setup(name: str, bn: str = "train") -> tuple[C.Config, S.StepModels, torch.optim.Optimizer]:
    cfg = C.from_dict({}, {"model.arch": "tiny", "model.stem": "cifar", "model.bn": bn, "data.resolution": 16,
                           "data.batch_size": 4, "attack.steps": 3, "loss.name": name, "run.precision": "fp32",
                           "run.channels_last": False, "optim.lr": 1e-3, "optim.warmup_steps": 0,
                           "optim.steps": 10, "optim.fused": False})
    torch.manual_seed(0)
    phi_org = build_encoder("tiny", "cifar").eval().requires_grad_(False)
    phi = copy.deepcopy(phi_org).requires_grad_(True)
    return cfg, S.StepModels(phi=phi, phi_fn=phi, phi_ddp=phi, phi_org=phi_org), build_optimizer(
        phi.parameters(), cfg.optim, CPU)


def _batch(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(seed)), torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize("name", ["trades", "cosine"])
def test_the_step_attacks_with_the_objective_of_its_loss(name):
    cfg, m, opt = _setup(name)
    # phi != phi_org from here on: trades' anchor is phi(x), not t
    S.fare_step(m, opt, *_batch(1), 0, S.FareSpec.of(cfg))
    x, y = _batch()
    with torch.no_grad():
        target = m.phi_org(x)
    z = S.adversarial_batch(m, x, y, target, 1, S.FareSpec.of(cfg))
    init = S.attack_init(cfg.run.seed, 1, x.shape, 0, 1, CPU)
    m.phi.eval().requires_grad_(False)
    by_hand = apgd(m.phi, x, attack_objective(name, m.phi, x, target), eps=cfg.attack.eps_pixels,
                   n_iter=cfg.attack.steps, init=init)
    fare = apgd(m.phi, x, attack_objective("fare", m.phi, x, target), eps=cfg.attack.eps_pixels,
                n_iter=cfg.attack.steps, init=init)
    assert torch.equal(z, by_hand) and not torch.equal(z, fare)


@pytest.mark.parametrize("name", list(LOSSES))
def test_step_metrics_per_term_detached(name):
    cfg, m, opt = _setup(name)
    out = S.fare_step(m, opt, *_batch(), 0, S.FareSpec.of(cfg))
    assert {"loss", "adv_loss", "clean_loss", "adv_cos", "clean_cos"} <= set(out)
    assert all(not v.requires_grad and v.dim() == 0 for v in out.values())


@pytest.mark.parametrize("name", list(LOSSES))
def test_a_saved_step_resumes_bit_identically_for_every_loss(name, tmp_path):
    cfg, m, opt = _setup(name)
    for step in range(2):
        S.fare_step(m, opt, *_batch(step), step, S.FareSpec.of(cfg))
    torch.save({"model": m.phi.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "state.pt")
    S.fare_step(m, opt, *_batch(2), 2, S.FareSpec.of(cfg))
    _, again, opt2 = _setup(name)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    again.phi.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    S.fare_step(again, opt2, *_batch(2), 2, S.FareSpec.of(cfg))
    a, b = m.phi.state_dict(), again.phi.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in state["model"].items())  # the resumed step changed weights


def test_grid_crosses_losses_with_the_weights_each_reads(tmp_path, base_encoder, capsys):
    argv = ["--job", str(TINY_JOB), "--set", f"model.checkpoint={base_encoder}",
            "--set", f"run.root={tmp_path}", "--cluster", "local", "--dry-run",
            "--grid", "loss.name=fare,cosine,trades", "--grid", "alpha=0,0.1,1"]
    plan = SW.build_plan(SW.parse_args(argv))
    losses = [(r.cfg.loss.name, r.cfg.loss.alpha, r.cfg.loss.beta) for r in plan.runs]
    assert losses == [("fare", 0.0, None), ("fare", 0.1, None), ("fare", 1.0, None), ("cosine", 0.0, None),
                      ("cosine", 0.1, None), ("cosine", 1.0, None), ("trades", None, 1.0)]
    names = [r.name for r in plan.runs]
    assert names[0].startswith("alpha=0,loss=fare-") and names[-1].startswith("loss=trades-")
    assert len(set(names)) == 7
    assert "loss.name = 'trades' does not read loss.alpha" in capsys.readouterr().err
    # a single run that names a weight its loss does not read is refused, not silently changed
    with pytest.raises(C.ConfigError, match="loss.alpha = 0.1 is not read by loss.name = 'trades'"):
        SW.build_plan(SW.parse_args([*argv[:-4], "--set", "loss.name=trades", "--set", "alpha=0.1"]))


def test_grid_labels_the_loss_axis_loss():
    assert [a.label for a in G.parse_grid(["loss.name=fare,trades", "beta=1,2"])] == ["loss", "beta"]
