"""A damaged newest checkpoint, end to end: ``launch/train.py`` started again on the run detects it (checksum,
or the load check when the checksum was forged to match), skips it with a warning naming the file and the
reason, resumes from the previous one and ends bit-identical to the uninterrupted run.

Each trial starts from a copy of one run stopped at step 9 (checkpoints 3, 6 and 9 on disk). The truncated
and bit-flipped trials rerun ``python launch/train.py`` as a process; the others call its ``main`` in this
process (the same code from the argument parsing on, without a second interpreter start).
"""
from __future__ import annotations

import hashlib
import logging
import random
import shutil
from pathlib import Path
from typing import Callable

import pytest

from advft import checkpoint as ckpt
from advft.engine import Interrupted
from advft.fare import finetune
from faults import helpers as H
from faults.inject import ckpt_name
from faults.record import record

STOP = 9


def _rng(p: Path) -> random.Random:
    return random.Random(f"{H.SEED}:{p.name}")  # where a file is damaged: seeded, recorded in the detail


def truncate(p: Path) -> str:
    size = p.stat().st_size
    keep = _rng(p).randrange(size // 4, size - 1)
    p.write_bytes(p.read_bytes()[:keep])
    return f"truncated to {keep} of {size} bytes"


def flip_bit(p: Path) -> str:
    data, rng = bytearray(p.read_bytes()), _rng(p)
    at, bit = rng.randrange(len(data)), rng.randrange(8)
    data[at] ^= 1 << bit
    p.write_bytes(bytes(data))
    return f"bit {bit} of byte {at} flipped"


def empty(p: Path) -> str:
    p.write_bytes(b"")
    return "emptied (0 bytes)"


def drop_checksum(p: Path) -> str:
    p.with_name(p.name + ".sha256").unlink()
    return "checksum file deleted (a write that never completed)"


def forge(p: Path) -> str:
    """Garbage whose checksum file matches: only the load check can catch it."""
    p.write_bytes(b"PK\x03\x04" + _rng(p).randbytes(4096))
    p.with_name(p.name + ".sha256").write_text(hashlib.sha256(p.read_bytes()).hexdigest() + "\n")
    return "replaced by garbage with a matching checksum"


# trial -> (damage per checkpoint step, the step the rerun must resume from, the reason each warning names,
#           how launch/train.py is rerun)
TRIALS: dict[str, tuple[dict[int, Callable[[Path], str]], int, list[str], str]] = {
    "truncated": ({9: truncate}, 6, ["checksum mismatch"], "process"),
    "bit-flipped": ({9: flip_bit}, 6, ["checksum mismatch"], "process"),
    "empty": ({9: empty}, 6, ["checksum mismatch"], "main"),
    "no checksum": ({9: drop_checksum}, 6, ["no checksum file"], "main"),
    "forged checksum": ({9: forge}, 6, ["unreadable"], "main"),
    "two newest damaged": ({9: truncate, 6: flip_bit}, 3, ["checksum mismatch", "checksum mismatch"], "main"),
}


def rerun(sets: list[str], how: str, caplog, capsys) -> tuple[int, str, list[str]]:
    """(exit code, stderr, the 'skipping checkpoint' warnings) of launch/train.py started again on the run."""
    if how == "process":
        r = H.run_cli(["launch/train.py", *H.train_argv(sets)])
        return r.returncode, r.stderr, [ln for ln in r.stderr.splitlines() if "skipping checkpoint" in ln]
    from launch.train import main

    with caplog.at_level(logging.WARNING, logger="advft.checkpoint"):
        rc = main(H.train_argv(sets))
    err = capsys.readouterr().err
    return rc, err, [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, base_encoder, fault_cache) -> tuple[Path, list[str]]:
    """A run stopped on request at step STOP; trials copy it."""
    root = tmp_path_factory.mktemp("stopped")
    sets = H.fault_sets(base_encoder, fault_cache, root, "base")
    cfg = H.load_cfg(sets)
    polls = {"n": 0}

    def stop() -> bool:
        polls["n"] += 1
        return polls["n"] == STOP

    with H.threads(), pytest.raises(Interrupted):
        finetune(cfg, should_stop=stop)
    assert [s for s, _ in ckpt.list_checkpoints(cfg.run.dir)] == [9, 6, 3]
    return cfg.run.dir, sets


@pytest.mark.parametrize("trial", list(TRIALS))
def test_damaged_newest_checkpoint_is_skipped_by_a_rerun_of_launch_train(trial, stopped_run, reference, tmp_path,
                                                                         caplog, capsys):
    damage, fallback, reasons, how = TRIALS[trial]
    src, sets = stopped_run
    run_dir = tmp_path / "runs" / "base"
    shutil.copytree(src, run_dir)
    sets = [s if not s.startswith("run.root=") else f"run.root={tmp_path / 'runs'}" for s in sets]
    what = {s: fn(run_dir / "checkpoints" / ckpt_name(s)) for s, fn in damage.items()}
    rc, err, warnings = rerun(sets, how, caplog, capsys)
    named = all(any(ckpt_name(s) in w for w in warnings) for s in damage)
    reasons_ok = sorted(reasons) == sorted(next((x for x in reasons if x in w), w) for w in warnings)
    resumed = H.starts(run_dir)[-1]
    ok, detail = H.compare_to_reference(run_dir, reference)
    ok = ok and rc == 0 and "Traceback" not in err and named and reasons_ok and resumed == fallback
    record("damaged newest checkpoint", trial,
           f"{'; '.join(f'checkpoint {s} {w}' for s, w in what.items())}: rerun of launch/train.py ({how}) "
           f"warned ({len(warnings)} warning(s)), resumed from step {resumed}, exit {rc}", ok,
           detail + "; " + " | ".join(w.split("WARNING ", 1)[-1] for w in warnings))
    assert rc == 0 and "Traceback" not in err, err[-3000:]
    assert named and reasons_ok, warnings
    assert resumed == fallback
    assert ok, detail
