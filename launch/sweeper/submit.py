"""Submission: the runs as ONE job array, each pretraining as one job the array may depend on."""
from __future__ import annotations

from typing import Any

from launch.sweeper.plan import Plan, PlannedPretrain, PlannedRun


class Refused(RuntimeError):
    """The cluster refused a submission (bad partition, account, ...); the message is its last line."""


def threads(plan: Plan) -> int:
    return 0 if plan.kind == "debug" else plan.profile.cpus_per_task


def submit(plan: Plan, runs: list[PlannedRun], after: list[str] | None = None) -> list[Any]:
    """ONE job array with one task group per run; returns the submitit jobs. ``after``: SLURM job ids (the
    pretraining) that must complete successfully before the array starts. Raises :class:`Refused`."""
    from launch.cluster import submit_array
    from launch.job import FinetuneJob

    with _refusals():
        return submit_array(plan.kind, plan.submitit_dir, plan.profile,
                            [FinetuneJob(r.cfg.to_dict(), plan.name, threads(plan)) for r in runs],
                            name=f"advft-{plan.name}", after=after)


def submit_pretraining(plan: Plan, pretrains: list[PlannedPretrain]) -> dict[str, Any]:
    """One job per pretraining (not an array: the runs' array waits for it); returns {key: submitit job}.
    Raises :class:`Refused`."""
    from launch.cluster import submit_job
    from launch.job import PretrainJob

    with _refusals():
        return {p.key: submit_job(plan.kind, plan.submitit_dir, plan.profile, PretrainJob(p.cfg.to_dict(), threads(plan)),
                                  name=f"advft-{plan.name}-pretrain") for p in pretrains}


class _refusals:
    """Any error of the submission itself (sbatch refusing, submitit failing) becomes one :class:`Refused` line."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: Any, e: Any, tb: Any) -> None:
        if e is not None and isinstance(e, Exception) and not isinstance(e, Refused):
            raise Refused(str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__) from e
