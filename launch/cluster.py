"""Where jobs run: submitit executors for SLURM, local processes or in-process debugging, the sbatch script
a sweep would submit, and which of a sweep's jobs are still queued or running.

Only this module and ``launch/job.py`` talk to submitit; cluster facts come in as a :class:`Profile`.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import submitit

from advft.config import ConfigError
from launch.profiles import Profile, local_parameters, slurm_parameters

KINDS = ("auto", "slurm", "local", "debug")


class ClusterError(RuntimeError):
    """The cluster's tools failed (squeue unreachable, ...): one line for the user, no traceback."""


def slurm_unavailable() -> str | None:
    """Why SLURM cannot take jobs here (None: it can). An installed client whose controller does not answer
    (no slurm.conf, slurmctld down) is not a cluster: ``sbatch`` would fail at submission."""
    if not (shutil.which("sbatch") and shutil.which("srun")):
        return "sbatch/srun are not on PATH"
    try:
        ping = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as e:
        return f"sinfo failed ({e})"
    if ping.returncode != 0:
        lines = (ping.stderr or ping.stdout).strip().splitlines()
        return "the SLURM controller does not answer (sinfo: " + (lines[-1] if lines else f"exit {ping.returncode}") + ")"
    return None


def choose_kind(cluster: str, submitting: bool = True) -> tuple[str, str]:
    """The executor kind and, when ``auto`` fell back to local processes, the line that says why.
    ``auto``: SLURM when a controller answers, else local processes. A dry run of ``slurm`` needs no SLURM."""
    if cluster not in KINDS:
        raise ConfigError(f"--cluster {cluster!r} is not valid; choose one of: {', '.join(KINDS)}")
    if cluster == "auto":
        why = slurm_unavailable()
        return ("slurm", "") if why is None else ("local", f"--cluster auto: local processes, since {why}")
    if cluster == "slurm" and submitting and not (shutil.which("sbatch") and shutil.which("srun")):
        raise ConfigError("--cluster slurm but sbatch/srun are not on PATH; use --cluster local (or auto)")
    return cluster, ""


def resolve_kind(cluster: str, submitting: bool = True) -> str:
    """:func:`choose_kind` without the note."""
    return choose_kind(cluster, submitting)[0]


def make_executor(kind: str, folder: Path, profile: Profile, name: str = "advft") -> submitit.Executor:
    """An executor whose jobs are time-limited, signalled and requeued as the profile says."""
    if kind == "slurm":
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=profile.max_num_timeout)
        ex.update_parameters(job_name=name, **slurm_parameters(profile))
        return ex
    if kind == "local":
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=profile.max_num_timeout)
        ex.update_parameters(**local_parameters(profile))
        return ex
    if kind == "debug":
        return submitit.DebugExecutor(folder=folder)
    raise ValueError(kind)


def _after(kind: str, after: list[str]) -> dict[str, Any]:
    """sbatch options that start a job only once the jobs ``after`` have COMPLETED (exit 0); if one of them
    fails, SLURM cancels the waiting job instead of keeping it pending forever."""
    if not after:
        return {}
    if kind != "slurm":
        raise ValueError(f"the {kind} executor has no job dependencies")  # the sweep waits itself there
    return {"dependency": "afterok:" + ":".join(after), "additional_parameters": {"kill-on-invalid-dep": "yes"}}


def submit_array(kind: str, folder: Path, profile: Profile, fns: list[Callable[[], Any]],
                 name: str = "advft", after: list[str] | None = None) -> list[Any]:
    """Submit the callables as ONE job array (``executor.batch()``) named ``name``; returns submitit's jobs.
    ``after``: SLURM job ids that must complete successfully first (``--dependency=afterok``)."""
    ex = make_executor(kind, folder, profile, name)
    ex.update_parameters(**_after(kind, after or []))
    # the job unpickles launch.job's classes with this interpreter, where advft and launch are installed
    with ex.batch():
        jobs = [ex.submit(fn) for fn in fns]
    return jobs


def submit_job(kind: str, folder: Path, profile: Profile, fn: Callable[[], Any], name: str = "advft") -> Any:
    """Submit one callable as one job (not an array) named ``name``; returns submitit's job."""
    ex = make_executor(kind, folder, profile, name)
    return ex.submit(fn)


def sbatch_script(profile: Profile, folder: Path, n_runs: int | None, name: str = "advft",
                  after: list[str] | None = None) -> str:
    """The sbatch script of a job array of ``n_runs`` runs (one job when None), as submitit writes it (for
    --dry-run); ``after`` as :func:`submit_array`."""
    from submitit.slurm.slurm import _make_sbatch_string  # submitit renders; we only show it

    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    params: dict[str, Any] = {"job_name": name, **slurm_parameters(profile),
                              **_after("slurm", after or [])}
    return _make_sbatch_string(command=command, folder=folder, map_count=n_runs, **params)


def job_ids(jobs: list[Any]) -> list[str]:
    return [str(j.job_id) for j in jobs]


def active_states(kind: str, ids: list[str]) -> dict[str, str]:
    """State of each job id that is still queued, running or being requeued; ended jobs are absent."""
    ids = [i for i in ids if i]
    if not ids:
        return {}
    if kind == "slurm":
        return _squeue(ids)
    if kind == "local":
        return {i: "RUNNING" for i in ids if _local_alive(i)}
    return {}  # debug jobs run inside the sweep process and are over when it is


def _squeue(ids: list[str]) -> dict[str, str]:
    arrays = sorted({i.split("_")[0] for i in ids})
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(arrays)],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise ClusterError(f"squeue failed: {e}") from None
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:  # every job of the list has left the queue
            return {}
        raise ClusterError(f"squeue failed: {out.stderr.strip()}")
    states = {}
    for line in out.stdout.splitlines():
        jid, _, state = line.strip().partition("|")
        states[jid] = state
    return {i: states[i] for i in ids if i in states}


def _local_alive(pid: str) -> bool:
    """A local job's id is the pid of its submitit controller; a reused pid belongs to another program."""
    try:
        cmd = Path(f"/proc/{int(pid)}/cmdline").read_bytes()
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return False
    zombie = stat.rpartition(")")[2].split()[0] == "Z"
    # an empty command line: the controller is being started (exec not done yet)
    return not zombie and (not cmd or b"submitit.local._local" in cmd)


def job_log(folder: Path, job_id: str) -> Path:
    """The stderr log of a job's first task (where a crash's traceback is)."""
    return submitit.core.utils.JobPaths(folder, job_id=job_id, task_id=0).stderr
