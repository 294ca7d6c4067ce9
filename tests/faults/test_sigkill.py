"""SIGKILL at random moments of ``launch/train.py``, including inside checkpoint writes: the next start loads
the newest valid checkpoint and the run ends bit-identical to an uninterrupted one; loading never crashes.

Moments (drawn from the suite's seed, each recorded):
  startup       the run folder's config.toml exists: model loading, manifest, step-0 evaluation
  step k        train step k is in metrics.jsonl: inside step k+1, or inside the checkpoint save of step k
  tmp c         the temporary data file of checkpoint c exists and has no checksum yet (write window 1)
  rename c      checkpoint c's checksum is in place, its data file not yet renamed (write window 2)
  final-eval    the last checkpoint is complete, results.json not yet final: during the final evaluation
The victim (a subprocess) is held by ``inject.py`` until it is killed: before it logs step 1 (startup) or
step k+1 (step k), inside the write window (tmp c, rename c), before results.json says finished
(final-eval). So the moment cannot pass before the kill, however fast the machine. The next start runs
the same config in this process.
"""
from __future__ import annotations

import logging
import random
import signal

import pytest

from advft import checkpoint as ckpt
from advft.fare import finetune
from faults import helpers as H
from faults.inject import ckpt_name
from faults.record import record

CKPTS = list(range(H.CKPT_EVERY, H.STEPS + 1, H.CKPT_EVERY))  # 3, 6, 9 and the final 12


def _moments() -> list[tuple[str, int]]:
    rng = random.Random(H.SEED + 2)
    return ([("startup", 0)] + [("step", k) for k in sorted(rng.sample(range(1, H.STEPS), 5))]
            + [("tmp", c) for c in sorted(rng.sample(CKPTS, 2))] + [("rename", c) for c in sorted(rng.sample(CKPTS, 2))]
            + [("final-eval", H.STEPS)])


MOMENTS = _moments()


def reached(kind: str, n: int, run_dir) -> bool:
    d = ckpt.ckpt_dir(run_dir)
    files = H.ckpt_files(run_dir)
    name = ckpt_name(n)
    if kind == "startup":
        return (run_dir / "config.toml").is_file()
    if kind == "step":
        return max(H.logged_steps(run_dir), default=0) >= n
    if kind == "tmp":
        return any(f.startswith(f".{name}.") and f.endswith(".tmp") and ".sha256." not in f for f in files)
    if kind == "rename":
        return name + ".sha256" in files and name not in files
    if kind == "final-eval":
        return name in files and ckpt.verify(d / name) is None and H.status(run_dir) != "finished"
    raise ValueError(kind)


@pytest.mark.parametrize("kind,n", MOMENTS, ids=[f"{k}{n if k != 'startup' else ''}" for k, n in MOMENTS])
def test_sigkill_then_restart_loses_nothing(kind, n, fault_run, reference, tmp_path, caplog):
    cfg, sets = fault_run(f"kill-{kind}-{n}")
    run_dir = cfg.run.dir
    inject = {"startup": ["--hold-train", "1"], "step": ["--hold-train", str(n + 1)], "tmp": ["--hold-ckpt", f"{n}:tmp"],
              "rename": ["--hold-ckpt", f"{n}:rename"], "final-eval": ["--hold-final"]}[kind]
    proc = H.start_cli(["tests/faults/inject.py", *inject, "--", *H.train_argv(sets)], tmp_path / "log")
    try:
        H.wait_for(lambda: proc.poll() is not None or reached(kind, n, run_dir), f"moment {kind} {n}",
                   poll_s=0.01)
        hit = proc.poll() is None and reached(kind, n, run_dir)
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    on_disk = H.ckpt_files(run_dir)
    expected = H.newest_valid(run_dir)
    with caplog.at_level(logging.WARNING, logger="advft.checkpoint"):
        res = finetune(cfg)  # the next start: same run, same folder
    ok, detail = H.compare_to_reference(run_dir, reference)
    resumed = H.starts(run_dir)[-1] if H.starts(run_dir) else None
    ok = ok and hit and rc == -signal.SIGKILL and resumed == expected and res["status"] == "finished"
    where = {"startup": "during startup (config.toml written)", "step": f"after train step {n} was logged",
             "tmp": f"inside the write of checkpoint {n} (temp file, no checksum)",
             "rename": f"inside the write of checkpoint {n} (checksum renamed, data not)",
             "final-eval": "during the final evaluation (last checkpoint complete)"}[kind]
    record("SIGKILL", f"{kind} {n}" if kind != "startup" else kind,
           f"killed {where}; files left {on_disk or 'none'}; restart resumed from step {resumed} "
           f"(newest valid: {expected}) and finished", ok,
           detail + ("" if not caplog.records else f"; warnings: {[r.getMessage() for r in caplog.records]}"))
    assert hit, f"the process ended (rc {proc.returncode}) before the moment {kind} {n}"
    assert rc == -signal.SIGKILL
    assert resumed == expected, (resumed, expected, on_disk)
    assert ok, detail
