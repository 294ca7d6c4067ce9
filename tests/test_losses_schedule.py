"""The squared distance's convention; schedule shape (the losses themselves: tests/test_losses.py)."""
from __future__ import annotations

import math

import pytest
import torch

from advft.losses import squared_distance
from advft.schedule import lr_factor


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
