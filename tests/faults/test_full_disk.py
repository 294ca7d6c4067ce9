"""A full disk during a checkpoint write: launch/train.py exits 4 with one clear line, the previous checkpoint
stays intact and no temporary file is left; once there is room again the rerun ends bit-identical. And a disk
that is full before the run writes anything: exit 4, one line, no traceback.

Two disks: a real one, a tmpfs of a few MB mounted for the test (root only; skipped where mounting is not
allowed), on which the second checkpoint does not fit; and a simulated one (``inject.py --enospc-ckpt``),
where the write of a chosen checkpoint fails half-way with ENOSPC, on any machine.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from advft import checkpoint as ckpt
from advft.fare import finetune
from faults import helpers as H
from faults.inject import ckpt_name
from faults.record import record

FAULT = "full disk"


def check_failure(r, run_dir: Path, failed_step: int) -> tuple[bool, str, list[int]]:
    line = H.one_error_line(r.stderr)
    kept = [s for s, _ in ckpt.list_checkpoints(run_dir)]
    intact = kept == list(range(failed_step - H.CKPT_EVERY, 0, -H.CKPT_EVERY)) and \
        all(ckpt.verify(p) is None for _, p in ckpt.list_checkpoints(run_dir))
    clear = bool(line) and ckpt_name(failed_step) in line and "No space left on device" in line \
        and "previous checkpoints are intact" in line
    ok = r.returncode == 4 and clear and intact and not H.debris(run_dir)
    return ok, line or r.stderr[-2000:], kept


@pytest.fixture
def tiny_fs(tmpfs) -> Path:
    """6 MiB: room for the run's small files and ONE checkpoint (3.8 MB), not two."""
    return tmpfs("6m")


def test_real_full_filesystem(tiny_fs, base_encoder, fault_cache, reference):
    sets = H.fault_sets(base_encoder, fault_cache, tiny_fs / "runs", "full")
    cfg = H.load_cfg(sets)
    r = H.run_cli(["launch/train.py", *H.train_argv(sets)])
    ok, line, kept = check_failure(r, cfg.run.dir, 2 * H.CKPT_EVERY)
    free = os.statvfs(tiny_fs).f_bavail * os.statvfs(tiny_fs).f_frsize
    subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_fs)], check=True)  # the user frees space
    finetune(cfg)
    same, detail = H.compare_to_reference(cfg.run.dir, reference)
    record(FAULT, "6 MiB tmpfs (real ENOSPC)",
           f"exit {r.returncode}: '{line}'; checkpoints {kept} intact, no temp file ({free} bytes free after "
           f"the failure); after making room the rerun resumed from step {H.starts(cfg.run.dir)[-1]} and finished",
           ok and same, detail)
    assert ok, (r.returncode, line, kept, H.debris(cfg.run.dir))
    assert same, detail


def test_simulated_enospc(fault_run, reference):
    cfg, sets = fault_run("enospc")
    step = 2 * H.CKPT_EVERY
    r = H.run_cli(["tests/faults/inject.py", "--enospc-ckpt", str(step), "--", *H.train_argv(sets)])
    ok, line, kept = check_failure(r, cfg.run.dir, step)
    finetune(cfg)
    same, detail = H.compare_to_reference(cfg.run.dir, reference)
    record(FAULT, f"simulated ENOSPC in checkpoint {step}",
           f"exit {r.returncode}: '{line}'; checkpoints {kept} intact, no temp file; the rerun resumed from "
           f"step {H.starts(cfg.run.dir)[-1]} and finished", ok and same, detail)
    assert ok, (r.returncode, line, kept, H.debris(cfg.run.dir))
    assert same, detail


def test_disk_already_full_at_start(tmpfs, base_encoder, fault_cache, reference):
    fs = tmpfs("1m")
    filler = fs / "filler"
    with open(filler, "wb") as f:  # fill every block: the run cannot even write its config
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    sets = H.fault_sets(base_encoder, fault_cache, fs / "runs", "full-at-start")
    cfg = H.load_cfg(sets)
    r = H.run_cli(["launch/train.py", *H.train_argv(sets)])
    line = H.one_error_line(r.stderr)
    clear = bool(line) and "cannot write the run folder" in line and "No space left on device" in line
    filler.unlink()
    subprocess.run(["mount", "-o", "remount,size=64m", str(fs)], check=True)
    finetune(cfg)
    same, detail = H.compare_to_reference(cfg.run.dir, reference)
    ok = r.returncode == 4 and clear and same
    record(FAULT, "1 MiB tmpfs, full before the first write",
           f"exit {r.returncode}: '{line}'; after making room the run started from step "
           f"{H.starts(cfg.run.dir)[0]} and finished", ok, detail)
    assert r.returncode == 4 and clear, r.stderr[-3000:]
    assert same, detail
