"""What every fault trial needs: the short run it interrupts, the real command lines, and the checks that
nothing was lost (state bit-identical to the uninterrupted run, every training step logged exactly once).

The run: the tests' tiny job cut to 12 steps, a log line every step (so a stop request is honoured at any
step), a checkpoint every 3 steps and evaluations cut to the bone; these tests are about losing nothing,
not about accuracy.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import conftest
import torch

from advft import checkpoint as ckpt
from advft import config as C

ROOT = Path(__file__).resolve().parents[2]
JOB = conftest.TINY_JOB
STEPS = 12
CKPT_EVERY = 3
LEAN = ["eval.every=0", "eval.final_targets=0", "eval.probe_epochs=5", "eval.final_attack_steps=2",
        "eval.attack_steps=2", "eval.probe_train_size=64", "eval.test_size=32"]
FAULT = [f"optim.steps={STEPS}", "optim.warmup_steps=2", "run.log_every=1", f"run.ckpt_every={CKPT_EVERY}",
         "run.keep_last=3", "data.batch_size=8", "data.resolution=16", *LEAN]
# One thread in this process and in every child: bit-identity needs the same thread count everywhere (a
# parallel reduction's order depends on it), and on a shared 2-core runner two spinning OpenMP threads per
# process cost ten times more than they gain.
THREADS = 1
SEED = 20250607  # every random choice of the suite (steps, moments) comes from this seed; records name them


def fault_sets(encoder: Path, cache: Path, root: Path, name: str, *extra: str) -> list[str]:
    """The --set items of the fault run named ``name`` under ``root``."""
    return [f"model.checkpoint={encoder}", f"data.path={cache}", f"run.root={root}", f"run.name={name}",
            *FAULT, *extra]


def load_cfg(sets: list[str]) -> C.Config:
    return C.load(JOB, sets)


def train_argv(sets: list[str], *extra: str) -> list[str]:
    """launch/train.py's arguments for this run."""
    return [str(JOB), *(x for s in sets for x in ("--set", s)), *extra]


def child_env(**extra: str) -> dict[str, str]:
    """Environment of a child process: THREADS threads like this process (float results depend on it, and
    the children's weights are compared with this process's), wandb off, unbuffered output."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
           "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    env.pop("ADVFT_STOP_SIGNALS", None)
    env.pop("ADVFT_STOP_FILE", None)
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python ARGS`` from the repository root (args[0] is a script path or ``-m``), output captured."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env or child_env(), capture_output=True,
                          text=True, timeout=timeout)


def start_cli(args: list[str], log_dir: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python ARGS`` in the background; stdout/stderr go to files in log_dir (no pipe can fill up)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out, err = open(log_dir / "stdout.txt", "w"), open(log_dir / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env or child_env(), stdout=out, stderr=err)
    out.close()
    err.close()
    return proc


def usr1_when_held(sets: list[str], log_dir: Path, **hold_at: Any) -> tuple[int, str]:
    """Run ``launch/train.py --stop-signals USR1`` held where ``hold_at`` says (:func:`faults.hold.environment`),
    send SIGUSR1 once it waits there; its exit code and stderr."""
    from faults import hold

    held = log_dir / "hold"
    proc = start_cli(["launch/train.py", *train_argv(sets, "--stop-signals", "USR1")], log_dir,
                     child_env(**hold.environment(held, **hold_at)))
    try:
        hold.wait_held(held, alive=lambda: proc.poll() is None)
        os.kill(proc.pid, signal.SIGUSR1)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return rc, (log_dir / "stderr.txt").read_text()


def wait_for(probe: Callable[[], Any], what: str, timeout_s: float = 180.0, poll_s: float = 0.02) -> Any:
    """conftest.wait_for, polling fast: a trial acts at a chosen step of a run that takes seconds."""
    return conftest.wait_for(probe, what, timeout_s, poll_s)


# ---------------------------------------------------------------- what a run folder says

def train_records(run_dir: Path) -> list[dict[str, Any]]:
    from advft.engine.rundir import read_metrics

    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "train"]


def logged_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in train_records(run_dir)]


def starts(run_dir: Path) -> list[int]:
    """resume_step of every start of the run, in order (from manifest.json)."""
    path = run_dir / "manifest.json"
    return [s["resume_step"] for s in json.loads(path.read_text())["starts"]] if path.is_file() else []


def status(run_dir: Path) -> str | None:
    path = run_dir / "results.json"
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, json.JSONDecodeError):
        return None


def newest_valid(run_dir: Path) -> int:
    """Step of the newest checkpoint whose checksum matches (0 when none): where a restart must resume."""
    return next((s for s, p in ckpt.list_checkpoints(run_dir) if ckpt.verify(p) is None), 0)


def ckpt_files(run_dir: Path) -> list[str]:
    d = ckpt.ckpt_dir(run_dir)
    return sorted(os.listdir(d)) if d.is_dir() else []


def debris(run_dir: Path) -> list[str]:
    """Files in checkpoints/ that are not a complete, verified checkpoint or its checksum."""
    d = ckpt.ckpt_dir(run_dir)
    complete = {p.name for _, p in ckpt.list_checkpoints(run_dir) if ckpt.verify(p) is None}
    return [n for n in ckpt_files(run_dir) if n not in complete and n.removesuffix(".sha256") not in complete]


def final_state(run_dir: Path) -> dict[str, Any]:
    """Model and optimizer state of the run's newest valid checkpoint."""
    found = ckpt.load_latest(run_dir)
    assert found is not None, f"no valid checkpoint in {run_dir}"
    return {"step": found[0], "model": found[1]["model"], "optimizer": found[1]["optimizer"]}


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """None when a and b are bit-identical (tensors by torch.equal, containers recursively), else where not."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
        return None if same else path or "<tensor>"
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{path} keys {sorted(map(str, a.keys() ^ b.keys()))[:4]}"
        for k in a:
            d = first_difference(a[k], b[k], f"{path}.{k}" if path else str(k))
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path} length"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else path or repr(a)


def metric_values(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "img_per_s"} for r in records]  # throughput is wall time


def compare_to_reference(run_dir: Path, reference: dict[str, Any]) -> tuple[bool, str]:
    """(nothing lost, details): finished; final model AND optimizer state bit-identical to the uninterrupted
    run; train steps 1..STEPS each logged once, with the reference's values."""
    problems = []
    if status(run_dir) != "finished":
        problems.append(f"status {status(run_dir)}")
    state = final_state(run_dir)
    diff = first_difference({k: state[k] for k in ("model", "optimizer")},
                            {k: reference["state"][k] for k in ("model", "optimizer")})
    if state["step"] != STEPS or diff:
        problems.append(f"final state differs from the uninterrupted run at step {state['step']}: {diff}")
    steps = logged_steps(run_dir)
    if steps != list(range(1, STEPS + 1)):
        problems.append(f"train steps logged {steps}")
    elif metric_values(train_records(run_dir)) != metric_values(reference["records"]):
        problems.append("logged losses differ from the uninterrupted run")
    if debris(run_dir):
        problems.append(f"debris in checkpoints/: {debris(run_dir)}")
    ok = not problems
    return ok, ("weights+optimizer bit-identical, steps 1-%d logged once" % STEPS) if ok else "; ".join(problems)


@contextlib.contextmanager
def threads(n: int = THREADS) -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def run_reference(encoder: Path, cache: Path, root: Path) -> dict[str, Any]:
    """The uninterrupted run every trial is compared with."""
    from advft.fare import finetune

    cfg = load_cfg(fault_sets(encoder, cache, root, "reference"))
    t0 = time.monotonic()
    with threads():
        assert finetune(cfg)["status"] == "finished"
    return {"state": final_state(cfg.run.dir), "records": train_records(cfg.run.dir), "cfg": cfg,
            "seconds": time.monotonic() - t0}


def one_error_line(stderr: str, prefix: str = "error: ") -> str | None:
    """The single line of stderr that starts with ``prefix`` when there is exactly one and no traceback."""
    if "Traceback" in stderr:
        return None
    lines = [ln for ln in stderr.splitlines() if ln.startswith(prefix)]
    return lines[0] if len(lines) == 1 else None
