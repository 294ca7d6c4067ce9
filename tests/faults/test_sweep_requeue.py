"""The requeue signal through a SWEEP job, twice in one run: submitit's own machinery end to end.

``launch/sweep.py --cluster local`` submits the fault run as a submitit job (``launch/job.py``'s
Checkpointable under submitit's local controller, as on a cluster node). The test sends the job's task
process SIGUSR2 (submitit's timeout/preemption signal) while its first start waits at its first log step
(``hold.py``: the run waits there for the signal, so it cannot finish first on a fast machine), and again
while the requeued start waits at its first log step: each time the run stops at that step boundary,
submitit's handler requeues the job, the controller starts it again, and the run resumes from the
checkpoint of that boundary. Unlike the
in-process trials of test_requeue.py, this goes through the job's signal handling, submitit's requeue and
the job's environment set-up (threads, distributed variables) and ends bit-identical all the same.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

from faults import helpers as H
from faults import hold
from faults.record import record
from launch import sweep as S

FAULT = "requeue signal"


def _task_pid(controller_pid: int) -> int | None:
    """The job's task process: the one child of submitit's local controller (None while there is none)."""
    try:
        children = Path(f"/proc/{controller_pid}/task/{controller_pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if len(children) == 1 else None


def test_usr2_twice_to_a_local_sweep_job_requeues_it_and_the_run_ends_bit_identical(tmp_path, base_encoder,
                                                                                      fault_cache, reference,
                                                                                      monkeypatch):
    sets = [s for s in H.fault_sets(base_encoder, fault_cache, tmp_path / "runs", "unused")
            if not s.startswith("run.name=")]
    argv = ["--job", str(H.JOB), *(x for s in sets for x in ("--set", s)), "--cluster", "local", "--name", "rq"]
    plan = S.build_plan(S.parse_args(argv))
    run = plan.runs[0].cfg.run.dir
    held = tmp_path / "hold"
    with monkeypatch.context() as m:  # the job inherits this environment
        m.delenv("OMP_NUM_THREADS", raising=False)  # as on a cluster node: the job alone sets its thread count
        for k, v in hold.environment(held, starts=2).items():
            m.setenv(k, v)
        job, = S.submit(plan, plan.runs)
    controller = job._process.pid
    signalled = []
    try:
        for n in (0, 1):  # the first start, then the first requeued start, each held at its first log step
            hold.wait_held(held, n, alive=lambda: job.state == "RUNNING")
            pid = H.wait_for(lambda: _task_pid(controller), "the job's task process", timeout_s=60)
            os.kill(pid, signal.SIGUSR2)
            signalled.append(pid)
        H.wait_for(lambda: H.status(run) == "finished", "the run to finish", timeout_s=240)
        H.wait_for(lambda: job.state != "RUNNING", "the job to end", timeout_s=60)
    finally:
        if job.state == "RUNNING":
            job.cancel()
    resumed = H.starts(run)
    ok, detail = H.compare_to_reference(run, reference)
    err = job.stderr() or ""
    out = job.stdout() or ""
    requeued = out.count("Requeued job")
    ok = ok and resumed == [0, 1, 2] and requeued == 2 and len(set(signalled)) == 2
    record(FAULT, "real SIGUSR2 twice to a sweep job (submitit local executor)",
           f"the job stopped at steps {resumed[1:]}, submitit requeued it {requeued} times, each start resumed "
           f"there (starts at steps {resumed})", ok, detail,
           how="os.kill(task pid, SIGUSR2) while each start of a launch/sweep.py --cluster local job waits at step 1")
    assert resumed == [0, 1, 2], (resumed, err[-3000:])
    assert "stopped at step 1 on request" in err and "stopped at step 2 on request" in err, err[-3000:]
    assert requeued == 2, out[-3000:]
    assert ok, detail
