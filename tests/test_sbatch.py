"""slurm/*.sbatch: one run with DDP through ``srun accelerate launch``, requeued by its own early signal.

The SLURM test needs the cluster of ``slurm/local-cluster.sh up`` (skipped without one, a failure when
ADVFT_REQUIRE_SLURM=1): one CPU node, so two gloo ranks in one task stand in for GPUs on several nodes.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from conftest import require_or_skip, wait_for
from faults import hold
from slurm_util import HOW, node_cpus, slurm_env, wait_sacct

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
                  "scontrol show hostnames", "scontrol requeue \"$SLURM_JOB_ID\""):
        assert piece in body, piece
    assert subprocess.run(["bash", "-n", str(ROOT / "slurm" / "run-accelerate.sh")]).returncode == 0


def _records(run: Path, kind: str) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


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
         "slurm/cifar10.sbatch", "jobs/test_tiny.toml", *(x for s in sets for x in ("--set", s))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    try:
        hold.wait_held(held)
        # what SLURM does N seconds before the time limit (#SBATCH --signal=B:USR1@N): signal the batch shell
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=env, check=True, timeout=30)
        wait_for(lambda: (run / "results.json").is_file()
                  and json.loads((run / "results.json").read_text())["status"] == "finished", "the run to finish")
        wait_for(lambda: "srun ended with status 0" in log.read_text(), "the batch script to end", timeout_s=60)
    finally:
        subprocess.run(["scancel", job], env=env, capture_output=True, timeout=30)
    text = log.read_text()
    assert "2 process(es)" in text and "CPU/gloo" in text
    assert f"requeueing job {job}" in text, text[-3000:]
    starts = json.loads((run / "manifest.json").read_text())["starts"]
    assert [s["world_size"] for s in starts] == [2, 2], starts  # DDP: two ranks, through srun, both times
    assert [s["slurm"].get("SLURM_RESTART_COUNT") for s in starts] == [None, "1"]
    assert starts[1]["resume_step"] == 2  # the held log step
    assert [r["step"] for r in _records(run, "train")] == list(range(2, 17, 2))  # no step lost or repeated
    wait_sacct(env, job, ["REQUEUED", "COMPLETED"], every_start=True)  # accounting lags the job's end
