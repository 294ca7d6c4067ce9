"""Runs that differ only in their seed form one point of the grid: mean, 95 % interval and n.

Intervals (95 %): for ONE run, the Wilson score interval of its accuracy over its n test images; for
k >= 2 seeds, the Student-t interval of the mean of the k accuracies (mean ± t(0.975, k-1) * sd / sqrt(k)),
which holds the seed-to-seed spread, widened where needed to the Wilson interval of the mean over one run's
n test images: seeds that test on the same images (a full test split) share that sampling error, which
their spread does not show.
Final values average FINISHED runs only; a point also says how many of its runs are still running,
failed or missing, so an average is never passed off as complete.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from advft.report.runs import STATUSES, Run


Z95 = 1.959963984540054  # standard normal 0.975 quantile
# Student t 0.975 quantiles for 1..30 degrees of freedom; beyond, a Cornish-Fisher expansion (error < 1e-4)
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
         2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
         2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = Z95
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def wilson(acc: float, n: int) -> tuple[float, float]:
    """95 % Wilson score interval, in %, of an accuracy ``acc`` (%) measured on ``n`` >= 1 images."""
    if n < 1:
        raise ValueError(f"an interval needs n >= 1 images, got {n}")
    p = min(max(acc / 100.0, 0.0), 1.0)
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    lo = 0.0 if p == 0.0 else max(centre - half, 0.0)  # exact ends: the formula gives them up to rounding
    hi = 1.0 if p == 1.0 else min(centre + half, 1.0)
    return 100.0 * lo, 100.0 * hi


@dataclass(frozen=True)
class Stat:
    """One quantity over the seeds of a point: mean, sample std (None when n < 2), n seeds, its 95 % interval
    [lo, hi] (None when unknown: one run without its number of test images) and how it was made
    (``method``: "wilson" for one run, "t" over seeds), and the test images per run (None when they differ)."""

    mean: float
    std: float | None
    n: int
    lo: float | None = None
    hi: float | None = None
    method: str = ""
    n_test: int | None = None

    @property
    def has_interval(self) -> bool:
        return self.lo is not None and self.hi is not None

    def interval_text(self, digits: int = 1) -> str:
        return f"[{self.lo:.{digits}f}, {self.hi:.{digits}f}]" if self.has_interval else ""

    def text(self, digits: int = 1) -> str:
        """``72.0 [69.2, 74.7] (n=1000)`` for one run; ``72.0 [46.6, 97.4] (3 seeds)`` over seeds."""
        out = f"{self.mean:.{digits}f}"
        if self.has_interval:
            out += f" {self.interval_text(digits)}"
        if self.n >= 2:
            return out + f" ({self.n} seeds)"
        return out + (f" (n={self.n_test})" if self.n_test is not None else "")


def stat(values: Sequence[float], n_tests: Sequence[int | None] | None = None) -> Stat | None:
    """Mean, std and 95 % interval of accuracies (in %) over seeds; ``n_tests``: each run's test images
    (for one run the interval is Wilson's over them; over seeds, Student's t of the mean)."""
    pairs = [(float(v), (n_tests[i] if n_tests is not None else None)) for i, v in enumerate(values)
             if v is not None and math.isfinite(float(v))]
    if not pairs:
        return None
    vals = [v for v, _ in pairs]
    ns = {n for _, n in pairs}
    n_test = next(iter(ns)) if len(ns) == 1 and isinstance(next(iter(ns)), int) else None
    k, m = len(vals), sum(vals) / len(vals)
    if k >= 2:
        sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (k - 1))
        half = t975(k - 1) * sd / math.sqrt(k)
        lo, hi = max(m - half, 0.0), min(m + half, 100.0)
        if n_test is not None:  # seeds that agree still measured on n_test images: never narrower than that
            w_lo, w_hi = wilson(m, n_test)
            lo, hi = min(lo, w_lo), max(hi, w_hi)
        return Stat(m, sd, k, lo, hi, "t", n_test)
    if n_test is not None and n_test >= 1:
        lo, hi = wilson(m, n_test)
        return Stat(m, None, 1, lo, hi, "wilson", n_test)
    return Stat(m, None, 1)


def apart(a: Stat, b: Stat) -> bool:
    """True when both 95 % intervals are known and do not overlap."""
    return a.has_interval and b.has_interval and (a.hi < b.lo or b.hi < a.lo)  # type: ignore[operator]


@dataclass(frozen=True)
class Point:
    """One (setting, loss, alpha, beta, lr) of the grid with its runs (seeds)."""

    setting: str
    loss: str
    alpha: float | None  # None for a loss that reads no alpha
    lr: float
    beta: float | None  # None for a loss that reads no beta
    runs: tuple[Run, ...]

    def weight(self) -> str:
        """The weights the loss reads: ``α=0.1``, ``β=1`` ('' for none)."""
        return " ".join(f"{sym}={v:g}" for sym, v in (("α", self.alpha), ("β", self.beta)) if v is not None)

    def name(self) -> str:
        """The loss with the weights it reads: ``fare α=0.1``, ``trades β=1``."""
        return f"{self.loss} {self.weight()}".rstrip()

    def counts(self) -> dict[str, int]:
        return {s: sum(r.status == s for r in self.runs) for s in STATUSES if any(r.status == s for r in self.runs)}

    def status_text(self) -> str:
        """'' when every run finished, else e.g. '1 running, 1 failed'."""
        others = {s: n for s, n in self.counts().items() if s != "finished"}
        if len(self.runs) == 1:
            return next(iter(others), "")
        return ", ".join(f"{n} {s}" for s, n in others.items())

    def initial(self, key: str) -> Stat | None:
        done = [r.initial for r in self.runs if key in r.initial]
        return stat([d.get(key) for d in done], [_n_test(d) for d in done])

    def final(self, key: str) -> Stat | None:
        done = [r.final for r in self.runs if r.status == "finished" and key in r.final]
        return stat([d.get(key) for d in done], [_n_test(d) for d in done])

    def last_eval(self, key: str) -> tuple[Stat | None, int]:
        """The latest routine evaluation and its step: of the finished runs when any finished, else of the
        others; only runs evaluated at that very step are averaged (n says how many)."""
        pool = [r for r in self.runs if r.status == "finished" and r.evals] or [r for r in self.runs if r.evals]
        if not pool:
            return None, 0
        step = max(int(r.evals[-1]["step"]) for r in pool)
        last = [r.evals[-1] for r in pool if int(r.evals[-1]["step"]) == step]
        return stat([d.get(key) for d in last], [_n_test(d) for d in last]), step


def _n_test(record: Mapping[str, Any]) -> int | None:
    n = record.get("n_test")
    return int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) and n >= 1 else None


def reads(loss: str, weight: str) -> bool:
    """Whether ``loss`` reads ``weight`` (alpha | beta); an unknown loss (a newer version's) is assumed to."""
    from advft.losses import LOSSES  # lazily: the registry imports torch

    spec = LOSSES.get(loss)
    return spec is None or weight in spec.weights


def aggregate(runs: Iterable[Run]) -> list[Point]:
    """Group runs by (setting, loss, alpha, beta, lr): the seeds of one experiment. Runs without lr, or without
    alpha when their loss reads one, are left out; a loss without alpha (trades) has alpha None, one without
    beta (fare) beta None."""
    groups: dict[tuple[str, str, float, float, float], list[Run]] = {}
    for r in runs:
        if r.lr is not None and (r.alpha is not None or not reads(r.loss, "alpha")):
            b = r.config.get("loss.beta")
            beta = float(b) if isinstance(b, (int, float)) and reads(r.loss, "beta") else -math.inf
            groups.setdefault((r.setting, r.loss, -math.inf if r.alpha is None else r.alpha, beta, r.lr), []).append(r)
    return [Point(s, loss, None if a == -math.inf else a, lr, None if b == -math.inf else b, tuple(rs))
            for (s, loss, a, b, lr), rs in sorted(groups.items())]


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

