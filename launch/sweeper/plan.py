"""What a sweep will do, decided before anything is written: the runs (one config per grid point, validated),
the pretrainings they depend on, and per job a :class:`Decision` against the sweep's record."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from advft import config as C
from launch import base_encoder
from launch.profiles import Profile, default_profile, load_profile, local_parameters, parse_overrides
import launch.sweeper.grid as G
from launch.sweeper.record import run_results


class Decision(str, Enum):
    """What the sweep does with one job (a run or a pretraining); the value is what sweep.json records."""

    FINISHED = "finished"  # done: skipped (a pretraining: its encoder is there)
    ACTIVE = "queued"  # its job, from an earlier sweep, is still queued or running: skipped, or reused
    UNNEEDED = "unneeded"  # a pretraining no run to submit waits for
    SUBMIT = "submit"

    def __str__(self) -> str:
        return self.value


class Held(str, Enum):
    """How the runs to submit wait for a pretraining they depend on."""

    NO = ""  # they depend on none that is still to run
    WAIT = "wait"  # the sweep waits for it here, then submits them
    AFTER = "after"  # submitted now, with a dependency (SLURM holds them)


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
    note: str = ""  # why --cluster auto chose local processes (shown with the plan)

    @property
    def submitit_dir(self) -> Path:
        return self.sweep_dir / ".submitit" / "%j"


def build_plan(args: argparse.Namespace) -> Plan:
    """Everything decided before anything is written: configs (validated), names, cluster. Raises ConfigError."""
    from launch.cluster import choose_kind

    fixed = C.parse_set(args.overrides)
    if "run.name" in fixed:
        raise C.ConfigError("--set run.name: the sweep names its runs; use --name to name the sweep")
    axes = G.parse_grid(args.grid, fixed)
    kind, note = choose_kind(args.cluster, submitting=not args.dry_run)
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
    return Plan(sweep, sweep_dir, job, axes, fixed, runs, kind, profile, tuple(pretrains), note)


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


def _decide(jobs: dict[str, tuple[bool, dict[str, Any], bool]], kind: str) -> dict[str, Decision]:
    """``jobs``: key -> (finished, its sweep.json entry, needed). One rule for runs and pretrainings."""
    active = _active_job_ids([entry for _, entry, _ in jobs.values()], kind)
    out = {}
    for key, (finished, entry, needed) in jobs.items():
        if finished:
            out[key] = Decision.FINISHED
        elif entry.get("job_id") in active:
            out[key] = Decision.ACTIVE
        else:
            out[key] = Decision.SUBMIT if needed else Decision.UNNEEDED
    return out


def decide(plan: Plan, record: dict[str, Any]) -> dict[str, Decision]:
    """Per run: FINISHED (skip), ACTIVE (its job is still in the queue: skip) or SUBMIT."""
    known = record.get("runs", {})
    return _decide({r.name: (run_results(r.cfg.run.dir).get("status") == "finished", known.get(r.name, {}), True)
                    for r in plan.runs}, plan.kind)


def decide_pretraining(plan: Plan, record: dict[str, Any], runs: dict[str, Decision]) -> dict[str, Decision]:
    """Per planned pretraining: FINISHED (cached: its encoder is there), ACTIVE (its job, from an earlier
    sweep, is still queued or running: reuse it), UNNEEDED (no run that needs it is to be submitted) or SUBMIT."""
    known = record.get("pretraining", {})
    return _decide({p.key: (p.finished(), known.get(p.key, {}), any(runs[n] is Decision.SUBMIT for n in p.runs))
                    for p in plan.pretrains}, plan.kind)
