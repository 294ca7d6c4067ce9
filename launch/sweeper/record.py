"""A sweep's record on disk: ``runs/<sweep>/sweep.json`` (written atomically), the lock that serialises
sweeps started on the same folder, what each run folder says about its run, and the tables we print.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from advft.engine.rundir import write_json

SWEEP_JSON = "sweep.json"
LOCK = ".lock"


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path, timeout_s: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``<sweep>/.lock`` while deciding what to submit and submitting it.

    A second sweep on the same folder waits here, then sees the first one's jobs in sweep.json as queued
    and submits nothing twice. flock is released by the kernel if the holder dies.
    """
    timeout_s = float(os.environ.get("ADVFT_SWEEP_LOCK_TIMEOUT", "600")) if timeout_s is None else timeout_s
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / LOCK
    with open(path, "a+") as f:
        deadline, told = time.monotonic() + timeout_s, False
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told:
                    f.seek(0)
                    holder = f.read().strip() or "?"
                    print(f"waiting for another sweep on {sweep_dir} (pid {holder}) to finish submitting", flush=True)
                    told = True
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another sweep has held {path} for over {timeout_s:.0f} s; "
                                       f"is it stuck? (pid {holder})") from None
                time.sleep(0.2)
        try:
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


def read_sweep(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / SWEEP_JSON
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def write_sweep(sweep_dir: Path, record: dict[str, Any]) -> None:
    write_json(sweep_dir / SWEEP_JSON, record)  # temp file + rename: readers never see half a file


def run_results(run_dir: Path) -> dict[str, Any]:
    """The run's results.json ({} before it exists); status is running, finished or failed."""
    path = run_dir / "results.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def last_step(run_dir: Path) -> int:
    """The last logged training step (0 before the first log line)."""
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, "rb") as f:  # only the tail: metrics.jsonl grows with the run
            f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
            tail = f.read().decode(errors="replace")
    except OSError:
        return 0
    steps = [r.get("step", 0) for r in _records(tail) if r.get("kind") == "train"]
    return max(steps, default=0)


def _records(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by the tail window, or torn by a killed writer
    return out


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _acc(res: dict[str, Any], when: str, key: str) -> str:
    """'72.0 [69.2, 74.7] (n=1000)': the accuracy with its 95 % interval and n as results.json holds them."""
    rec = res.get(when) or {}
    v, ci, n = rec.get(key), rec.get(f"{key}_ci95"), rec.get("n_test")
    if v is None:
        return "-"
    text = f"{v:.1f}"
    if isinstance(ci, list) and len(ci) == 2:
        text += f" [{ci[0]:.1f}, {ci[1]:.1f}]"
    return text + (f" (n={n})" if isinstance(n, int) else "")


def results_table(runs: list[tuple[str, Path, dict[str, Any]]]) -> str:
    """run, loss, alpha, beta, lr, clean and robust accuracy (%) initial -> final with their 95 % Wilson
    intervals and n, status: from each results.json. A weight the run's loss does not read shows as '-'."""
    def weight(cfg: dict[str, Any], key: str) -> str:
        v = cfg.get("loss", {}).get(key)
        return "-" if v is None else f"{v:g}"

    rows = []
    for name, run_dir, cfg in runs:
        res = run_results(run_dir)
        rows.append([name, str(cfg.get("loss", {}).get("name", "fare")), weight(cfg, "alpha"), weight(cfg, "beta"),
                     f"{cfg['optim']['lr']:g}",
                     f"{_acc(res, 'initial', 'clean_acc')} -> {_acc(res, 'final', 'clean_acc')}",
                     f"{_acc(res, 'initial', 'robust_acc')} -> {_acc(res, 'final', 'robust_acc')}",
                     res.get("status", "not started")])
    return table(["run", "loss", "alpha", "beta", "lr", "clean % [95 % CI] (initial -> final)",
                  "robust % [95 % CI] (initial -> final)", "status"], rows)


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def update_record(plan: Any, record: dict[str, Any], argv: list[str], decisions: Mapping[str, str],
                  submitted: dict[str, str], pre: Mapping[str, str] | None = None,
                  pre_submitted: dict[str, str] | None = None) -> dict[str, Any]:
    """sweep.json after this pass of the sweep (``plan``: a launch.sweeper.plan.Plan): every planned run and
    pretraining with its folder, hash, job id and last decision, and the submission history."""
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
