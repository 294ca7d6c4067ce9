"""Two gloo ranks on CPU (torchrun) end with the same weights as one process with the same global batch."""
from __future__ import annotations

import json
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
@pytest.mark.parametrize("bn,port", [("eval", 29517), ("train", 29527)])
def test_two_gloo_ranks_equal_one_process(tmp_path, base_encoder, bn, port):
    sets = [f"model.checkpoint={base_encoder}", f"run.root={tmp_path}", f"data.path={tmp_path / 'cache'}",
            # BN in train mode: the ranks normalise over the global batch (model.sync_bn, the default)
            f"model.bn={bn}", "optim.steps=2", "optim.warmup_steps=1", "eval.every=0", "run.ckpt_every=1",
            "run.log_every=1"]
    # Two steps: the ranks' all-reduced gradient differs from one process's in the last float bits, and over
    # more steps APGD's sign steps and Adam's first updates (~lr * sign(g)) amplify such bits chaotically
    # (measured here: at most 2e-6 after 2 steps, 2e-3 after 6). Two steps still catch any real difference (sharding,
    # start noise, scaling of the loss), which shows from the first step on.
    flags = [x for s in sets for x in ("--set", s)]
    one = _run([sys.executable, "launch/train.py", "tests/assets/test_tiny.toml", *flags, "--set", "run.name=one"], {})
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
                "launch/train.py", "tests/assets/test_tiny.toml", *flags, "--set", "run.name=two"],
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
    losses = [[r["loss"] for r in map(json.loads, (tmp_path / n / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "train"] for n in ("one", "two")]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.dist
def test_the_accelerator_keeps_the_thread_count_the_caller_chose():
    # a submitit job sets cpus_per_task threads, then starts accelerate with the ranks' variables exported;
    # accelerate's gloo set-up used to reset the count to cores / local ranks, so a requeued sweep run was
    # no longer bit-identical to an uninterrupted run with the job's thread count
    code = ("import psutil, torch; from advft.distributed import make_accelerator; "
            "n = (psutil.cpu_count(logical=False) or 1) + 1; torch.set_num_threads(n); "
            "acc = make_accelerator('cpu'); print(acc.num_processes, n, torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": "29519", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)})
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    procs, wanted, got = done.stdout.split()
    assert procs == "1" and got == wanted


@pytest.mark.dist
def test_world_size_must_divide_batch(tmp_path, base_encoder):
    r = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
              "launch/train.py", "tests/assets/test_tiny.toml", "--set", f"model.checkpoint={base_encoder}",
              "--set", f"run.root={tmp_path}", "--set", "data.batch_size=15"], {"ACCELERATE_USE_CPU": "1"})
    assert r.returncode != 0
    assert "data.batch_size = 15 is not divisible by the world size 2" in r.stderr
    # one line per rank, no crash: the only traceback is torchrun's own report of the ranks' exit code 2
    ranks = r.stderr.split("ChildFailedError")[0].rsplit("Traceback", 1)[0]
    assert "Traceback" not in ranks and "(exitcode: 2)" in r.stderr
    assert not (tmp_path / "test_tiny").exists()
