"""Following a sweep's jobs to their end: one line whenever a job changes (state, step), then the results
table and the report."""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable

from launch.sweeper.plan import Plan, PlannedPretrain
from launch.sweeper.record import last_step, results_table, run_results

POLL_S = 3.0


def follow(plan: Plan, names: list[str], record: dict[str, Any], jobs: dict[str, Any]) -> int:
    """Print a line whenever a followed run changes (state, step), then the results table of the whole
    sweep. Returns 0 iff every run of the sweep finished."""
    from launch.cluster import job_log

    runs = {r.name: r for r in plan.runs}
    if plan.kind == "debug":  # debug jobs run here, now, one after the other
        for name, job in jobs.items():
            print(f"[{time.strftime('%H:%M:%S')}] {name}: running in this process", flush=True)
            try:
                job.results()
            except Exception as e:  # noqa: BLE001 - reported in the table
                print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
    ids = {n: record["runs"][n].get("job_id", "") for n in names}

    def line(n: str, state: str | None) -> str:
        if state:
            return f"{state} step {last_step(runs[n].cfg.run.dir)}/{runs[n].cfg.optim.steps}"
        status = run_results(runs[n].cfg.run.dir).get("status")
        return status if status in ("finished", "failed") else "ended without a result"

    if plan.kind != "debug":
        watch(plan, jobs.values(), [(n, n, ids[n], record["runs"][n].get("cluster", plan.kind)) for n in names], line)
    print(results_table([(r.name, r.cfg.run.dir, r.cfg.to_dict()) for r in plan.runs]))
    bad = [r.name for r in plan.runs if run_results(r.cfg.run.dir).get("status") != "finished"]
    for n in bad:
        if ids.get(n) and plan.kind != "debug":
            print(f"{n}: log {job_log(plan.submitit_dir, ids[n])}", file=sys.stderr)
    unfinished = [n for n in bad if run_results(runs[n].cfg.run.dir).get("status") != "failed"]
    if unfinished:  # a time limit or a kill: the checkpoints are there, the same command resumes from them
        print(f"{len(unfinished)} run(s) ended without a result (time limit or killed; their logs above): rerun "
              "the same command to resume them from their last checkpoint", file=sys.stderr)
    write_report(plan)
    return 1 if bad else 0


def write_report(plan: Plan) -> None:
    """REPORT.md and its figures in the sweep folder (failed or missing runs are shown as such there); a
    report that cannot be written is one warning line, never the sweep's failure."""
    from advft import report as R

    try:
        print(f"report: {R.write_report(plan.sweep_dir)}")
    except (R.ReportError, OSError) as e:
        print(f"warning: the report was not written ({e}); try: python launch/report.py {plan.sweep_dir}",
              file=sys.stderr)


def watch(plan: Plan, jobs: Iterable[Any], watched: list[tuple[str, str, str, str]],
          line: Callable[[str, str | None], str]) -> None:
    """Print ``[time] label (job id): line`` whenever a watched job's line changes; return once none of them
    is queued or running. ``watched``: (key, label, job id, cluster kind); ``line(key, state)`` says what
    to show for a job in squeue-like ``state``, or once it has ended (``state`` None)."""
    from launch.cluster import active_states

    shown: dict[str, str] = {}
    while True:
        if plan.kind == "local":
            for job in jobs:
                _ = job.state  # reaps a finished controller (our child), so its pid is not counted as running
        active: dict[str, str] = {}
        for kind in {k for *_, k in watched}:
            active.update(active_states(kind, [i for _, _, i, k in watched if k == kind]))
        for key, label, job_id, _ in watched:
            text = line(key, active.get(job_id) if job_id else None)
            if shown.get(key) != text:
                shown[key] = text
                print(f"[{time.strftime('%H:%M:%S')}] {label} (job {job_id or '-'}): {text}", flush=True)
        if not any(job_id and job_id in active for _, _, job_id, _ in watched):
            return
        time.sleep(POLL_S)


def wait_pretraining(plan: Plan, waiting: list[PlannedPretrain], record: dict[str, Any], jobs: dict[str, Any],
                     submitted_runs: bool) -> int:
    """Follow the pretraining jobs to their end, printing a line whenever one changes (state, step).
    Returns 0 iff every one finished; else one error line per failed one, naming its log."""
    from launch.cluster import job_log

    entries = record["pretraining"]
    ids = {t.key: entries[t.key].get("job_id", "") for t in waiting}
    errors: dict[str, str] = {}
    if plan.kind == "debug":  # in this process, now
        for t in waiting:
            if t.key in jobs:
                print(f"[{time.strftime('%H:%M:%S')}] pretraining {t.cfg.run.name}: running in this process",
                      flush=True)
                try:
                    jobs[t.key].results()
                except Exception as e:  # noqa: BLE001 - reported below, on one line
                    errors[t.key] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    by_key = {t.key: t for t in waiting}

    def line(key: str, state: str | None) -> str:
        t = by_key[key]
        if state:
            return f"{state} step {last_step(t.cfg.run.dir)}/{t.cfg.optim.steps}"
        return "finished" if t.finished() else "ended without an encoder"

    watch(plan, jobs.values(), [(t.key, f"pretraining {t.cfg.run.name}", ids[t.key],
                                 entries[t.key].get("cluster", plan.kind)) for t in waiting], line)
    bad = [t for t in waiting if not t.finished()]
    after = ("SLURM cancels the runs that wait for it" if submitted_runs else "no run was submitted")
    for t in bad:
        why = errors.get(t.key) or f"status {run_results(t.cfg.run.dir).get('status', 'none')}"
        log = job_log(plan.submitit_dir, ids[t.key]) if ids[t.key] else "-"
        print(f"error: the pretraining {t.cfg.run.dir} failed ({why}); {after}; log: {log}", file=sys.stderr)
    return 1 if bad else 0
