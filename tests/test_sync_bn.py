"""GlobalBatchNorm: two gloo ranks in train mode compute what one process computes on the global batch
(outputs, gradients, running statistics), and a converted encoder keeps plain BatchNorm's state dict."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from advft.sync_bn import GlobalBatchNorm, convert_sync_bn, has_batch_norm

ROOT = Path(__file__).resolve().parent.parent
WORLD, PER_RANK = 2, 5


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(),
                      nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, momentum=None), nn.Flatten(), nn.Linear(4 * 4 * 4, 3),
                      nn.BatchNorm1d(3))
    return m.double()


def _batch() -> torch.Tensor:
    return torch.rand(WORLD * PER_RANK, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.pow(2).sum(1).mean() + out[:, 0].mean()  # not invariant to the normalisation


# each rank: the model with synchronised BN, its shard, two train steps' worth of forwards, DDP's gradient mean
RANK_CODE = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from test_sync_bn import _model, _batch, _loss, PER_RANK
from advft.sync_bn import convert_sync_bn
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method={init!r}, rank=rank, world_size=2)
m = convert_sync_bn(_model(), "cpu").train()
x = _batch()[rank * PER_RANK:(rank + 1) * PER_RANK]
m(x * 0.5)  # a first forward moves the running statistics
out = m(x)
_loss(out).backward()
grads = []
for p in m.parameters():
    dist.all_reduce(p.grad)
    grads.append(p.grad / 2)
torch.save({{"out": out.detach(), "grads": grads, "state": m.state_dict()}}, {out!r} + str(rank))
dist.destroy_process_group()
"""


@pytest.mark.dist
def test_two_gloo_ranks_with_global_batch_norm_equal_one_process(tmp_path):
    code = RANK_CODE.format(tests=str(ROOT / "tests"), init=f"file://{tmp_path / 'rendezvous'}",
                            out=str(tmp_path / "rank"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], cwd=ROOT, env=env, stderr=subprocess.PIPE,
                              text=True) for r in range(WORLD)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(e[-2000:] for e in errs)
    ranks = [torch.load(tmp_path / f"rank{r}", weights_only=True) for r in range(WORLD)]

    one = _model().train()
    x = _batch()
    one(x * 0.5)
    out = one(x)
    _loss(out).backward()
    # float64 throughout: the sums differ from one process's only in summation order
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out.detach(), rtol=1e-10, atol=1e-12)
    for r in ranks:
        for g, p in zip(r["grads"], one.parameters()):
            torch.testing.assert_close(g, p.grad, rtol=1e-9, atol=1e-12)
        for k, v in one.state_dict().items():
            torch.testing.assert_close(r["state"][k], v, rtol=1e-10, atol=1e-12, msg=k)
    # the check has teeth: per-rank statistics (plain BN on each shard) give other outputs
    shard = _model().train()
    shard(x[:PER_RANK] * 0.5)
    assert not torch.allclose(shard(x[:PER_RANK]), out[:PER_RANK], atol=1e-6)


def test_converted_encoder_keeps_batch_norm_names_parameters_and_eval_outputs():
    plain = _model()
    for bn in (plain[1], plain[4], plain[7]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    params = list(plain.parameters())
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    x = _batch()
    with torch.no_grad():
        expected = plain.eval()(x)
    conv = convert_sync_bn(plain, "cpu")
    assert [type(conv[i]) for i in (1, 4, 7)] == [GlobalBatchNorm] * 3
    assert list(conv.parameters()) == params  # the same Parameter objects: optimiser and saving unchanged
    assert conv.state_dict().keys() == before.keys()
    fresh = _model()
    fresh.load_state_dict(conv.state_dict(), strict=True)  # loadable by the plain encoder
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
    with torch.no_grad():
        torch.testing.assert_close(conv.eval()(x), expected, rtol=0, atol=0)  # eval: running statistics only


def test_global_batch_norm_without_a_process_group_is_batch_norm():
    plain, conv = _model().train(), convert_sync_bn(_model(), "cpu").train()
    x = _batch()
    torch.testing.assert_close(conv(x), plain(x))
    torch.testing.assert_close(conv.state_dict(), plain.state_dict())
    assert has_batch_norm(conv) and not has_batch_norm(nn.Linear(2, 2))
