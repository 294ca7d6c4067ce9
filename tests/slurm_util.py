"""Finding the local test cluster (``bash slurm/local-cluster.sh up``) and reading its accounting.

Shared by every test that talks to SLURM. ``sacct`` reads slurmdbd, which learns of a job's start, end
and array tasks asynchronously from slurmctld: right after a job ends, sacct may still say RUNNING, or
show an array as one record. So tests never assert on one sacct reading; they wait, with a deadline,
until sacct says what they expect (and show the last reading when it never does).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

DEFAULT_STATE = Path("/var/lib/advft-slurm")
HOW = "the local SLURM cluster (bash slurm/local-cluster.sh up)"


def slurm_conf() -> str | None:
    """$SLURM_CONF, else the config in the local cluster's state folder, else None."""
    if os.environ.get("SLURM_CONF"):
        return os.environ["SLURM_CONF"]
    conf = Path(os.environ.get("ADVFT_SLURM_STATE", DEFAULT_STATE)) / "etc" / "slurm.conf"
    return str(conf) if conf.is_file() else None


def slurm_env() -> dict[str, str] | None:
    """The environment for SLURM client commands once the controller answers, else None."""
    conf = slurm_conf()
    if not (conf and shutil.which("sbatch")):
        return None
    env = {**os.environ, "SLURM_CONF": conf}
    try:
        probe = subprocess.run(["sinfo", "-h", "-o", "%c"], env=env, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None
    return env if probe.returncode == 0 and probe.stdout.strip() else None


def node_cpus(env: dict[str, str]) -> int:
    out = subprocess.run(["sinfo", "-h", "-o", "%c"], env=env, capture_output=True, text=True, timeout=30).stdout
    return int(out.split()[0].rstrip("+"))


def partition_nodes(env: dict[str, str], partition: str) -> int:
    """How many nodes the partition has (0 when sinfo does not know it)."""
    out = subprocess.run(["sinfo", "-h", "-p", partition, "-o", "%D"], env=env, capture_output=True, text=True,
                         timeout=30).stdout.split()
    return sum(int(n) for n in out if n.isdigit())


def in_queue(job_id: str, env: dict[str, str] | None = None) -> bool:
    """Whether SLURM still lists the job as pending, running or requeued (a job that died has left the queue)."""
    p = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=env, capture_output=True, text=True,
                       timeout=30)
    return p.returncode == 0 and bool(p.stdout.strip())


def sacct(env: dict[str, str], job_id: str, fields: str = "State", *, every_start: bool = False) -> list[str]:
    """One sacct reading: a line per allocation (-X) of ``job_id``; ``every_start`` (-D) also lists the
    runs before a requeue, oldest first. A State is cut to its first word ("CANCELLED by 0")."""
    argv = ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", fields] + (["-D"] if every_start else [])
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def wait_sacct(env: dict[str, str], job_id: str, expected: list[str] | Callable[[list[str]], bool],
               fields: str = "State", *, every_start: bool = False, sort: bool = False,
               timeout_s: float = 120.0) -> list[str]:
    """Poll sacct until its reading equals ``expected`` (sorted first with ``sort``), or satisfies it when
    it is a predicate; fail with the last reading after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = sacct(env, job_id, fields, every_start=every_start)
        got = sorted(rows) if sort else rows
        if expected(got) if callable(expected) else got == expected:
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"sacct for job {job_id} still says {rows} after {timeout_s:.0f} s, "
                                 f"expected {expected}")
        time.sleep(1.0)
