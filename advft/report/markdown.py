"""REPORT.md's text: sweep facts, the losses compared (when the sweep has several), the alpha x lr tables per
loss (initial -> final, each with its 95 % interval), what the numbers support (a difference is stated only
where the intervals do not overlap), runs, figures."""
from __future__ import annotations

import datetime
import os
import shlex
from pathlib import Path
from typing import Any, Mapping, Sequence

from advft.report.runs import STATUSES, Run, Sweep, fmt_value
from advft.report.stats import Point, Stat, aggregate, apart, reads, stat

ACC_KEYS = (("clean_acc", "clean accuracy (%)"), ("robust_acc", "robust accuracy (%)"))
EXTRA_KEY = "robust_acc_eps_extra"  # robust accuracy at the final evaluation's second radius


def num(v: float | None) -> str:
    return "-" if v is None else f"{v:g}"  # None: a weight the run's loss does not read


INTERVALS = ("95 % intervals: for one run, the Wilson score interval of its accuracy over its n test images; "
             "over k seeds, the Student-t interval of the mean of the k accuracies, widened where needed to "
             "the Wilson interval of the mean over one run's n test images (seeds may share their test images).")


def _cell(p: Point | None, key: str) -> str:
    if p is None:
        return "-"
    i, f = p.initial(key), p.final(key)
    text = f"{i.text() if i else '?'} -> {f.text() if f else p.status_text() or '?'}"
    extra = p.status_text()
    return text + (f" ({extra})" if extra and f else "")


def _facts(sweep: Sweep) -> list[str]:
    rec = sweep.record
    starts = [s for r in sweep.runs for s in r.manifest.get("starts", [])]
    lines = [f"- folder: `{sweep.dir}`"]
    if rec.get("command"):
        lines.append(f"- command: `{shlex.join(str(a) for a in rec['command'])}`")
    if rec.get("job"):
        lines.append(f"- job file: `{rec['job']}`")
    subs = rec.get("submissions") or []
    times = [s["time"] for s in subs if s.get("time")] or sorted(s["time"] for s in starts if s.get("time"))
    if times:
        lines.append(f"- started: {times[0]}" + (f" (last submission {times[-1]})" if len(subs) > 1 else ""))
    cl = rec.get("cluster") or {}
    if cl:
        par = cl.get("parameters") or {}
        lines.append(f"- cluster: {cl.get('kind', '?')}, profile {cl.get('profile', '?')}"
                     + (f", {par.get('nodes')} node(s) x {par.get('gpus_per_node')} GPU(s)" if par else ""))
    commits = sorted({(s.get("git_commit") or "unknown") + (" (dirty)" if s.get("git_dirty") else "") for s in starts})
    if commits:
        lines.append(f"- git commit: {', '.join(f'`{c}`' for c in commits)}"
                     + (" — runs started from different code!" if len(commits) > 1 else ""))
    hw = sorted({", ".join(s.get("gpu") or []) or f"CPU ({s.get('cpu_count', '?')} cores)" for s in starts})
    if hw:
        lines.append(f"- hardware: {'; '.join(hw)}; torch {starts[-1].get('torch', '?')}")
    counts = {s: sum(r.status == s for r in sweep.runs) for s in STATUSES}
    lines.append(f"- runs: {len(sweep.runs)}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    lines.append(f"- report written: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    return lines


def _attack_line(points: Sequence[Point]) -> str:
    finals = [r.final or r.initial for p in points for r in p.runs if r.final or r.initial]
    if not finals:
        return "No strong-attack evaluation has been written yet."
    attacks = sorted({str(f.get("attack", "?")) for f in finals})
    eps = sorted({fmt_value(f.get("eps", "?")) for f in finals})
    n = sorted({str(f.get("n_test", "?")) for f in finals})
    return (f"Strong attack: {', '.join(attacks)} at eps {', '.join(eps)}/255 (L-inf), on {', '.join(n)} test "
            f"images per run, linear probe on the frozen encoder.")


def _pct(st: Stat) -> str:
    return f"{st.mean:.1f} % {st.interval_text()}".rstrip()


def _compare(a_label: str, a: Stat, b_label: str, b: Stat) -> str:
    """Two values of one quantity: which is higher only when their 95 % intervals do not overlap."""
    if apart(a, b):
        (hi_l, hi), (lo_l, lo) = sorted([(a_label, a), (b_label, b)], key=lambda t: -t[1].mean)
        return f"higher at {hi_l} ({_pct(hi)}) than at {lo_l} ({_pct(lo)}): the 95 % intervals do not overlap."
    values = f"{a_label} {_pct(a)}, {b_label} {_pct(b)}"
    if not (a.has_interval and b.has_interval):
        return f"{values}: no interval (unknown number of test images), so no difference is claimed."
    return f"{values}: the difference is within the 95 % intervals, not resolved by this sweep."


def _spread(line: Sequence[Point], where: str, label: Any, what: str, compare: str,
            keys: Sequence[tuple[str, str]] = ACC_KEYS) -> list[str]:
    """Per accuracy, the finished points' final values (named by ``label(p)``) from lowest to highest, and a
    comparison: of the axis' two extreme values (``compare`` = its name) or, when ``compare`` is "", of the
    lowest and the highest point."""
    out = []
    for key, name in keys:
        finals = [(label(p), st) for p in line if (st := p.final(key)) is not None]
        if len(finals) < 2:
            continue
        lo, hi = min(finals, key=lambda t: t[1].mean), max(finals, key=lambda t: t[1].mean)
        a, b = (finals[0], finals[-1]) if compare else (lo, hi)
        out.append(f"- Final {name.split(' (')[0]}, {where}, over {len(finals)} {what}: from {lo[1].mean:.1f} % "
                   f"({lo[0]}) to {hi[1].mean:.1f} % ({hi[0]}), a spread of {hi[1].mean - lo[1].mean:.1f} points. "
                   + (f"Extremes of {compare}: " if compare else "Lowest against highest: ") + _compare(*a, *b))
    return out


def _findings(points: Sequence[Point]) -> list[str]:
    """What the final (strong-attack) numbers support, clean and robust separately: along alpha at each lr and
    along lr at each alpha, the spread of the means and a comparison of the axis' two extreme values; per
    point, the end against step 0. Finished runs only; nothing is said about why."""
    out: list[str] = []
    for axis, other in (("alpha", "lr"), ("lr", "alpha")):
        for ov in sorted({getattr(p, other) for p in points}):
            line = sorted((p for p in points if getattr(p, other) == ov), key=lambda p: getattr(p, axis))
            out += _spread(line, f"{other} = {num(ov)}", lambda p: f"{axis} = {num(getattr(p, axis))}",
                           f"values of {axis}", axis)
    for p in points:
        for key, label in ACC_KEYS:
            i, f = p.initial(key), p.final(key)
            if i is not None and f is not None:
                name = label.split(" (")[0]
                w = "alpha" if p.alpha is not None or p.beta is None else "beta"
                out.append(f"- {name[0].upper() + name[1:]}, {w} = {num(getattr(p, w))}, lr = {num(p.lr)}: "
                           + _compare("the end", f, "step 0", i))
    return out or ["- No two finished values to compare yet."]


def weight_axis(points: Sequence[Point]) -> str:
    """The rows of a loss's table: alpha, or beta for a loss that reads no alpha (trades, deacl)."""
    with_beta = any(p.beta is not None for p in points)
    return "alpha" if any(p.alpha is not None for p in points) or not with_beta else "beta"


def _matrix(points: Sequence[Point], key: str) -> list[str]:
    w = weight_axis(points)
    weights = sorted({getattr(p, w) for p in points}, key=lambda v: -1.0 if v is None else v)
    lrs = sorted({p.lr for p in points})
    at = {(getattr(p, w), p.lr): p for p in points}
    lines = [f"| {w} \\ lr | " + " | ".join(num(lr) for lr in lrs) + " |",
             "|---|" + "---|" * len(lrs)]
    for a in weights:
        lines.append(f"| {num(a)} | " + " | ".join(_cell(at.get((a, lr)), key) for lr in lrs) + " |")
    return lines


def _status_text(r: Run) -> str:
    if r.status == "failed":
        return f"**failed**: {r.error}" if r.error else "**failed**"
    if r.status == "running":
        return f"running (step {r.last_step}/{r.steps if r.steps is not None else '?'})"
    if r.status == "missing":
        return "missing (planned, never started)"
    return "finished"


def _acc_pair(d: Mapping[str, Any]) -> str:
    """One run's clean / robust accuracy with their Wilson intervals and n."""
    if "clean_acc" not in d:
        return "-"
    n = d.get("n_test") if isinstance(d.get("n_test"), int) else None
    parts = []
    for key in ("clean_acc", "robust_acc"):
        v = d.get(key)
        st = stat([float(v)], [n]) if isinstance(v, (int, float)) else None
        parts.append(f"{st.mean:.1f} {st.interval_text()}".rstrip() if st else "?")
    return " / ".join(parts) + (f" (n={n})" if n is not None else "")


def _extra_eps(points: Sequence[Point]) -> str | None:
    """The final evaluation's second radius (eval.final_eps_extra), e.g. '16/255', when the runs have it."""
    eps = {fmt_value(r.final.get("eps_extra")) for p in points for r in p.runs if EXTRA_KEY in r.final}
    return f"{', '.join(sorted(eps))}/255" if eps else None


def _loss_findings(points: Sequence[Point]) -> list[str]:
    """Across losses at one lr: per accuracy, the lowest and highest final point and whether their intervals
    separate; then every point that another beats on BOTH accuracies with intervals apart on both."""
    out: list[str] = []
    for lr in sorted({p.lr for p in points}):
        line = [p for p in points if p.lr == lr]
        extra = _extra_eps(line)
        out += _spread(line, f"lr = {num(lr)}", lambda p: f"`{p.name()}`", "(loss, weight) points", "",
                       ACC_KEYS + (((EXTRA_KEY, f"robust accuracy at {extra} (%)"),) if extra else ()))
        done = [(p, c, r) for p in line if (c := p.final("clean_acc")) is not None
                and (r := p.final("robust_acc")) is not None]
        for p, c, r in done:
            better = [q for q, qc, qr in done if q is not p and apart(qc, c) and apart(qr, r)
                      and qc.mean > c.mean and qr.mean > r.mean]
            if better:
                out.append(f"- lr = {num(lr)}: `{p.name()}` ({_pct(c)} clean, {_pct(r)} robust) is below "
                           + ", ".join(f"`{q.name()}` ({_pct(q.final('clean_acc'))}, {_pct(q.final('robust_acc'))})"
                                       for q in better)
                           + " on both accuracies, the 95 % intervals apart on both.")
    return out or ["- No two finished points to compare yet."]


def _losses_compared(points: Sequence[Point]) -> list[str]:
    """The loss x alpha x lr table of one setting (with the final evaluation's second radius when the runs
    have one) and what it supports."""
    extra = _extra_eps(points)
    head = "| loss | alpha | beta | lr | runs | clean % initial -> final | robust % initial -> final |"
    if extra:
        head += f" robust % at {extra}, initial -> final |"
    out = [head + " status |", "|---|---|---|---|---|---|---|" + ("---|" if extra else "") + "---|"]
    for p in sorted(points, key=lambda p: (p.lr, p.loss, -1.0 if p.alpha is None else p.alpha)):
        out.append(f"| {p.loss} | {num(p.alpha)} | {num(p.beta)} | {num(p.lr)} | {len(p.runs)} | "
                   f"{_cell(p, 'clean_acc')} | {_cell(p, 'robust_acc')} | "
                   + (f"{_cell(p, EXTRA_KEY)} | " if extra else "") + f"{p.status_text() or 'finished'} |")
    return out + ["", "**What the numbers support**", "", *_loss_findings(points), ""]


def render_markdown(sweep: Sweep, figures: Sequence[Path] = (), out_dir: Path | None = None) -> str:
    """REPORT.md's text. ``figures`` are linked relative to ``out_dir`` (where REPORT.md is written)."""
    points = aggregate(sweep.runs)
    losses = sorted({p.loss for p in points})
    settings = sorted({p.setting for p in points})
    cells = ("Each cell: accuracy (%) at step 0 -> at the end, `mean [95 % interval]`, with n test images for one "
             "run or the number of seeds it averages; final values average finished runs only, the others are "
             "named in the cell. " + INTERVALS)
    out = [f"# Sweep report: {sweep.name}", "", *_facts(sweep), ""]
    if len(losses) > 1:
        out += ["## Losses compared", "", _attack_line(points),
                "One row per loss and weight (alpha for fare and cosine, beta for trades and deacl; '-' where the "
                "loss does not read it): the same encoder, attack, data and test images. " + cells, ""]
        for setting in settings:
            if setting:
                out += [f"### Setting `{setting}`", ""]
            out += _losses_compared([p for p in points if p.setting == setting])
    out += ["## Results: alpha x lr" + (" per loss" if len(losses) > 1 else ""), "", _attack_line(points), cells, ""]
    for setting, loss in sorted({(p.setting, p.loss) for p in points}):
        sub = [p for p in points if p.setting == setting and p.loss == loss]
        title = [f"loss `{loss}`"] if len(losses) > 1 else []
        title += [f"setting `{setting}`"] if setting else []
        if title:
            out += [f"### {', '.join(title)[0].upper() + ', '.join(title)[1:]}", ""]
        for key, label in ACC_KEYS:
            out += [f"**{label[0].upper() + label[1:]}, initial -> final (strong attack)**", "", *_matrix(sub, key), ""]
        out += ["**What the numbers support**", "", *_findings(sub), ""]
        out += ["**Per point**", "",
                "| alpha | lr | runs | clean % initial -> final | robust % initial -> final | last routine eval clean / robust % (step) | status |",
                "|---|---|---|---|---|---|---|"]
        for p in sub:
            ce, step = p.last_eval("clean_acc")
            re_, _ = p.last_eval("robust_acc")
            routine = f"{ce.text() if ce else '-'} / {re_.text() if re_ else '-'} ({step})" if ce else "-"
            out.append(f"| {num(p.alpha)} | {num(p.lr)} | {len(p.runs)} | {_cell(p, 'clean_acc')} | "
                       f"{_cell(p, 'robust_acc')} | {routine} | {p.status_text() or 'finished'} |")
        out.append("")
    out += ["## Runs", "", "| run | loss | alpha | lr | seed | status | clean / robust % initial | clean / robust % final |",
            "|---|---|---|---|---|---|---|---|"]
    for r in sweep.runs:
        alpha = num(r.alpha) if r.alpha is not None else "?" if reads(r.loss, "alpha") else "-"
        out.append(f"| `{r.name}` | {r.loss} | {alpha} | "
                   f"{num(r.lr) if r.lr is not None else '?'} | {r.seed if r.seed is not None else '?'} | "
                   f"{_status_text(r)} | {_acc_pair(r.initial)} | {_acc_pair(r.final)} |")
    out.append("")
    if figures:
        out += ["## Figures", ""]
        for f in figures:
            rel = os.path.relpath(f, out_dir) if out_dir is not None else str(f)
            out += [f"![{f.stem}]({Path(rel).as_posix()})", ""]
    out += ["## How to read this", "",
            "- *clean* is the linear probe's accuracy on unperturbed test images, *robust* its accuracy under "
            "the L-inf attack at the given eps; robust <= clean always. Higher is better for both.",
            "- *initial* is the pretrained encoder (step 0), *final* the fine-tuned one, both under the strong "
            "attack; the curves use the cheaper routine attack, so robust curves sit above the strong-attack "
            "markers (a robust curve far above them suggests the routine attack is too weak to trust alone).",
            "- alpha weights the clean term of fare and cosine (alpha = 0 is pure FARE); beta weights the robust "
            "term of trades and deacl (advft/losses.py gives each loss's formula and paper). \"What the numbers "
            "support\" states a difference between values only where the intervals allow it, never why it arises.",
            f"- {INTERVALS} Two values are called different only when their intervals do not overlap (a "
            "conservative rule); the report compares the extreme values of an axis, not every pair.",
            "- *running* means the run's folder does not say it ended: a job killed without a trace looks the "
            "same; its job log (under `.submitit/`) tells. *missing* runs were planned but never started; rerun "
            "the sweep command to start them.", ""]
    return "\n".join(out)
