"""A non-finite loss at a given step: the run stops with one clear error line and exit 3, its last good
checkpoint intact and results.json saying failed; a sweep marks the run failed and a rerun resubmits it alone.

Which fault, honestly: training is bit-deterministic, so a NaN that comes from the config (a too-large lr)
comes back at the same step on every rerun; only a TRANSIENT fault (a flaky device) goes away. The suite
injects both with ``tests/faults/inject.py --nan-at K`` (the loss of step K turns NaN in that process,
outside the config, so a rerun is the same run: same hash, same folder):
  transient   armed for the first process only: the rerun resumes from the last good checkpoint and ends
              bit-identical to the uninterrupted run;
  persistent  armed for the rerun too: it resumes from the same good checkpoint, fails again at K with
              exit 3, and leaves that checkpoint byte-for-byte intact.
"""
from __future__ import annotations

import hashlib
import json
import random

from advft import checkpoint as ckpt
from advft.fare import finetune
from faults import helpers as H
from faults.record import record
from launch.sweeper.record import read_sweep

RNG = random.Random(H.SEED + 4)
K_TRAIN, K_PERSIST, K_SWEEP = (RNG.randrange(4, H.STEPS - 1) for _ in range(3))
FAULT = "non-finite loss"


def good_step(k: int) -> int:
    """The last checkpoint written before global step k (0-based) ran."""
    return k // H.CKPT_EVERY * H.CKPT_EVERY


def digests(run_dir) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for _, p in ckpt.list_checkpoints(run_dir)}


def results(run_dir) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_transient_nan_exits_3_keeps_the_good_checkpoint_and_a_rerun_ends_identical(fault_run, reference):
    cfg, sets = fault_run("nan-transient")
    run_dir = cfg.run.dir
    r = H.run_cli(["tests/faults/inject.py", "--nan-at", str(K_TRAIN), "--", *H.train_argv(sets)])
    line = H.one_error_line(r.stderr)
    kept = [s for s, _ in ckpt.list_checkpoints(run_dir)]
    intact = all(ckpt.verify(p) is None for _, p in ckpt.list_checkpoints(run_dir))
    res = results(run_dir)
    finetune(cfg)  # the rerun: the same run, the fault gone
    ok, detail = H.compare_to_reference(run_dir, reference)
    resumed = H.starts(run_dir)[-1]
    expected_line = f"error: non-finite loss at step {K_TRAIN}"
    ok = (ok and r.returncode == 3 and bool(line) and line.startswith(expected_line)
          and kept[:1] == [good_step(K_TRAIN)]
          and intact and res["status"] == "failed" and res["failed_step"] == K_TRAIN and resumed == good_step(K_TRAIN))
    record(FAULT, f"transient, step {K_TRAIN} (launch/train.py)",
           f"exit {r.returncode}, '{line}'; checkpoints {sorted(kept)} intact; results.json {res['status']}; "
           f"rerun resumed from step {resumed} and finished", ok, detail)
    assert r.returncode == 3 and line and line.startswith(expected_line), r.stderr[-3000:]
    assert kept[:1] == [good_step(K_TRAIN)] and intact
    assert res["status"] == "failed" and res["failed_step"] == K_TRAIN
    assert resumed == good_step(K_TRAIN)
    assert ok, detail


def test_persistent_nan_fails_again_on_rerun_and_never_touches_the_good_checkpoint(fault_run):
    cfg, sets = fault_run("nan-persistent")
    run_dir = cfg.run.dir
    faulty = ["tests/faults/inject.py", "--nan-at", str(K_PERSIST), "--", *H.train_argv(sets)]
    first = H.run_cli(faulty)
    before = digests(run_dir)
    again = H.run_cli(faulty)
    after = digests(run_dir)
    lines = [H.one_error_line(x.stderr) for x in (first, again)]
    resumed = H.starts(run_dir)
    g = good_step(K_PERSIST)
    ok = ([first.returncode, again.returncode] == [3, 3] and all(ln and f"step {K_PERSIST};" in ln for ln in lines)
          and before == after and max(int(n[5:13]) for n in before) == g and resumed == [0, g]
          and results(run_dir)["status"] == "failed")
    record(FAULT, f"persistent, step {K_PERSIST} on every run (launch/train.py)",
           f"exit {first.returncode}, then the rerun resumed from step {resumed[-1]} and failed again at step "
           f"{K_PERSIST} with exit {again.returncode}; checkpoints {sorted(before)} byte-identical before and after",
           ok, f"'{lines[1]}'")
    assert [first.returncode, again.returncode] == [3, 3], (first.stderr[-2000:], again.stderr[-2000:])
    assert all(ln and f"step {K_PERSIST};" in ln for ln in lines), lines
    assert before == after and resumed == [0, g]
    assert ok


def test_sweep_marks_the_nan_run_failed_and_a_rerun_resubmits_it_alone(tmp_path, base_encoder, fault_cache,
                                                                     reference):
    root = tmp_path / "runs"
    sets = [s for s in H.fault_sets(base_encoder, fault_cache, root, "unused") if not s.startswith("run.name=")]
    argv = ["--job", str(H.JOB), *(x for s in sets for x in ("--set", s)), "--cluster", "debug", "--name", "nan",
            "--grid", "alpha=0,0.1"]
    first = H.run_cli(["tests/faults/inject.py", "--sweep", "--nan-at", str(K_SWEEP), "--nan-in", "alpha=0.1-",
                       "--", *argv])
    rec = read_sweep(root / "nan")
    names = {n.split("-")[0]: n for n in rec["runs"]}
    bad, good = root / "nan" / names["alpha=0.1"], root / "nan" / names["alpha=0"]
    table_failed = any(ln.startswith(names["alpha=0.1"]) and ln.rstrip().endswith("failed")
                       for ln in first.stdout.splitlines())
    failed = results(bad)
    second = H.run_cli(["launch/sweep.py", *argv])
    rec = read_sweep(root / "nan")
    last = rec["submissions"][-1]["runs"]
    ok, detail = H.compare_to_reference(bad, reference)
    resumed = H.starts(bad)[-1]
    ok = (ok and first.returncode == 1 and table_failed and failed["status"] == "failed"
          and failed["failed_step"] == K_SWEEP and second.returncode == 0 and len(rec["submissions"]) == 2
          and last == [names["alpha=0.1"]] and resumed == good_step(K_SWEEP) and H.starts(good) == [0]
          and "finished (skipped)" in second.stdout)
    record(FAULT, f"transient, step {K_SWEEP}, in a 2-run sweep",
           f"sweep exit {first.returncode}, its table marks {names['alpha=0.1']} failed; the rerun resubmitted "
           f"only that run (the other: finished, skipped), which resumed from step {resumed} and finished",
           ok, detail)
    assert first.returncode == 1 and table_failed, first.stdout[-3000:] + first.stderr[-3000:]
    assert failed["status"] == "failed" and failed["failed_step"] == K_SWEEP
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert last == [names["alpha=0.1"]] and H.starts(good) == [0]
    assert resumed == good_step(K_SWEEP)
    assert ok, detail
