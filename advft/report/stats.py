"""Runs that differ only in their seed form one point of the grid: mean ± sample std over seeds, and n.

Final values average FINISHED runs only; a point also says how many of its runs are still running,
failed or missing, so an average is never passed off as complete.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from advft.report.runs import STATUSES, Run


@dataclass(frozen=True)
class Stat:
    """Mean, sample std (None when n < 2) and n of one quantity over seeds."""

    mean: float
    std: float | None
    n: int

    def text(self, digits: int = 1) -> str:
        if self.std is None:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} (n={self.n})"


def stat(values: Sequence[float]) -> Stat | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) >= 2 else None
    return Stat(m, sd, len(vals))


@dataclass(frozen=True)
class Point:
    """One (setting, alpha, lr) of the grid with its runs (seeds)."""

    setting: str
    alpha: float | None  # None for a loss that reads no alpha
    lr: float
    runs: tuple[Run, ...]

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.runs) for s in STATUSES if any(r.status == s for r in self.runs)}

    def status_text(self) -> str:
        """'' when every run finished, else e.g. '1 running, 1 failed'."""
        others = {s: n for s, n in self.counts().items() if s != "finished"}
        if len(self.runs) == 1:
            return next(iter(others), "")
        return ", ".join(f"{n} {s}" for s, n in others.items())

    def initial(self, key: str) -> Stat | None:
        return stat([r.initial.get(key) for r in self.runs if key in r.initial])

    def final(self, key: str) -> Stat | None:
        return stat([r.final.get(key) for r in self.runs if r.status == "finished" and key in r.final])

    def last_eval(self, key: str) -> tuple[Stat | None, int]:
        """The latest routine evaluation and its step: of the finished runs when any finished, else of the
        others; only runs evaluated at that very step are averaged (n says how many)."""
        pool = [r for r in self.runs if r.status == "finished" and r.evals] or [r for r in self.runs if r.evals]
        if not pool:
            return None, 0
        step = max(int(r.evals[-1]["step"]) for r in pool)
        return stat([r.evals[-1].get(key) for r in pool if int(r.evals[-1]["step"]) == step]), step


def _reads_alpha(r: Run) -> bool:
    """Whether the run's loss has an alpha (runs from before loss.name are FARE runs)."""
    from advft.losses import LOSSES  # lazily: the registry imports torch

    spec = LOSSES.get(str(r.config.get("loss.name", "fare")))
    return spec is None or "alpha" in spec.weights


def aggregate(runs: Iterable[Run]) -> list[Point]:
    """Group runs by (setting, alpha, lr): the seeds of one experiment. Runs without lr, or without alpha when
    their loss reads one, are left out; a loss without alpha (trades) has alpha None, its setting names it."""
    groups: dict[tuple[str, float | None, float], list[Run]] = {}
    for r in runs:
        if r.lr is not None and (r.alpha is not None or not _reads_alpha(r)):
            groups.setdefault((r.setting, r.alpha, r.lr), []).append(r)
    return [Point(s, a, lr, tuple(rs)) for (s, a, lr), rs in sorted(groups.items())]


def curve(runs: Sequence[Run], kind: str, key: str) -> tuple[list[int], list[float], list[float | None]]:
    """Mean and std over runs of one logged quantity, at every step any run logged it (kind: train | eval)."""
    by_step: dict[int, list[float]] = {}
    for r in runs:
        for rec in (r.train if kind == "train" else r.evals):
            v = rec.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                by_step.setdefault(int(rec["step"]), []).append(float(v))
    steps = sorted(by_step)
    stats = [stat(by_step[s]) for s in steps]
    return steps, [s.mean for s in stats], [s.std for s in stats]

