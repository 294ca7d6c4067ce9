"""Run a grid of fine-tuning runs as ONE submitit job array: ``python launch/sweep.py --grid alpha=0,0.1,1``.

Every point of the cartesian product of the ``--grid`` axes is one run of the job file (plus ``--set``
overrides), named by its grid values and config hash and living in ``<run.root>/<sweep>/<run>/``. All
configs are validated before anything is submitted. Rerunning a sweep is safe: finished runs are skipped,
runs whose job is still queued or running are left alone, unfinished and failed runs are submitted again
(and resume from their last checkpoint). When the runs' base encoder (``model.checkpoint``) is missing and
``model.pretrain`` names the pretraining job that makes it, that job runs first, once: on SLURM the array
waits for it (``--dependency=afterok``, and is cancelled if it fails), elsewhere the sweep waits for it and
then submits the array; a finished pretraining is not run again. ``--cluster auto`` uses SLURM when
its controller answers, else local processes (the plan says why); the cluster's facts come from a profile in ``slurm/profiles/``
(``--profile``, default ``$ADVFT_PROFILE`` or ``local``) plus the overrides below.

Writes ``<run.root>/<sweep>/sweep.json`` (command line, grid, runs, pretraining, job ids, cluster). Exit codes:
0 done (with --wait: every run finished), 1 a run or the pretraining failed or the cluster refused the
submission, 2 bad input (one line on stderr; nothing written, nothing submitted).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any

from advft import config as C
from launch.sweeper.plan import (Decision, Held, Plan, PlannedPretrain, PlannedRun, build_plan, decide,
                                 decide_pretraining)
from launch.sweeper.record import read_sweep, sweep_lock, table, update_record, write_sweep
from launch.sweeper.submit import Refused, submit, submit_pretraining
from launch.sweeper.watch import follow, wait_pretraining

DEFAULT_JOB = "jobs/demo.toml"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, like every other bad input (argparse adds the usage)
        print(f"error: {message} (see launch/sweep.py --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="launch/sweep.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", default=DEFAULT_JOB, help=f"TOML job file (default {DEFAULT_JOB})")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=v1,v2,...",
                   help="one axis of the grid (repeatable); aliases alpha, beta, lr; tuples as (0.9,0.95),"
                        "(0.9,0.999); loss.name=fare,cosine,trades crosses the losses (a loss runs once per "
                        "weight it does not read)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value for every run (repeatable)")
    p.add_argument("--cluster", default="auto", help="auto (slurm if its controller answers, else local) | slurm | "
                   "local | debug (in this process, one run after the other)")
    p.add_argument("--profile", default=None, help="cluster profile: a name in slurm/profiles/ or a TOML path "
                   "(default $ADVFT_PROFILE or local)")
    p.add_argument("--partition", help="override the profile's partition")
    p.add_argument("--nodes", help="override the profile's nodes per run")
    p.add_argument("--gpus-per-node", help="override the profile's GPUs per node")
    p.add_argument("--timeout-min", help="override the profile's time limit per job (minutes)")
    p.add_argument("--cluster-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any other profile key, e.g. qos=high (repeatable; keys in slurm/README.md)")
    p.add_argument("--name", help="sweep name, the folder under run.root (default: the job file's name)")
    p.add_argument("--dry-run", action="store_true", help="print what would be submitted, submit nothing")
    p.add_argument("--wait", action="store_true", help="follow the runs and end with a results table")
    return p.parse_args(argv)


def print_plan(plan: Plan, decisions: dict[str, Decision], job_ids: dict[str, str], dry: bool,
               pre: dict[str, Decision] | None = None, pre_ids: dict[str, str] | None = None,
               held: Held = Held.NO) -> None:
    """The plan as a table: the pretraining first (if any), then the runs; ``held``: how the runs to submit
    wait for the pretraining."""
    p = plan.profile
    print(f"sweep {plan.name}: {len(plan.runs)} run(s) of {plan.job} in {plan.sweep_dir}\n"
          f"cluster {plan.kind}, profile {p.name}: {p.nodes} node(s) x {p.tasks} task(s), "
          f"{p.gpus_per_node} GPU(s)/node, {p.timeout_min} min/job, requeue signal {p.signal_delay_s} s before")
    if plan.note:
        print(plan.note)
    pre, pre_ids = pre or {}, pre_ids or {}
    for t in plan.pretrains:
        print(f"pretraining {t.job} -> {t.encoder}: the base encoder of {len(t.runs)} run(s)")
    pre_label = {Decision.FINISHED: "finished (cached)", Decision.ACTIVE: "queued or running (reused)",
                 Decision.UNNEEDED: "not needed (no run to submit)",
                 Decision.SUBMIT: "would submit" if dry else "submitted"}
    if dry:
        submitting = "would submit after the pretraining" if held is not Held.NO else "would submit"
    else:
        submitting = {Held.NO: "submitted", Held.WAIT: "waits for the pretraining",
                      Held.AFTER: "submitted, starts after the pretraining"}[held]
    label = {Decision.FINISHED: "finished (skipped)", Decision.ACTIVE: "queued or running (skipped)",
             Decision.SUBMIT: submitting}
    rows = [[f"pretraining {t.cfg.run.name}", pre_ids.get(t.key, "-"), pre_label[pre[t.key]]]
            for t in plan.pretrains if t.key in pre]
    rows += [[r.name, job_ids.get(r.name, "-"), label[decisions[r.name]]] for r in plan.runs]
    print(table(["run", "job id", "state"], rows))


def hints(plan: Plan) -> None:
    from advft.engine.record import wandb_mode

    if any(wandb_mode(r.cfg.run.wandb) == "offline" for r in plan.runs):
        print(f"wandb runs are offline (no API key here); upload them later with: "
              f"wandb sync {plan.sweep_dir}/*/wandb/offline-run-*")
    print(f"report (at any time, also while runs go on): python launch/report.py {plan.sweep_dir}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parse_args(argv)
    except SystemExit as e:  # --help, or a bad flag (already reported on one line)
        return int(e.code or 0)
    try:
        plan = build_plan(args)
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = [sys.executable, "launch/sweep.py", *argv]
    from launch.cluster import ClusterError

    try:
        return dry_run(plan) if args.dry_run else _submit_and_report(plan, args, command)
    except (TimeoutError, ClusterError) as e:  # a stuck sweep holds the lock; squeue does not answer
        print(f"error: {e}", file=sys.stderr)
        return 1


def dry_run(plan: Plan) -> int:
    """What a real sweep would do now, and the sbatch scripts it would submit; writes nothing."""
    record = read_sweep(plan.sweep_dir)
    decisions = decide(plan, record)
    pre = decide_pretraining(plan, record, decisions)
    known = record.get("pretraining", {})
    pre_ids = {k: known[k]["job_id"] for k, d in pre.items() if d is Decision.ACTIVE}
    new = [t for t in plan.pretrains if pre[t.key] is Decision.SUBMIT]
    print_plan(plan, decisions, {}, dry=True, pre=pre, pre_ids=pre_ids, held=Held.AFTER if new or pre_ids else Held.NO)
    todo = [r for r in plan.runs if decisions[r.name] is Decision.SUBMIT]
    if plan.kind == "slurm" and todo:
        from launch.cluster import sbatch_script

        for t in new:
            print(f"\n# the sbatch script of the pretraining {t.cfg.run.name} ({t.job}), as submitit would write it:")
            print(sbatch_script(plan.profile, plan.submitit_dir, None, name=f"advft-{plan.name}-pretrain"))
        after = [*pre_ids.values(), *(["PRETRAINING_JOB_ID"] if new else [])]
        print(f"\n# the sbatch script of the job array ({len(todo)} task(s)), as submitit would write it:")
        print(sbatch_script(plan.profile, plan.submitit_dir, len(todo), name=f"advft-{plan.name}", after=after))
    print("dry run: nothing submitted, nothing written")
    return 0


@dataclass
class _Round:
    """One pass of a sweep: the decisions taken under the lock and what was submitted."""

    record: dict[str, Any]
    decisions: dict[str, Decision]
    pre: dict[str, Decision]
    waiting: list[PlannedPretrain]  # pretrainings the runs to submit depend on (new or reused)
    pre_jobs: dict[str, Any]  # submitit jobs of the pretrainings submitted now
    held: Held
    jobs: list[Any] = field(default_factory=list)  # submitit jobs of the runs submitted now
    todo: list[PlannedRun] = field(default_factory=list)


def _submit_and_report(plan: Plan, args: argparse.Namespace, command: list[str]) -> int:
    try:
        rnd = _first_round(plan, command)
        if rnd.held is Held.WAIT:
            print_plan(plan, rnd.decisions, {}, dry=False, pre=rnd.pre, pre_ids=_pre_ids(rnd.record), held=Held.WAIT)
            if wait_pretraining(plan, rnd.waiting, rnd.record, rnd.pre_jobs, submitted_runs=False):
                return 1
            _second_round(plan, command, rnd)
            print()
    except Refused as e:
        print(f"error: the cluster refused the submission: {e}", file=sys.stderr)
        return 1
    ids = {n: e.get("job_id", "-") for n, e in rnd.record["runs"].items()}
    print_plan(plan, rnd.decisions, ids, dry=False, pre=rnd.pre, pre_ids=_pre_ids(rnd.record),
               held=Held.AFTER if rnd.held is Held.AFTER else Held.NO)
    if not rnd.todo:
        print("nothing to submit: every run is finished or still queued")
    print(f"record: {plan.sweep_dir / 'sweep.json'}")
    hints(plan)
    if args.wait or plan.kind == "debug":
        if rnd.held is Held.AFTER and wait_pretraining(plan, rnd.waiting, rnd.record, rnd.pre_jobs, submitted_runs=True):
            return 1
        followed = [r.name for r in plan.runs if rnd.decisions[r.name] is not Decision.FINISHED]
        return follow(plan, followed, rnd.record, {r.name: j for r, j in zip(rnd.todo, rnd.jobs)})
    return 0


def _pre_ids(record: dict[str, Any]) -> dict[str, str]:
    return {k: e.get("job_id", "-") for k, e in record.get("pretraining", {}).items()}


def _first_round(plan: Plan, command: list[str]) -> _Round:
    """Under the lock: decide, submit the pretrainings to run, and the runs unless they must wait here."""
    with sweep_lock(plan.sweep_dir):
        record = read_sweep(plan.sweep_dir)
        decisions = decide(plan, record)
        pre = decide_pretraining(plan, record, decisions)
        new = [t for t in plan.pretrains if pre[t.key] is Decision.SUBMIT]
        pre_jobs = submit_pretraining(plan, new) if new else {}
        pre_submitted = {k: str(j.job_id) for k, j in pre_jobs.items()}
        record = update_record(plan, record, command, decisions, {}, pre, pre_submitted)
        waiting = [t for t in plan.pretrains if pre[t.key] in (Decision.SUBMIT, Decision.ACTIVE)]
        # SLURM holds the array until the pretraining has completed; elsewhere (or for a pretraining job that an
        # earlier sweep started outside SLURM) there are no dependencies: wait for it here, without the lock (so
        # another sweep sees it and reuses it), then submit the runs
        wait_here = bool(waiting) and (plan.kind != "slurm" or any(
            record["pretraining"][t.key].get("cluster") != "slurm" for t in waiting))
        held = Held.WAIT if wait_here else Held.AFTER if waiting else Held.NO
        rnd = _Round(record, decisions, pre, waiting, pre_jobs, held)
        rnd.todo = [r for r in plan.runs if decisions[r.name] is Decision.SUBMIT]
        try:
            if rnd.todo and not wait_here:
                _submit_runs(plan, command, rnd, after=[record["pretraining"][t.key]["job_id"] for t in waiting])
        finally:  # also when refused: with the id of a pretraining submitted just now
            write_sweep(plan.sweep_dir, rnd.record)
    return rnd


def _second_round(plan: Plan, command: list[str], rnd: _Round) -> None:
    """After the pretraining, under the lock again: another sweep may have submitted the runs meanwhile."""
    with sweep_lock(plan.sweep_dir):
        rnd.record = read_sweep(plan.sweep_dir)
        rnd.decisions = decide(plan, rnd.record)
        rnd.todo = [r for r in plan.runs if rnd.decisions[r.name] is Decision.SUBMIT]
        if rnd.todo:
            _submit_runs(plan, command, rnd)
        else:
            rnd.record = update_record(plan, rnd.record, command, rnd.decisions, {}, rnd.pre)
        write_sweep(plan.sweep_dir, rnd.record)


def _submit_runs(plan: Plan, command: list[str], rnd: _Round, after: list[str] | None = None) -> None:
    rnd.jobs = submit(plan, rnd.todo, after=after)
    submitted = {r.name: str(j.job_id) for r, j in zip(rnd.todo, rnd.jobs)}
    rnd.record = update_record(plan, rnd.record, command, rnd.decisions, submitted, rnd.pre)
