"""eval.final_eps_extra: the final evaluation attacks a second radius too, without changing the first."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from advft import config as C
from advft.fare import finetune
from advft.evaluate import evaluate


def _greys(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Four classes of noisy 3 x 8 x 8 images around grey 0.2, 0.4, 0.6, 0.8: robust at small eps only."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = (0.2 + 0.2 * y.float()).view(n, 1, 1, 1) + 0.05 * torch.randn(n, 3, 8, 8, generator=g)
    return [(x.clamp(0, 1), y)]


def test_second_radius_is_reported_and_leaves_the_first_unchanged() -> None:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 16))  # sees the mean grey only
    train, test = _greys(200, 1), _greys(100, 2)
    cfg = C.load(None, ["eval.probe_epochs=200"])  # attack.eps = 8
    kw = dict(cfg=cfg, device=torch.device("cpu"), n_iter=10, n_targets=1, precision="fp32")
    one = evaluate(encoder, lambda: train, lambda: test, **kw)
    two = evaluate(encoder, lambda: train, lambda: test, eps_extra=255, **kw)
    assert "robust_acc_eps_extra" not in one and "eps_extra" not in one
    assert {k: two[k] for k in one} == one  # same head, same images, same attack at eps 8
    assert two["eps_extra"] == 255.0
    # at 255/255 the attack may paint any image: nothing stays correct, while eps 8 leaves most correct
    assert two["robust_acc_eps_extra"] == 0.0 < one["robust_acc"]


def test_runs_record_the_second_radius_at_start_and_end_only(tiny_cfg) -> None:
    res = finetune(tiny_cfg("eval.final_eps_extra=32", "optim.steps=4", "eval.every=0"))
    for when in ("initial", "final"):
        assert res[when]["eps_extra"] == 32.0 and 0 <= res[when]["robust_acc_eps_extra"] <= 100


@pytest.mark.parametrize("value", ["-1", "256"])
def test_bad_second_radius_is_refused(value: str) -> None:
    cfg = C.load(None, [f"eval.final_eps_extra={value}", "model.checkpoint=x.pt"])
    with pytest.raises(C.ConfigError, match="eval.final_eps_extra"):
        C.validate(cfg, check_paths=False)


def test_the_new_key_keeps_earlier_run_names_and_names_runs_that_set_it() -> None:
    assert C.Config().hash() == "5549623d"  # as before the key existed (tests/test_config.py)
    assert C.load(None, ["eval.final_eps_extra=16"]).hash() != C.Config().hash()
