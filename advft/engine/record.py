"""The run's record: ``metrics.jsonl`` (the truth), ``manifest.json`` (what ran where), wandb (a mirror).

Only rank 0 writes. wandb is imported lazily and only when enabled; the API key is never written into
the run folder (wandb's own files hold none in offline mode; we never log the environment).
"""
from __future__ import annotations

import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from advft.engine.rundir import RunDir, atomic_write, read_json, read_metrics, write_json  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

_SECRET_HINTS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


class MetricsLog:
    """Append-only JSON lines, flushed per record; on resume, records that will be recomputed are dropped
    so the file stays one consistent history.

    A step's records are written before its checkpoint, so on resume from step s the records up to s are
    kept, except those the resumed run writes again: the step-0 evaluations unless they completed
    (``initial_done``), and the final evaluations (at ``steps``).
    """

    def __init__(self, run_dir: Path, resume_step: int, steps: int, initial_done: bool, enabled: bool = True):
        self.path = RunDir(run_dir).metrics
        self.enabled = enabled
        if not enabled:
            return

        def keep(r: dict[str, Any]) -> bool:
            s, kind = r.get("step", 0), r.get("kind", "")
            if kind.startswith("eval"):
                if s == 0:
                    return initial_done
                return s < resume_step or (s == resume_step and s < steps)
            return s <= resume_step

        kept = [r for r in read_metrics(self.path) if keep(r)]
        atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._f = open(self.path, "a")
        self.wandb_run = None

    def log(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self.wandb_run is not None:
            # no step= : a resumed run re-logs recomputed steps, which wandb would drop below its own counter;
            # "step" is the x axis of every panel instead (define_metric in start_wandb)
            data = {f"{rec.get('kind', 'train')}/{k}": v for k, v in rec.items() if k not in ("step", "kind")}
            self.wandb_run.log({"step": int(rec["step"]), **data})

    def close(self) -> None:
        """Close the file; a wandb run still open here ended early (stopped or failed)."""
        if self.enabled and not self._f.closed:
            self._f.close()
        if self.enabled and self.wandb_run is not None:
            self.wandb_run.finish(exit_code=1)
            self.wandb_run = None


# ---- manifest ----

def _git(*args: str) -> str | None:
    try:
        root = Path(__file__).resolve().parent.parent
        r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_facts() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "cuda": torch.version.cuda,
        "gpu": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "cpu_count": os.cpu_count(),
    }
    from importlib import metadata

    for mod in ("torchvision", "accelerate", "numpy", "submitit", "wandb", "ffcv"):
        try:  # the installed version, without importing (importing ffcv alone takes seconds, at every start)
            facts[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:  # optional packages
            pass
    slurm = {k: v for k, v in os.environ.items() if k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID",
                                                            "SLURM_ARRAY_TASK_ID", "SLURM_NNODES",
                                                            "SLURM_RESTART_COUNT", "SLURM_JOB_PARTITION")}
    if slurm:
        facts["slurm"] = slurm
    return facts


def update_manifest(run_dir: Path, world_size: int, resume_step: int,
                    extra: Mapping[str, Any] | None = None) -> None:
    """Append this start (or restart) to manifest.json: versions, git, host, GPUs, command line, and the
    ``extra`` facts this start resolved on its machine (e.g. ``{"precision": "fp32 (auto)"}``)."""
    path = RunDir(run_dir).manifest
    try:
        manifest = read_json(path)
    except json.JSONDecodeError:
        manifest = {}
    starts = manifest.get("starts", [])
    starts.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resume_step": resume_step,
                   "world_size": world_size, "argv": [a for a in sys.argv if not _looks_secret(a)],
                   **(extra or {}), **environment_facts()})
    manifest["starts"] = starts
    write_json(path, manifest)


def _looks_secret(arg: str) -> bool:
    up = arg.upper()
    return any(h in up for h in _SECRET_HINTS) and "=" in arg


# ---- wandb mirror ----

def wandb_mode(setting: str) -> str:
    """Resolve run.wandb: WANDB_MODE wins; 'auto' = online when a key is configured, else offline."""
    env = os.environ.get("WANDB_MODE")
    if setting == "disabled":
        return "disabled"
    if env:
        return env
    if setting in ("online", "offline"):
        return setting
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    try:
        if netrc.is_file() and "api.wandb.ai" in netrc.read_text():
            return "online"
    except OSError:
        pass
    return "offline"


def start_wandb(rd: RunDir, group: str | None, job_type: str, config: Mapping[str, Any], setting: str):
    """One wandb run per run folder: its id is made once and kept in the folder, so a requeued or resumed
    job continues the same wandb run and another folder (another sweep of the same grid) never does.

    Online start failures (no network, server down) fall back to offline with one warning: the run's own
    record is metrics.jsonl, wandb only mirrors it.
    """
    mode = wandb_mode(setting)
    if mode == "disabled":
        return None
    import wandb  # lazy: the library works without it

    (rd.path / "wandb").mkdir(parents=True, exist_ok=True)
    kw = dict(project=os.environ.get("WANDB_PROJECT", "advft"), id=rd.wandb_id(), resume="allow", group=group,
              job_type=job_type, name=rd.path.name, config=dict(config), dir=str(rd.path))
    try:
        run = wandb.init(mode=mode, **kw)
    except Exception as e:  # wandb raises several types (CommError, UsageError, timeouts) for the same cause
        if mode != "online":
            raise
        log.warning("wandb could not start online (%s: %s); this run logs to wandb offline instead, "
                    "upload later with: wandb sync %s", type(e).__name__, str(e).splitlines()[0] if str(e) else "",
                    rd.path / "wandb" / "offline-run-*")
        mode = "offline"
        wandb.teardown()  # the service still holds the failed run's id; a fresh one starts the offline run
        run = wandb.init(mode=mode, **kw)
    run.define_metric("step")
    for kind in ("train", "eval", "eval_final"):
        run.define_metric(f"{kind}/*", step_metric="step")
    if mode == "offline":
        log.info("wandb is offline; upload later with: wandb sync %s", rd.path / "wandb" / "offline-run-*")
    return run


def finish_wandb(run: Any, results: Mapping[str, Any], artifacts: list[tuple[str, str, Path]]) -> None:
    """The run's initial and final numbers into the wandb summary, the asked-for files as artifacts."""
    import wandb

    for part in ("initial", "final"):
        run.summary.update({f"{part}/{k}": v for k, v in (results.get(part) or {}).items()})
    for name, kind, path in artifacts:
        art = wandb.Artifact(re.sub(r"[^A-Za-z0-9._-]", "_", name), type=kind)  # wandb's artifact-name alphabet
        art.add_file(str(path))
        run.log_artifact(art)
    run.finish()
