"""The SLURM cluster of `slurm/local-cluster.sh` does what the sweep launcher and the sbatch scripts rely on.

These tests talk to a running cluster: `bash slurm/local-cluster.sh up --nodes 2` first (the one-node
tests run on node n1, which is in every partition; the two-node test needs n2 too). Without one they
skip, unless ADVFT_REQUIRE_SLURM=1 (set in CI), where they fail: a cluster that did not come up
must not pass as green. The client commands find the cluster through $SLURM_CONF, or else the
config in the script's state directory ($ADVFT_SLURM_STATE, default /var/lib/advft-slurm).

Jobs run as the submitting user on this machine, so they write straight into pytest's tmp_path.
Every job a test submits is cancelled when the test ends, passed or not.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from slurm_util import partition_nodes, slurm_conf

pytestmark = pytest.mark.slurm

NODE = "n1"  # the first node: the only one of partitions low and high
POLL_S = 0.5
T = TypeVar("T")

# A job that records each start with its restart count, then on its first run waits far longer than
# any test needs to preempt or requeue it, and on any later run finishes at once.
RESTARTABLE_JOB = (
    'n="${{SLURM_RESTART_COUNT:-0}}"; echo "start $n" >> {log}; '
    'if [ "$n" = 0 ]; then sleep 600; fi'
)


def _unavailable(reason: str) -> None:
    message = f"no local SLURM cluster: {reason} (start one with `bash slurm/local-cluster.sh up`)"
    if os.environ.get("ADVFT_REQUIRE_SLURM") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    """The environment for SLURM client commands, once the controller has answered."""
    if shutil.which("sbatch") is None:
        _unavailable("sbatch is not on PATH")
    conf = slurm_conf()
    if conf is None:
        _unavailable("SLURM_CONF is unset and the state directory holds no slurm.conf")
    env = {**os.environ, "SLURM_CONF": conf}
    try:
        probe = subprocess.run(
            ["sinfo", "-h", "-o", "%P"], env=env, capture_output=True, text=True, timeout=20
        )
    except subprocess.TimeoutExpired:
        _unavailable(f"sinfo with SLURM_CONF={conf} did not answer within 20 s")
    if probe.returncode != 0:
        _unavailable(f"sinfo with SLURM_CONF={conf} failed: {probe.stderr.strip()}")
    return env


def _run(env: dict[str, str], *argv: str) -> str:
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _wait_for(probe: Callable[[], T | None], what: str, timeout_s: float = 25.0) -> T:
    """Poll `probe` until it returns something other than None or False; fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(POLL_S)


def _job(env: dict[str, str], job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict; finished jobs stay visible for MinJobAge (300 s)."""
    fields = _run(env, "scontrol", "-o", "show", "job", job_id).split()
    return dict(field.split("=", 1) for field in fields if "=" in field)


def _job_state(env: dict[str, str], job_id: str) -> str:
    return _job(env, job_id)["JobState"]


def _sacct_states(env: dict[str, str], job_id: str) -> list[str]:
    """The allocation's state in every run, oldest first (-D: also the runs before a requeue)."""
    out = _run(env, "sacct", "-n", "-X", "-P", "-D", "-j", job_id, "-o", "State")
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _node_cpus(env: dict[str, str]) -> int:
    return int(_run(env, "sinfo", "-h", "-N", "-n", NODE, "-p", "debug", "-o", "%c").strip())


@pytest.fixture
def submit(slurm_env: dict[str, str]) -> Iterator[Callable[..., str]]:
    """sbatch with the given arguments; returns the job id. Cancels the test's jobs at the end."""
    submitted: list[str] = []

    def sbatch(*argv: str) -> str:
        job_id = _run(slurm_env, "sbatch", "--parsable", *argv).strip().split(";")[0]
        submitted.append(job_id)
        return job_id

    yield sbatch
    if submitted:
        subprocess.run(["scancel", *submitted], env=slurm_env, capture_output=True, timeout=30)


@pytest.fixture
def idle_node(slurm_env: dict[str, str]) -> None:
    """Wait until the previous test's cancelled jobs have left the node."""
    _wait_for(
        lambda: _run(slurm_env, "sinfo", "-h", "-n", NODE, "-p", "debug", "-o", "%T").strip()
        == "idle",
        f"node {NODE} to be idle",
    )


def test_node_is_idle_in_the_three_partitions(slurm_env: dict[str, str], idle_node: None) -> None:
    rows = _run(slurm_env, "sinfo", "-h", "-N", "-n", NODE, "-o", "%P %T").split("\n")
    states = dict(row.split() for row in rows if row.strip())
    assert states == {"debug*": "idle", "low": "idle", "high": "idle"}


def test_batch_job_writes_its_output_and_sacct_says_completed(
    slurm_env: dict[str, str], submit: Callable[..., str], tmp_path: Path
) -> None:
    out = tmp_path / "out.txt"
    job_id = submit("-o", str(out), "-w", NODE, "--wrap", 'echo "job $SLURM_JOB_ID ran on $SLURMD_NODENAME"')
    _wait_for(lambda: _sacct_states(slurm_env, job_id) == ["COMPLETED"], "sacct to say COMPLETED")
    assert _lines(out) == [f"job {job_id} ran on {NODE}"]
    assert _job(slurm_env, job_id)["ExitCode"] == "0:0"


def test_srun_steps_run_inside_a_batch_job(
    slurm_env: dict[str, str], submit: Callable[..., str], tmp_path: Path
) -> None:
    # submitit's batch script starts the work with srun: steps must find the cluster too.
    out = tmp_path / "out.txt"
    job_id = submit("-o", str(out), "--wrap", "srun sh -c 'echo step $SLURM_STEP_ID'")
    _wait_for(lambda: _sacct_states(slurm_env, job_id) == ["COMPLETED"], "sacct to say COMPLETED")
    assert _lines(out) == ["step 0"]


def test_a_two_node_job_runs_one_srun_task_on_each_node_reached_by_its_nodeaddr(
    slurm_env: dict[str, str], submit: Callable[..., str], tmp_path: Path
) -> None:
    if partition_nodes(slurm_env, "debug") < 2 and os.environ.get("ADVFT_REQUIRE_SLURM") != "1":
        pytest.skip("a one-node cluster (bash slurm/local-cluster.sh up --nodes 2 makes two)")
    out = tmp_path / "out.txt"
    job_id = submit("-N", "2", "--ntasks-per-node=1", "-o", str(out), "--wrap",
                    "srun sh -c 'echo task $SLURM_PROCID node $SLURM_NODEID on $SLURMD_NODENAME'")
    _wait_for(lambda: _sacct_states(slurm_env, job_id) == ["COMPLETED"], "sacct to say COMPLETED")
    assert sorted(_lines(out)) == ["task 0 node 0 on n1", "task 1 node 1 on n2"]
    # the node names resolve nowhere: what connects to a node uses the address SLURM has for it
    for node in ("n1", "n2"):
        assert "NodeAddr=127.0.0.1 " in _run(slurm_env, "scontrol", "-o", "show", "node", node)


def test_failing_job_is_accounted_failed(
    slurm_env: dict[str, str], submit: Callable[..., str], tmp_path: Path
) -> None:
    # submitit tells a crashed job from a lost one by what sacct reports.
    job_id = submit("-o", str(tmp_path / "out.txt"), "--wrap", "exit 3")
    _wait_for(lambda: _sacct_states(slurm_env, job_id) == ["FAILED"], "sacct to say FAILED")
    assert _job(slurm_env, job_id)["ExitCode"] == "3:0"


def test_two_single_cpu_jobs_run_at_once(
    slurm_env: dict[str, str], submit: Callable[..., str], idle_node: None, tmp_path: Path
) -> None:
    if _node_cpus(slurm_env) < 2:
        pytest.skip("the node has a single CPU")
    # Neither asks for memory: DefMemPerCPU must keep each from taking the whole node's.
    jobs = [submit("-c", "1", "-o", str(tmp_path / f"{i}.txt"), "--wrap", "sleep 600") for i in (0, 1)]
    _wait_for(
        lambda: all(_job_state(slurm_env, job_id) == "RUNNING" for job_id in jobs),
        "both 1-CPU jobs to be running",
    )


def test_high_partition_job_preempts_and_requeues_a_low_job(
    slurm_env: dict[str, str], submit: Callable[..., str], idle_node: None, tmp_path: Path
) -> None:
    starts = tmp_path / "starts.txt"
    low = submit("-p", "low", "-c", "1", "-o", str(tmp_path / "low.txt"),
                 "--wrap", RESTARTABLE_JOB.format(log=starts))
    _wait_for(lambda: _lines(starts) == ["start 0"], "the low job to start")

    # --exclusive: the high job needs the whole node, so it can only run by preempting.
    high = submit("-p", "high", "--exclusive", "-o", str(tmp_path / "high.txt"), "--wrap", "sleep 2")
    _wait_for(lambda: _sacct_states(slurm_env, high) == ["COMPLETED"], "the high job to complete")
    _wait_for(lambda: _job_state(slurm_env, low) == "COMPLETED", "the requeued low job to complete")

    assert _lines(starts) == ["start 0", "start 1"]
    assert _job(slurm_env, low)["Restarts"] == "1"
    _wait_for(lambda: _sacct_states(slurm_env, low) == ["PREEMPTED", "COMPLETED"], "sacct to show both runs")


def test_scontrol_requeue_runs_a_running_job_again(
    slurm_env: dict[str, str], submit: Callable[..., str], idle_node: None, tmp_path: Path
) -> None:
    starts = tmp_path / "starts.txt"
    job_id = submit("-o", str(tmp_path / "out.txt"), "--wrap", RESTARTABLE_JOB.format(log=starts))
    _wait_for(lambda: _lines(starts) == ["start 0"], "the job to start")

    _run(slurm_env, "scontrol", "requeue", job_id)
    _wait_for(lambda: _job_state(slurm_env, job_id) == "COMPLETED", "the requeued job to complete")

    assert _lines(starts) == ["start 0", "start 1"]
    assert _job(slurm_env, job_id)["Restarts"] == "1"
    _wait_for(lambda: _sacct_states(slurm_env, job_id) == ["REQUEUED", "COMPLETED"], "sacct to show both runs")
