"""slurm/*.sbatch: one run with DDP through ``srun accelerate launch``, requeued by its own early signal.

The SLURM tests need the cluster of ``slurm/local-cluster.sh up --nodes 2`` (skipped without one, a failure
when ADVFT_REQUIRE_SLURM=1): CPU nodes that bind tasks to cores, so gloo ranks stand in for GPUs. The
CIFAR-10 script runs two ranks in one task on one node; the ImageNet script one rank on each of two nodes
whose names resolve nowhere (the ranks must reach the head by its NodeAddr). Each job's rank 0 waits at
its first log step until the test's early signal has made the stop request (tests/faults/hold.py).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from advft import checkpoint as ckpt
from conftest import require_or_skip, wait_for
from faults import hold
from slurm_util import HOW, in_queue, node_cpus, partition_nodes, slurm_env, wait_sacct

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["slurm/cifar10.sbatch", "slurm/imagenet.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_sbatch_scripts_parse_and_ask_for_one_task_per_node_requeue_and_an_early_signal(script):
    text = (ROOT / script).read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True).returncode == 0
    directives = re.findall(r"^#SBATCH (\S+)", text, flags=re.M)
    assert "--ntasks-per-node=1" in directives and "--requeue" in directives
    assert any(re.fullmatch(r"--signal=B:USR1@\d+", d) for d in directives), directives
    assert "slurm/run-accelerate.sh" in text
    body = (ROOT / "slurm" / "run-accelerate.sh").read_text()
    for piece in ("--num_machines", "--machine_rank \"$SLURM_NODEID\"", "--main_process_ip", "--num_processes",
                  "scontrol show hostnames", "NodeAddr", "scontrol requeue \"$SLURM_JOB_ID\"",
                  '--cpus-per-task="$SLURM_CPUS_PER_TASK"'):
        assert piece in body, piece
    assert subprocess.run(["bash", "-n", str(ROOT / "slurm" / "run-accelerate.sh")]).returncode == 0


def _records(run: Path, kind: str) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def usr1_when_held_then_finished(env: dict[str, str], sbatch_out: str, held: Path, run: Path, log: Path) -> str:
    """The submitted job (sbatch --parsable's output): once its run is held at its first log step, do what
    SLURM does N seconds before the time limit (#SBATCH --signal=B:USR1@N), signal the batch shell; then wait
    until the run finished and the batch script ended. The job is cancelled whatever happens; returns its id."""
    job = sbatch_out.strip().split(";")[0]
    try:
        hold.wait_held(held, alive=lambda: in_queue(job, env))
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True, timeout=30)
        wait_for(lambda: (run / "results.json").is_file()
                 and json.loads((run / "results.json").read_text())["status"] == "finished", "the run to finish")
        wait_for(lambda: "srun ended with status 0" in log.read_text(), "the batch script to end", timeout_s=60)
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True, timeout=30)
    return job


@pytest.mark.slurm
def test_cifar10_sbatch_trains_two_gloo_ranks_through_srun_and_requeues_itself_on_its_signal(
        tmp_path, base_encoder):
    env = slurm_env()
    require_or_skip("ADVFT_REQUIRE_SLURM", env is not None, HOW)
    cpus = node_cpus(env)
    run, log = tmp_path / "ddp", tmp_path / "slurm.out"
    sets = [f"model.checkpoint={base_encoder}", f"data.path={tmp_path / 'cache'}", f"run.root={tmp_path}",
            "run.name=ddp", "model.bn=eval", "optim.steps=16", "run.ckpt_every=8", "eval.every=0",
            "eval.final_targets=0", "eval.probe_epochs=5", "eval.final_attack_steps=2", "eval.attack_steps=2",
            "eval.probe_train_size=64", "eval.test_size=32"]
    # rank 0 waits at its first log step until the stop request has come (tests/faults/hold.py): the signal
    # lands while the run trains, however fast this machine is
    held = tmp_path / "hold"
    env = {**env, **hold.environment(held, base=env)}
    # the script's GPU and CPU defaults are for GPU nodes: ask for this CPU node instead, two ranks in one task
    submit = subprocess.run(
        ["sbatch", "--parsable", "--gpus-per-node=0", f"--cpus-per-task={min(cpus, 2)}", "--time=10",
         "--partition=debug", f"--output={log}", "--export=ALL,PROCS_PER_NODE=2,WANDB_MODE=disabled",
         "slurm/cifar10.sbatch", "tests/assets/test_tiny.toml", *(x for s in sets for x in ("--set", s))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = usr1_when_held_then_finished(env, submit.stdout, held, run, log)
    text = log.read_text()
    assert "2 process(es)" in text and "CPU/gloo" in text
    # srun passed the job's CPUs on: the node's task (and its two ranks) may use them all, not one core
    assert f"[sbatch] node 0 (n1): {min(cpus, 2)} CPU(s) for its 2 process(es)" in text, text[-3000:]
    assert f"requeueing job {job}" in text, text[-3000:]
    starts = json.loads((run / "manifest.json").read_text())["starts"]
    assert [s["world_size"] for s in starts] == [2, 2], starts  # DDP: two ranks, through srun, both times
    assert [s["slurm"].get("SLURM_RESTART_COUNT") for s in starts] == [None, "1"]
    assert starts[1]["resume_step"] == 2  # the held log step
    assert [r["step"] for r in _records(run, "train")] == list(range(2, 17, 2))  # no step lost or repeated
    wait_sacct(env, job, ["REQUEUED", "COMPLETED"], every_start=True)  # accounting lags the job's end


SETS_2 = ["model.bn=eval", "optim.steps=2", "optim.warmup_steps=1", "run.log_every=1", "run.ckpt_every=1",
          "eval.every=0", "eval.final_targets=0", "eval.probe_epochs=5", "eval.final_attack_steps=2",
          "eval.attack_steps=2", "eval.probe_train_size=64", "eval.test_size=32"]


@pytest.mark.slurm
def test_imagenet_sbatch_runs_one_rank_per_node_on_two_nodes_requeues_and_equals_one_process(
        tmp_path, base_encoder):
    env = slurm_env()
    require_or_skip("ADVFT_REQUIRE_SLURM", env is not None, HOW)
    require_or_skip("ADVFT_REQUIRE_SLURM", partition_nodes(env, "debug") >= 2,
                    "a two-node cluster (bash slurm/local-cluster.sh up --nodes 2)")
    run, log = tmp_path / "two" / "in1k", tmp_path / "slurm.out"
    sets = [f"model.checkpoint={base_encoder}", f"data.path={tmp_path / 'cache'}", f"run.root={tmp_path / 'two'}",
            "run.name=in1k", *SETS_2]
    held = tmp_path / "hold"
    env = {**env, **hold.environment(held, base=env)}
    # the script asks for whole GPU nodes: ask for the two CPU nodes instead, one rank (and one CPU) on each
    submit = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10",
         "--partition=debug", f"--output={log}", "--export=ALL,WANDB_MODE=disabled", "slurm/imagenet.sbatch",
         "tests/assets/test_tiny.toml", *(x for s in sets for x in ("--set", s))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    # held: rank 0 (on n1) at step 1, rank 1 (on n2) waiting for it in the stop all-reduce
    job = usr1_when_held_then_finished(env, submit.stdout, held, run, log)
    text = log.read_text()
    # the head is n1, reached at its NodeAddr; each start ran one rank on each node, with the CPU it asked for
    assert "on 2 node(s) x 1 process(es), head n1 (127.0.0.1):" in text, text[-3000:]
    for node in ("0 (n1)", "1 (n2)"):
        assert text.count(f"[sbatch] node {node}: 1 CPU(s) for its 1 process(es)") == 2, text[-3000:]
    assert f"requeueing job {job}" in text, text[-3000:]
    starts = json.loads((run / "manifest.json").read_text())["starts"]
    assert [s["world_size"] for s in starts] == [2, 2], starts
    assert [s["slurm"].get("SLURM_RESTART_COUNT") for s in starts] == [None, "1"]
    assert [s["slurm"].get("SLURM_NNODES") for s in starts] == ["2", "2"]
    assert starts[1]["resume_step"] == 1  # the held log step
    assert [r["step"] for r in _records(run, "train")] == [1, 2]  # no step lost or repeated
    wait_sacct(env, job, ["REQUEUED", "COMPLETED"], every_start=True)
    # one process with the same global batch ends where the two ranks did, within the last float bits that
    # the ranks' all-reduced gradient changes (tests/test_distributed.py: why 2 steps and this tolerance)
    one = subprocess.run([sys.executable, "launch/train.py", "tests/assets/test_tiny.toml",
                          *(x for s in sets for x in ("--set", s)), "--set", "run.name=one"], cwd=ROOT,
                         env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a = ckpt.load_latest(tmp_path / "two" / "one")[1]["model"]
    b = ckpt.load_latest(run)[1]["model"]
    base = torch.load(base_encoder, weights_only=True)["model"]
    assert max((a[k].float() - base[k].float()).abs().max().item() for k in a) > 1e-3  # training moved it
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)
