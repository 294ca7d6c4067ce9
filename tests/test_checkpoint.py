"""Atomic checkpoints: newest valid one wins; damaged ones are skipped; keep-last pruning; RNG round trip."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from advft import checkpoint as ckpt


def _state(v: float) -> dict:
    return {"model": {"w": torch.full((4,), v)}, "step": int(v)}


def test_save_load_latest_and_prune(tmp_path):
    for s in (1, 2, 3, 4):
        ckpt.save(tmp_path, s, _state(s), keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 3]
    step, state = ckpt.load_latest(tmp_path)
    assert step == 4 and torch.equal(state["model"]["w"], torch.full((4,), 4.0))
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.endswith(".tmp")]


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "no_checksum", "garbage"])
def test_damaged_newest_is_skipped_with_warning(tmp_path, caplog, damage):
    ckpt.save(tmp_path, 1, _state(1))
    path = ckpt.save(tmp_path, 2, _state(2))
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "bitflip":
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))
    elif damage == "no_checksum":
        path.with_name(path.name + ".sha256").unlink()
    else:
        path.write_bytes(b"not a checkpoint")
        path.with_name(path.name + ".sha256").write_text(ckpt._sha256(path) + "\n")
    with caplog.at_level("WARNING"):
        step, state = ckpt.load_latest(tmp_path)
    assert step == 1 and state["step"] == 1
    assert "skipping checkpoint" in caplog.text and "step_00000002.pt" in caplog.text


def test_no_checkpoint_returns_none(tmp_path):
    assert ckpt.load_latest(tmp_path) is None


def test_failed_write_keeps_previous_and_cleans_up(tmp_path, monkeypatch):
    ckpt.save(tmp_path, 1, _state(1))

    def full_disk(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(ckpt.CheckpointError, match="No space left on device.*previous checkpoints are intact"):
        ckpt.save(tmp_path, 2, _state(2))
    monkeypatch.undo()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.endswith(".tmp")]
    assert ckpt.load_latest(tmp_path)[0] == 1


def test_rng_state_round_trip_through_a_weights_only_file(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    ckpt.save(tmp_path, 1, {"rng": ckpt.rng_state()})
    a = (torch.rand(3), np.random.rand(3), random.random())
    _, state = ckpt.load_latest(tmp_path)  # weights_only=True load
    ckpt.set_rng_state(state["rng"])
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "checkpoints"
    path.mkdir()
    f = path / "step_00000001.pt"
    torch.save({"x": Evil()}, f)
    f.with_name(f.name + ".sha256").write_text(ckpt._sha256(f) + "\n")
    assert ckpt.load_latest(tmp_path) is None
    assert not marker.exists()
