"""A sweep folder read into records: which runs were planned, which started, how far each got.

Input, read only: ``<sweep>/sweep.json`` when present (it lists the PLANNED runs, so a planned run without
a folder is ``missing``) and, per run folder, ``config.toml``, ``metrics.jsonl``, ``results.json`` and
``manifest.json``. A folder of run folders without sweep.json is a sweep too. Nothing is written.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from advft.engine.rundir import read_json, read_metrics

# statuses in the order they are listed; "missing" = planned in sweep.json, no run folder (never started)
STATUSES = ("finished", "running", "failed", "missing")
# config keys that never make two runs different experiments (names, places, seeds, logging chrome)
_NOT_A_SETTING = {"run.name", "run.root", "run.seed", "run.progress", "run.wandb", "run.wandb_artifacts",
                  "loss.name", "loss.alpha", "loss.beta", "optim.lr"}  # the report's own axes: loss, its weights, lr
_RUN_FILES = ("config.toml", "metrics.jsonl", "results.json")


class ReportError(ValueError):
    """The folder is not a sweep (missing, empty, or its sweep.json unreadable); one line for the user."""


@dataclass(frozen=True)
class Run:
    """One run of a sweep as its folder (or, if it never started, sweep.json) tells it."""

    name: str
    dir: Path
    status: str  # one of STATUSES
    alpha: float | None  # None when neither config.toml nor sweep.json says
    lr: float | None
    seed: int | None
    setting: str  # the other config values that vary in the sweep, "key=value,..." ("" when none do)
    steps: int | None  # planned optim.steps
    last_step: int  # last logged training step
    train: tuple[dict[str, Any], ...]  # kind == "train" records, by step
    evals: tuple[dict[str, Any], ...]  # kind == "eval" records (routine attack), by step
    initial: Mapping[str, Any]  # strong-attack evaluation at step 0 ({} before it ran)
    final: Mapping[str, Any]  # strong-attack evaluation at the end ({} unless finished)
    error: str
    manifest: Mapping[str, Any]
    config: Mapping[str, Any]  # flattened dotted keys ({} when unknown)
    loss: str = "fare"  # loss.name (runs from before it was a choice are FARE runs)


@dataclass(frozen=True)
class Sweep:
    name: str
    dir: Path
    record: Mapping[str, Any]  # sweep.json ({} when absent)
    runs: tuple[Run, ...]


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return read_json(path)  # a file that is not a JSON object: {} and a warning naming it
    except OSError:
        return {}


def _read_config(run_dir: Path) -> dict[str, Any]:
    # tomllib, not advft.config.load: a report must read runs written by older versions with other keys
    try:
        return _flatten(tomllib.loads((run_dir / "config.toml").read_text()))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return {}


def _number(value: Any) -> Any:
    """A grid value as typed in sweep.json ('1e-4') -> 0.0001; other text stays text."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _planned_config(record: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, Any]:
    """What a run that never started would have been: its job file plus --set and its grid point, else the
    typed values alone (the job file may live on another machine)."""
    overrides = {**record.get("set", {}), **entry.get("grid", {})}
    try:
        from advft import config as C

        job = Path(record["job"])
        if not job.is_absolute():  # as typed on the sweep's command line, relative to where it ran
            job = Path(record.get("cwd", ".")) / job
        return _flatten(C.load(job, overrides).to_dict())
    except Exception:  # noqa: BLE001 - any failure falls back to the values sweep.json holds
        return {k: _number(v) for k, v in overrides.items()}


def _by_step(records: Iterable[dict[str, Any]], kind: str) -> tuple[dict[str, Any], ...]:
    # a resumed run rewrites its history consistently, but a torn copy may repeat a step: the last one wins
    seen = {int(r.get("step", 0)): r for r in records if r.get("kind") == kind}
    return tuple(seen[s] for s in sorted(seen))


def _load_run(name: str, run_dir: Path, planned: Mapping[str, Any] | None) -> Run:
    config = _read_config(run_dir)
    if config:  # a run from before loss.name was a choice is a FARE run; named, so a sweep mixing them tells them apart
        config.setdefault("loss.name", "fare")
    metrics = read_metrics(run_dir / "metrics.jsonl")
    results = _read_json(run_dir / "results.json")
    started = bool(config or metrics or results)
    if not started:
        status = "missing"
        config = dict(planned or {})
    else:
        # a folder without results.json is in its step-0 evaluation (or died there: the job log tells)
        status = results.get("status") if results.get("status") in STATUSES else "running"
    train, evals, finals = _by_step(metrics, "train"), _by_step(metrics, "eval"), _by_step(metrics, "eval_final")
    initial = results.get("initial") or next((r for r in finals if r.get("step") == 0), {})
    final = results.get("final") or {}
    if not final and status == "finished" and finals and finals[-1].get("step", 0) > 0:
        final = finals[-1]
    error = str(results.get("error", ""))
    unfinite = sorted(k for k, v in final.items() if isinstance(v, float) and not math.isfinite(v))
    if status == "finished" and unfinite:  # NaN accuracies are no result: the run failed, whatever it says
        status, error = "failed", f"final {', '.join(unfinite)} not finite ({run_dir / 'results.json'})"
    loss = config.get("loss.name", results.get("loss"))
    alpha = config.get("loss.alpha", results.get("alpha"))
    lr = config.get("optim.lr", results.get("lr"))
    seed = config.get("run.seed")
    steps = config.get("optim.steps")
    return Run(name=name, dir=run_dir, status=status, loss=str(loss or "fare"),
               alpha=float(alpha) if isinstance(alpha, (int, float)) else None,
               lr=float(lr) if isinstance(lr, (int, float)) else None,
               seed=int(seed) if isinstance(seed, (int, float)) else None, setting="",
               steps=int(steps) if isinstance(steps, (int, float)) else None,
               last_step=max((int(r["step"]) for r in train), default=0), train=train, evals=evals,
               initial=initial, final=final, error=error,
               manifest=_read_json(run_dir / "manifest.json"), config=config)


def fmt_value(v: Any) -> str:
    """A config value as the report writes it: 0.0001, 8, true, 0.9-0.95."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "-".join(fmt_value(x) for x in v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _with_settings(runs: list[Run], grid_keys: Iterable[str]) -> list[Run]:
    """Name, per run, the config values that vary across the sweep besides loss, alpha, lr and seed: runs that
    differ in them are different experiments and are never averaged together. Only the configs of runs
    that started are compared (a missing run's config is re-derived and may reflect a since-edited job
    file), plus the sweep's own grid axes."""
    known = [r.config for r in runs if r.status != "missing" and r.config]
    keys = sorted({k for c in known for k in c} - _NOT_A_SETTING)
    varying = {k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in known if k in c}) > 1}
    varying = sorted(varying | (set(grid_keys) - _NOT_A_SETTING))
    out = []
    for r in runs:
        setting = ",".join(f"{k}={fmt_value(r.config[k])}" for k in varying if k in r.config)
        out.append(dataclasses.replace(r, setting=setting))
    return out


def load_sweep(sweep_dir: str | os.PathLike) -> Sweep:
    """Every run of the sweep: the folders present plus the runs sweep.json planned (``missing`` when their
    folder is absent or empty). Raises ReportError for a path that is no sweep."""
    d = Path(sweep_dir)
    if not d.is_dir():
        raise ReportError(f"{d} is not a folder; give a sweep folder such as runs/demo")
    record: dict[str, Any] = {}
    sj = d / "sweep.json"
    if sj.is_file():
        try:
            record = json.loads(sj.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ReportError(f"{sj} is not valid JSON ({e}); it is rewritten by the next launch/sweep.py") from None
        if not isinstance(record, dict):
            raise ReportError(f"{sj} does not hold a sweep record (a JSON object)")
    planned = record.get("runs", {}) if isinstance(record.get("runs"), dict) else {}
    # run names are folder names (launch/sweeper/grid.py checks them); anything else in a hand-edited record is ignored
    planned = {n: e for n, e in planned.items() if isinstance(e, dict) and n not in (".", "..")
               and "/" not in n and os.sep not in n}
    names = set(planned)
    names |= {p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")
              and any((p / f).is_file() for f in _RUN_FILES)}
    if not names:
        raise ReportError(f"{d} holds no runs (no sweep.json, no run folder with config.toml or metrics.jsonl)")
    runs = []
    for name in sorted(names):
        # the run folder is <sweep>/<run> by construction; sweep.json's absolute "dir" may be another machine's
        plan = _planned_config(record, planned[name]) if name in planned else None
        runs.append(_load_run(name, d / name, plan))
    grid = record.get("grid") if isinstance(record.get("grid"), dict) else {}
    runs = _with_settings(runs, grid)
    runs.sort(key=lambda r: (r.setting, r.loss, _key(r.alpha), _key(r.lr), r.seed if r.seed is not None else -1,
                             r.name))
    return Sweep(name=str(record.get("name") or d.resolve().name), dir=d, record=record, runs=tuple(runs))


def _key(v: float | None) -> float:
    return math.inf if v is None else v
