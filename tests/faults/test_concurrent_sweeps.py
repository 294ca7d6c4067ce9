"""Two sweeps started at once on the same runs folder (submitit's local executor): the lock lets one submit,
the other sees its jobs queued or finished; every run runs once, nothing is corrupted (the run with the
reference's config ends bit-identical to it, every checkpoint verifies, sweep.json parses)."""
from __future__ import annotations

import json
import subprocess
import sys

from advft import checkpoint as ckpt
from faults import helpers as H
from faults.record import record
from launch.sweeper.record import read_sweep


def test_two_sweeps_at_once_neither_corrupt_nor_double_run(tmp_path, base_encoder, fault_cache, reference):
    root = tmp_path / "runs"
    sets = [s for s in H.fault_sets(base_encoder, fault_cache, root, "unused") if not s.startswith("run.name=")]
    argv = [sys.executable, "launch/sweep.py", "--job", str(H.JOB), *(x for s in sets for x in ("--set", s)),
            "--cluster", "local", "--name", "twice", "--grid", "alpha=0,0.1", "--wait"]
    procs = [subprocess.Popen(argv, cwd=H.ROOT, env=H.child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    rcs = [p.returncode for p in procs]
    sweep_dir = root / "twice"
    rec = json.loads((sweep_dir / "sweep.json").read_text())  # parses: never half-written
    names = sorted(rec["runs"])
    submitted = sum(out.count(" submitted") for out, _ in outs)
    skipped = sum(out.count("queued or running (skipped)") + out.count("finished (skipped)") for out, _ in outs)
    runs = {n.split("-")[0]: sweep_dir / n for n in names}
    once = all(H.starts(d) == [0] and H.logged_steps(d) == list(range(1, H.STEPS + 1)) and H.status(d) == "finished"
               for d in runs.values())
    verified = all(ckpt.verify(p) is None for d in runs.values() for _, p in ckpt.list_checkpoints(d))
    ok, detail = H.compare_to_reference(runs["alpha=0.1"], reference)
    ok = (ok and rcs == [0, 0] and len(rec["submissions"]) == 1 and len(rec["submissions"][0]["runs"]) == 2
          and submitted == 2 and skipped == 2 and once and verified and not H.debris(runs["alpha=0"]))
    record("two sweeps at once on one runs folder", "2 x a 2-run grid, local executor",
           f"exits {rcs}; one submission of {len(names)} runs in sweep.json, the other sweep skipped them "
           f"({skipped} 'skipped' rows); each run started once and finished, all checkpoints verify", ok, detail)
    assert rcs == [0, 0], outs
    assert len(rec["submissions"]) == 1 and submitted == 2 and skipped == 2, outs
    assert once and verified
    assert ok, detail
