"""FARE loss against its formula; the clean forward is skipped at alpha 0; schedule shape."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from advft.losses import fare_loss, squared_distance
from advft.schedule import lr_factor


class Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 5)
        self.batches: list[int] = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.lin(x.flatten(1))


@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_fare_loss_equals_formula(alpha, reduction):
    torch.manual_seed(0)
    enc = Counting()
    x, z = torch.rand(4, 3, 2, 2), torch.rand(4, 3, 2, 2)
    t = torch.randn(4, 5)
    out = fare_loss(enc, z, x, t, alpha, reduction)
    red = (lambda d: d.sum(1)) if reduction == "sum" else (lambda d: d.mean(1))
    with torch.no_grad():
        expected = red((enc.lin(z.flatten(1)) - t) ** 2).mean() + alpha * red((enc.lin(x.flatten(1)) - t) ** 2).mean()
    torch.testing.assert_close(out["loss"], expected)
    assert out["loss"].requires_grad


def test_alpha_zero_runs_no_clean_forward_and_alpha_positive_two_unless_joint():
    enc = Counting()
    x, z, t = torch.rand(4, 3, 2, 2), torch.rand(4, 3, 2, 2), torch.randn(4, 5)
    out = fare_loss(enc, z, x, t, 0.0)
    assert enc.batches == [4] and "clean_loss" not in out
    enc.batches.clear()
    out = fare_loss(enc, z, x, t, 0.1)
    assert enc.batches == [4, 4] and "clean_loss" in out
    enc.batches.clear()
    fare_loss(enc, z, x, t, 0.1, joint=True)
    assert enc.batches == [8]


def test_squared_distance_is_zero_at_identity():
    a = torch.randn(3, 7)
    assert torch.equal(squared_distance(a, a), torch.zeros(3))
    assert torch.allclose(squared_distance(a, a + 1), torch.full((3,), 7.0))
    assert torch.allclose(squared_distance(a, a + 1, "mean"), torch.ones(3))


def test_schedule_warmup_then_cosine():
    w, total = 1400, 20000
    assert lr_factor(0, w, total) == pytest.approx(1 / w)
    assert lr_factor(w - 1, w, total) == pytest.approx(1.0)
    assert lr_factor(w, w, total) == pytest.approx(1.0)
    mid = w + (total - w) // 2
    assert lr_factor(mid, w, total) == pytest.approx(0.5, abs=1e-4)
    assert lr_factor(total, w, total) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(total, w, total, min_ratio=0.1) == pytest.approx(0.1)
    vals = [lr_factor(s, w, total) for s in range(0, total, 97)]
    peak = vals.index(max(vals))
    assert all(a <= b + 1e-12 for a, b in zip(vals[:peak], vals[1:peak + 1]))  # rises, then
    assert all(a >= b - 1e-12 for a, b in zip(vals[peak:], vals[peak + 1:]))  # only falls
    assert lr_factor(0, 0, 10) == pytest.approx(1.0) and not math.isnan(lr_factor(5, 10, 10))
