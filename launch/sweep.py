#!/usr/bin/env python
"""Run a grid of fine-tuning runs as ONE submitit job array: ``python launch/sweep.py --grid alpha=0,0.1,1``.

Every point of the cartesian product of the ``--grid`` axes is one run of the job file (plus ``--set``
overrides), named by its grid values and config hash and living in ``<run.root>/<sweep>/<run>/``. All
configs are validated before anything is submitted. Rerunning a sweep is safe: finished runs are skipped,
runs whose job is still queued or running are left alone, unfinished and failed runs are submitted again
(and resume from their last checkpoint). When the runs' base encoder (``model.checkpoint``) is missing and
``model.pretrain`` names the pretraining job that makes it, that job runs first, once: on SLURM the array
waits for it (``--dependency=afterok``, and is cancelled if it fails), elsewhere the sweep waits for it and
then submits the array; a finished pretraining is not run again. ``--cluster auto`` uses SLURM when
``sbatch`` is on PATH, else local processes; the cluster's facts come from a profile in ``slurm/profiles/``
(``--profile``, default ``$ADVFT_PROFILE`` or ``local``) plus the overrides below.

Writes ``<run.root>/<sweep>/sweep.json`` (command line, grid, runs, pretraining, job ids, cluster). Exit codes:
0 done (with --wait: every run finished), 1 a run or the pretraining failed or the cluster refused the
submission, 2 bad input (one line on stderr; nothing written, nothing submitted).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from advft import config as C  # noqa: E402
from launch import base_encoder  # noqa: E402
from launch import grid as G  # noqa: E402
from launch.profiles import Profile, default_profile, load_profile, local_parameters, parse_overrides  # noqa: E402
from launch.sweep_state import (last_step, read_sweep, results_table, run_results, sweep_lock,  # noqa: E402
                                table, write_sweep)

DEFAULT_JOB = "jobs/demo.toml"
ACTIVE = "queued"  # a skipped run whose job is still in the queue or running
POLL_S = 3.0


@dataclass(frozen=True)
class PlannedRun:
    name: str
    point: dict[str, str]  # this run's grid values, as typed
    cfg: C.Config  # resolved and validated, run.root/run.name set by the sweep


@dataclass(frozen=True)
class PlannedPretrain:
    job: Path  # the pretraining job file (model.pretrain, resolved)
    cfg: Any  # advft.simclr.PretrainConfig, validated, run.root absolute
    runs: tuple[str, ...]  # the planned runs whose model.checkpoint is its encoder

    @property
    def key(self) -> str:  # its run folder: one pretraining per folder (sweep.json's key)
        return str(self.cfg.run.dir)

    @property
    def encoder(self) -> Path:
        return self.cfg.run.dir / "encoder.pt"

    def finished(self) -> bool:
        return run_results(self.cfg.run.dir).get("status") == "finished" and self.encoder.is_file()


@dataclass(frozen=True)
class Plan:
    name: str
    sweep_dir: Path
    job: Path
    axes: list[G.Axis]
    fixed: dict[str, str]
    runs: list[PlannedRun]
    kind: str  # slurm | local | debug
    profile: Profile
    pretrains: tuple[PlannedPretrain, ...] = ()  # the jobs that make the runs' base encoders

    @property
    def submitit_dir(self) -> Path:
        return self.sweep_dir / ".submitit" / "%j"


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
    p.add_argument("--cluster", default="auto", help="auto (slurm if sbatch is on PATH, else local) | slurm | "
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


def build_plan(args: argparse.Namespace) -> Plan:
    """Everything decided before anything is written: configs (validated), names, cluster. Raises ConfigError."""
    from launch.cluster import resolve_kind

    fixed = C.parse_set(args.overrides)
    if "run.name" in fixed:
        raise C.ConfigError("--set run.name: the sweep names its runs; use --name to name the sweep")
    axes = G.parse_grid(args.grid, fixed)
    kind = resolve_kind(args.cluster, submitting=not args.dry_run)
    named = {"partition": args.partition, "nodes": args.nodes, "gpus_per_node": args.gpus_per_node,
             "timeout_min": args.timeout_min}
    overrides = {**parse_overrides(args.cluster_set), **{k: v for k, v in named.items() if v is not None}}
    profile = load_profile(args.profile or default_profile(), overrides)
    if kind == "local":
        local_parameters(profile)  # checks what the local executor cannot do
    world = 1 if kind == "debug" else profile.world_size
    job = C.resolve_job(args.job)  # the default job works from any directory
    base = C.load(job, fixed)
    sweep = C.check_name(args.name or job.stem, "--name")
    sweep_dir = Path(base.run.root).resolve() / sweep  # absolute: a job may start in another directory
    runs: list[PlannedRun] = []
    seen: dict[str, dict[str, str]] = {}
    for point in G.expand(axes):
        cfg = C.load(job, {**fixed, **point})
        unread = G.unread_weights(cfg, point)
        if unread:  # e.g. alpha for trades: one run with the weight unset, not one per value
            point = {k: v for k, v in point.items() if k not in unread}
            cfg = C.load(job, {**fixed, **point})
        name = G.run_name(cfg, axes, prefix=base.run.name)
        if unread and name in seen:
            continue
        if unread:
            print(f"--grid: loss.name = {cfg.loss.name!r} does not read {', '.join(unread)}: one run per value of "
                  f"the other axes, with the weight unset", file=sys.stderr)
        if name in seen:
            raise C.ConfigError(f"--grid values {seen[name]} and {point} give the same config (run {name})")
        seen[name] = point
        cfg = C.replace(cfg, **{"run.name": name, "run.root": str(sweep_dir)})
        try:
            base_encoder.validate(cfg, world_size=world, made_here=True)
        except C.ConfigError as e:
            raise C.ConfigError(f"run {name}: {e}" if axes else str(e)) from None
        runs.append(PlannedRun(name, point, cfg))
    pretrains = plan_pretraining(runs, world)
    check_model_files([r.cfg for r in runs], made={p.encoder for p in pretrains if not p.finished()})
    return Plan(sweep, sweep_dir, job, axes, fixed, runs, kind, profile, tuple(pretrains))


def plan_pretraining(runs: list[PlannedRun], world: int) -> list[PlannedPretrain]:
    """One pretraining per distinct pretraining run folder that the runs' model.pretrain name, validated for
    the sweep's world size. Two different configs for one folder, or a folder that already holds a run of
    another config, are bad input (the pretraining would refuse that folder once it starts)."""
    from advft import simclr as P

    found: dict[Path, tuple[Path, Any, list[str]]] = {}
    for r in runs:
        pair = base_encoder.pretrain_job(r.cfg, world_size=world)
        if pair is None:
            continue
        job, pcfg = pair
        pcfg = dataclasses.replace(pcfg, run=dataclasses.replace(pcfg.run, root=str(Path(pcfg.run.root).resolve())))
        folder = pcfg.run.dir
        if folder in found and found[folder][1].hash() != pcfg.hash():
            raise C.ConfigError(f"model.pretrain: {found[folder][0]} and {job} both make {folder / P.ENCODER_FILE} "
                                f"with different configs; give them different run.name")
        found.setdefault(folder, (job, pcfg, []))[2].append(r.name)
    for folder, (job, pcfg, _) in found.items():
        old = folder / "config.toml"
        if old.is_file():
            have = P.load_config(old).hash()
            if have != pcfg.hash():
                raise C.ConfigError(f"model.pretrain = {job}: its run folder {folder} holds a pretraining of another "
                                    f"config (hash {have}, the job's is {pcfg.hash()}); change the job's run.name "
                                    f"(and model.checkpoint) or remove that folder")
    return [PlannedPretrain(job, pcfg, tuple(names)) for job, pcfg, names in found.values()]


def check_model_files(cfgs: list[C.Config], made: set[Path] = frozenset()) -> None:
    """Read every distinct base encoder (and head) the runs will read: a file of the wrong architecture, a
    damaged one or a pickle that needs code is bad input, refused here and not by each job once it starts.
    A base encoder in ``made`` that does not exist yet is made by a planned pretraining: not read."""
    from advft.models import CheckpointFormatError, build_encoder, load_encoder, load_head

    made = {p.resolve() for p in made}
    seen: set[tuple[str, ...]] = set()
    for cfg in cfgs:
        m = cfg.model
        if (m.checkpoint, m.arch, m.stem, m.normalize, m.head) in seen:
            continue
        seen.add((m.checkpoint, m.arch, m.stem, m.normalize, m.head))
        if Path(m.checkpoint).resolve() in made and not Path(m.checkpoint).is_file():
            encoder = build_encoder(m.arch, m.stem, m.normalize)  # its shape, for the head (the pretraining's
            # arch, stem and normalize were checked to be these)
        else:
            try:
                encoder = load_encoder(m.checkpoint, arch=m.arch, stem=m.stem, normalize=m.normalize)
            except CheckpointFormatError as e:
                raise C.ConfigError(f"model.checkpoint: {e}") from None
        if m.head:
            try:
                load_head(m.head, encoder.feature_dim)
            except CheckpointFormatError as e:
                raise C.ConfigError(f"model.head: {e}") from None


def _active_job_ids(entries: list[dict[str, Any]], default_kind: str) -> set[str]:
    """The job ids of sweep.json entries whose job is still queued or running (asked once per cluster kind)."""
    from launch.cluster import active_states

    by_kind: dict[str, list[str]] = {}
    for entry in entries:
        if entry.get("job_id"):
            by_kind.setdefault(entry.get("cluster", default_kind), []).append(entry["job_id"])
    return {i for kind, ids in by_kind.items() for i in active_states(kind, ids)}


def decide(plan: Plan, record: dict[str, Any]) -> dict[str, str]:
    """Per run: 'finished' (skip), 'queued' (its job is still in the queue: skip) or 'submit'."""
    known = record.get("runs", {})
    active = _active_job_ids([known.get(r.name, {}) for r in plan.runs], plan.kind)
    out = {}
    for r in plan.runs:
        if run_results(r.cfg.run.dir).get("status") == "finished":
            out[r.name] = "finished"
        elif known.get(r.name, {}).get("job_id") in active:
            out[r.name] = ACTIVE
        else:
            out[r.name] = "submit"
    return out


def decide_pretraining(plan: Plan, record: dict[str, Any], decisions: dict[str, str]) -> dict[str, str]:
    """Per planned pretraining: 'finished' (cached: its encoder is there), 'queued' (its job, from an earlier
    sweep, is still queued or running: reuse it), 'unneeded' (no run that needs it is to be submitted) or
    'submit'. The same logic as :func:`decide`."""
    known = record.get("pretraining", {})
    active = _active_job_ids([known.get(p.key, {}) for p in plan.pretrains], plan.kind)
    out = {}
    for p in plan.pretrains:
        if p.finished():
            out[p.key] = "finished"
        elif known.get(p.key, {}).get("job_id") in active:
            out[p.key] = ACTIVE
        elif not any(decisions[n] == "submit" for n in p.runs):
            out[p.key] = "unneeded"
        else:
            out[p.key] = "submit"
    return out


def _threads(plan: Plan) -> int:
    return 0 if plan.kind == "debug" else plan.profile.cpus_per_task


def submit(plan: Plan, runs: list[PlannedRun], after: list[str] | None = None) -> list[Any]:
    """ONE job array with one task group per run; returns the submitit jobs. ``after``: SLURM job ids (the
    pretraining) that must complete successfully before the array starts."""
    from launch.cluster import submit_array
    from launch.job import FinetuneJob

    return submit_array(plan.kind, plan.submitit_dir, plan.profile,
                        [FinetuneJob(r.cfg.to_dict(), plan.name, _threads(plan)) for r in runs],
                        name=f"advft-{plan.name}", after=after)


def submit_pretraining(plan: Plan, pretrains: list[PlannedPretrain]) -> dict[str, Any]:
    """One job per pretraining (not an array: the runs' array waits for it); returns {key: submitit job}."""
    from launch.cluster import submit_job
    from launch.job import PretrainJob

    return {p.key: submit_job(plan.kind, plan.submitit_dir, plan.profile, PretrainJob(p.cfg.to_dict(), _threads(plan)),
                              name=f"advft-{plan.name}-pretrain") for p in pretrains}


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def update_record(plan: Plan, record: dict[str, Any], argv: list[str], decisions: dict[str, str],
                  submitted: dict[str, str], pre: dict[str, str] | None = None,
                  pre_submitted: dict[str, str] | None = None) -> dict[str, Any]:
    pre, pre_submitted = pre or {}, pre_submitted or {}
    pretraining = dict(record.get("pretraining", {}))
    for p in plan.pretrains:
        entry = dict(pretraining.get(p.key, {}))
        entry.update({"name": p.cfg.run.name, "job": str(p.job), "dir": p.key, "encoder": str(p.encoder),
                      "config_hash": p.cfg.hash(), "runs": list(p.runs)})
        if p.key in pre_submitted:
            entry.update({"job_id": pre_submitted[p.key], "cluster": plan.kind, "submitted": _now()})
        entry["last_decision"] = pre.get(p.key, entry.get("last_decision", "-"))
        pretraining[p.key] = entry
    runs = dict(record.get("runs", {}))
    for r in plan.runs:
        entry = dict(runs.get(r.name, {}))
        entry.update({"dir": str(r.cfg.run.dir), "grid": r.point, "config_hash": r.cfg.hash()})
        if r.name in submitted:
            entry.update({"job_id": submitted[r.name], "cluster": plan.kind, "submitted": _now()})
        entry["last_decision"] = decisions[r.name]
        runs[r.name] = entry
    history = list(record.get("submissions", []))
    if pre_submitted:
        history.append({"time": _now(), "cluster": plan.kind, "job_ids": sorted(set(pre_submitted.values())),
                        "pretraining": sorted(pre_submitted), "command": argv})
    if submitted:
        history.append({"time": _now(), "cluster": plan.kind, "job_ids": sorted(set(submitted.values())),
                        "runs": sorted(submitted), "command": argv})
    return {
        "name": plan.name, "dir": str(plan.sweep_dir), "job": str(plan.job), "command": argv,
        "cwd": str(Path.cwd()), "grid": {a.key: list(a.values) for a in plan.axes}, "set": plan.fixed,
        "cluster": {"kind": plan.kind, "profile": plan.profile.name,
                    "parameters": dataclasses.asdict(plan.profile),
                    "submitit_folder": str(plan.submitit_dir)},
        "runs": runs, **({"pretraining": pretraining} if pretraining else {}), "submissions": history,
    }


def print_plan(plan: Plan, decisions: dict[str, str], job_ids: dict[str, str], dry: bool,
               pre: dict[str, str] | None = None, pre_ids: dict[str, str] | None = None,
               held: str = "") -> None:
    """The plan as a table: the pretraining first (if any), then the runs. ``held``: the runs to submit wait
    for the pretraining: 'wait' (the sweep waits for it, then submits them) or 'after' (submitted with a
    dependency on it)."""
    p = plan.profile
    print(f"sweep {plan.name}: {len(plan.runs)} run(s) of {plan.job} in {plan.sweep_dir}\n"
          f"cluster {plan.kind}, profile {p.name}: {p.nodes} node(s) x {p.tasks} task(s), "
          f"{p.gpus_per_node} GPU(s)/node, {p.timeout_min} min/job, requeue signal {p.signal_delay_s} s before")
    pre, pre_ids = pre or {}, pre_ids or {}
    for t in plan.pretrains:
        print(f"pretraining {t.job} -> {t.encoder}: the base encoder of {len(t.runs)} run(s)")
    pre_label = {"finished": "finished (cached)", ACTIVE: "queued or running (reused)",
                 "unneeded": "not needed (no run to submit)", "submit": "would submit" if dry else "submitted"}
    if dry:
        submit = "would submit after the pretraining" if held else "would submit"
    else:
        submit = {"": "submitted", "wait": "waits for the pretraining",
                  "after": "submitted, starts after the pretraining"}[held]
    label = {"finished": "finished (skipped)", ACTIVE: "queued or running (skipped)", "submit": submit}
    rows = [[f"pretraining {t.cfg.run.name}", pre_ids.get(t.key, "-"), pre_label[pre[t.key]]]
            for t in plan.pretrains if t.key in pre]
    rows += [[r.name, job_ids.get(r.name, "-"), label[decisions[r.name]]] for r in plan.runs]
    print(table(["run", "job id", "state"], rows))


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
    pre_ids = {k: known[k]["job_id"] for k, d in pre.items() if d == ACTIVE}
    new = [t for t in plan.pretrains if pre[t.key] == "submit"]
    print_plan(plan, decisions, {}, dry=True, pre=pre, pre_ids=pre_ids, held="after" if new or pre_ids else "")
    todo = [r for r in plan.runs if decisions[r.name] == "submit"]
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


def _refused(e: Exception) -> int:
    # sbatch refusing (bad partition, account, ...) is one line
    print(f"error: the cluster refused the submission: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
    return 1


def _submit_and_report(plan: Plan, args: argparse.Namespace, command: list[str]) -> int:
    waiting: list[PlannedPretrain] = []
    pre_jobs: dict[str, Any] = {}
    with sweep_lock(plan.sweep_dir):
        record = read_sweep(plan.sweep_dir)
        decisions = decide(plan, record)
        pre = decide_pretraining(plan, record, decisions)
        new = [t for t in plan.pretrains if pre[t.key] == "submit"]
        if new:
            try:
                pre_jobs = submit_pretraining(plan, new)
            except Exception as e:  # noqa: BLE001
                return _refused(e)
        pre_submitted = {k: str(j.job_id) for k, j in pre_jobs.items()}
        record = update_record(plan, record, command, decisions, {}, pre, pre_submitted)
        waiting = [t for t in plan.pretrains if pre[t.key] in ("submit", ACTIVE)]
        # SLURM holds the array until the pretraining has completed; elsewhere (or for a pretraining job that an
        # earlier sweep started outside SLURM) there are no dependencies: wait for it here, without the lock (so
        # another sweep sees it and reuses it), then submit the runs
        wait_here = bool(waiting) and (plan.kind != "slurm" or any(
            record["pretraining"][t.key].get("cluster") != "slurm" for t in waiting))
        todo = [r for r in plan.runs if decisions[r.name] == "submit"]
        submitted: dict[str, str] = {}
        jobs: list[Any] = []
        if todo and not wait_here:
            try:
                jobs = submit(plan, todo, after=[record["pretraining"][t.key]["job_id"] for t in waiting])
            except Exception as e:  # noqa: BLE001
                write_sweep(plan.sweep_dir, record)  # with the id of a pretraining submitted just now
                return _refused(e)
            submitted = {r.name: str(j.job_id) for r, j in zip(todo, jobs)}
            record = update_record(plan, record, command, decisions, submitted, pre)
        write_sweep(plan.sweep_dir, record)
    pre_ids = {k: e.get("job_id", "-") for k, e in record.get("pretraining", {}).items()}
    if wait_here:
        print_plan(plan, decisions, {}, dry=False, pre=pre, pre_ids=pre_ids, held="wait")
        if wait_pretraining(plan, waiting, record, pre_jobs, submitted_runs=False):
            return 1
        with sweep_lock(plan.sweep_dir):  # another sweep may have submitted the runs meanwhile
            record = read_sweep(plan.sweep_dir)
            decisions = decide(plan, record)
            todo = [r for r in plan.runs if decisions[r.name] == "submit"]
            if todo:
                try:
                    jobs = submit(plan, todo)
                except Exception as e:  # noqa: BLE001
                    return _refused(e)
                submitted = {r.name: str(j.job_id) for r, j in zip(todo, jobs)}
            record = update_record(plan, record, command, decisions, submitted, pre)
            write_sweep(plan.sweep_dir, record)
        print()
    ids = {n: e.get("job_id", "-") for n, e in record["runs"].items()}
    print_plan(plan, decisions, ids, dry=False, pre=pre, pre_ids=pre_ids,
               held="after" if waiting and not wait_here else "")
    if not todo:
        print("nothing to submit: every run is finished or still queued")
    print(f"record: {plan.sweep_dir / 'sweep.json'}")
    hints(plan)
    if args.wait or plan.kind == "debug":
        if waiting and not wait_here and wait_pretraining(plan, waiting, record, pre_jobs, submitted_runs=True):
            return 1
        followed = [r.name for r in plan.runs if decisions[r.name] != "finished"]
        return follow(plan, followed, record, {r.name: j for r, j in zip(todo, jobs)})
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
