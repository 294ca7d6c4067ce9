"""AutoAttack's standard ensemble (APGD-CE, APGD-T, FAB-T, Square; Croce & Hein, ICML 2020) through its
reference implementation as packaged on PyPI (``pyautoattack``, imported only here, only when asked for).

The field's yardstick for a robust accuracy: ``eval.final_attack = "autoattack"`` makes the final
evaluation report it instead of advft's own APGD-CE + APGD-T (tests/test_autoattack.py checks that the two
agree within a point). Its APGD-T and FAB-T attack the 9 highest non-true classes: 10 classes or more.
"""
from __future__ import annotations

import importlib.util
import logging

import torch
from torch import Tensor, nn

from advft.attacks import Forward

PACKAGE = "pyautoattack"
INSTALL = "pip install pyautoattack (or bash scripts/install_extras.sh)"


def available() -> bool:
    return importlib.util.find_spec(PACKAGE) is not None


class _Logits(nn.Module):
    """AutoAttack wants an nn.Module; advft's evaluation has a logits callable (probe on the encoder)."""

    def __init__(self, forward: Forward) -> None:
        super().__init__()
        self.forward_logits = forward

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_logits(x).float()


def autoattack_correct(forward_logits: Forward, x: Tensor, y: Tensor, *, eps: float, seed: int,
                       batch_size: int | None = None) -> Tensor:
    """(B,) bool: correct under AutoAttack's standard L-inf ensemble at ``eps`` (pixel units), worst case over
    its four attacks. ``seed`` fixes its random starts; torch's global RNG, which AutoAttack reseeds, is
    restored afterwards, so the caller's random stream does not depend on whether it ran."""
    if not available():
        raise ModuleNotFoundError(f"eval.final_attack = 'autoattack' needs the {PACKAGE} package: {INSTALL}")
    from pyautoattack import AutoAttack

    logging.getLogger("auto-attack").setLevel(logging.WARNING)  # its per-attack progress lines
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        attack = AutoAttack(_Logits(forward_logits), norm="Linf", eps=eps, version="standard", seed=seed,
                            device=x.device)
        _, y_adv = attack.run_standard_evaluation(x, y, batch_size=batch_size or x.shape[0])
    # y_adv holds the clean prediction where no attack succeeded, the adversarial one elsewhere
    return y_adv.to(y.device) == y
