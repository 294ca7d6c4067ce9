"""The run's record: ``metrics.jsonl`` (the truth), ``manifest.json`` (what ran where), wandb (a mirror).

Only rank 0 writes. wandb is imported lazily and only when enabled; the API key is never written into
the run folder (wandb's own files hold none in offline mode; we never log the environment).
"""
from __future__ import annotations

import json
import logging
import os
import platform
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
            data = {f"{rec.get('kind', 'train')}/{k}": v for k, v in rec.items() if k not in ("step", "kind")}
            self.wandb_run.log(data, step=int(rec["step"]))

    def close(self) -> None:
        if self.enabled:
            self._f.close()


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


def start_wandb(run_dir: Path, run_id: str, group: str | None, config: Mapping[str, Any], setting: str):
    """One wandb run per advft run; id = run id and resume='allow' so a requeued job continues it."""
    mode = wandb_mode(setting)
    if mode == "disabled":
        return None
    import wandb  # lazy: the library works without it

    (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "advft"), id=run_id, resume="allow",
                     group=group, name=run_dir.name, config=dict(config), dir=str(run_dir), mode=mode)
    if mode == "offline":
        log.info("wandb is offline; upload later with: wandb sync %s", run_dir / "wandb")
    return run
