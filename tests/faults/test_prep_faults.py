"""Faults while ``python -m data_prep`` writes: Ctrl-C, SIGTERM and SIGKILL of the FFCV writer, Ctrl-C and
SIGKILL of the DALI shard writers, and a full disk under ``ffcv`` and ``dali``. Each ends with one line and a non-zero exit, no process of the command left,
no shared memory left, and no temporary file (after SIGKILL: removed by the next run, which then finishes).

Signals are sent when the writer demonstrably writes: ``prep_inject.py`` holds one worker inside sample K
(FFCV) or inside a shard (DALI) and reports it; a full disk is a small tmpfs mounted for the test (root only; skipped elsewhere) and,
on any machine, an ENOSPC raised where the writers write (``prep_inject.py --enospc``).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faults import helpers as H
from faults.record import record

FAULT = "data_prep writer fault"
INJECT = str(Path(__file__).with_name("prep_inject.py"))
RAW = ["--write-mode", "raw", "--max-res", "0"]


def _source(root: Path, n: int, size: tuple[int, int], noise: bool = False) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        if noise:  # incompressible: big JPEGs
            a = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        else:
            yy, xx = np.mgrid[0 : size[0], 0 : size[1]]
            a = (np.stack([xx + i, yy, xx + yy], -1) % 256).astype(np.uint8)
        Image.fromarray(a).save(folder / f"{i}.jpg", quality=95)
    return root


def _group(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    alive = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(d.name))
    return alive


def _tmp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*.tmp-*")) if folder.exists() else []


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("data_prep:")]


def _start(args: list[str], logs: Path) -> subprocess.Popen:
    """The command in its own session (so a Ctrl-C can reach its whole process group, as a terminal's does)."""
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stderr.txt", "w") as err, open(logs / "stdout.txt", "w") as out:
        return subprocess.Popen([sys.executable, *args], cwd=H.ROOT, env=H.child_env(), stdout=out, stderr=err,
                                start_new_session=True)


def _finish(proc: subprocess.Popen) -> None:
    """Whatever happened, nothing of the command outlives the test."""
    for pid in _group(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        proc.wait()


@pytest.mark.ffcv
@pytest.mark.parametrize("how", ["SIGINT to the process group (Ctrl-C)", "SIGTERM", "SIGKILL"])
def test_ffcv_writer_stopped_mid_write(need_ffcv, tmp_path, how) -> None:
    src, out = _source(tmp_path / "src", 12, (30, 40)), tmp_path / "out"
    marker = tmp_path / "held"
    proc = _start([INJECT, "--hold-at", "5", "--marker", str(marker), "--", "ffcv", str(src), str(out), *RAW,
                   "--workers", "2"], tmp_path / "logs")
    try:
        H.wait_for(marker.exists, "a writer worker inside sample 5")
        tmp = _tmp_files(out)
        shm = Path(f"{marker}.shm").read_text().strip()
        assert tmp and Path("/dev/shm", shm).exists(), (tmp, shm)  # writing: temporary file and shared memory
        members = _group(proc.pid)
        if how.startswith("SIGINT"):
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, getattr(signal, how))
        try:
            rc = proc.wait(timeout=120)  # a safety net against a hang; a clean stop takes well under a second
        except subprocess.TimeoutExpired:
            rc = None
        left = H.wait_for(lambda: not _group(proc.pid) or None, "the command's processes to end", timeout_s=60) \
            if rc is not None else None
        err = (tmp_path / "logs" / "stderr.txt").read_text()
        shm_gone = H.wait_for(lambda: not Path("/dev/shm", shm).exists(), "the shared memory to be freed",
                              timeout_s=60) if rc is not None else False
        if how == "SIGKILL":
            expected_rc, one_line = -9, True
            left_tmp = _tmp_files(out)
            rerun = subprocess.run([sys.executable, "-m", "data_prep", "ffcv", str(src), str(out), *RAW,
                                    "--workers", "2"], cwd=H.ROOT, env=H.child_env(), capture_output=True, text=True,
                                   timeout=600)
            tmp_ok = left_tmp == tmp and rerun.returncode == 0 and not _tmp_files(out) \
                and (out / "train_full_0.50_90_raw.beton").is_file()
        else:
            expected_rc = 130 if how.startswith("SIGINT") else 143
            one_line = len(_error_lines(err)) == 1 and "Traceback" not in err
            tmp_ok = not _tmp_files(out) and not list(out.glob("*.beton")) and not list(out.glob("*.json"))
        ok = rc == expected_rc and one_line and left is True and shm_gone and tmp_ok
        record(FAULT, f"ffcv: {how} while a worker writes", f"exit {rc}: " + (_error_lines(err) or ["-"])[-1], ok,
               f"{len(members)} processes before, none after: {left is True}; shared memory freed: {bool(shm_gone)}; "
               f"temporary files {'removed by the next run' if how == 'SIGKILL' else 'removed'}: {tmp_ok}")
        assert rc == expected_rc, (rc, err[-3000:])
        assert one_line, err[-3000:]
        assert left is True and shm_gone and tmp_ok
    finally:
        _finish(proc)


@pytest.mark.dali
@pytest.mark.parametrize("how", ["SIGINT to the process group (Ctrl-C)", "SIGKILL"])
def test_dali_shard_writers_stopped_mid_shard(need_dali, tmp_path, how) -> None:
    src, out = _source(tmp_path / "src", 12, (30, 40)), tmp_path / "out"
    marker = tmp_path / "held"
    args = ["dali", str(src), str(out), "--shards", "4", "--workers", "2"]
    proc = _start([INJECT, "--hold-at", "5", "--marker", str(marker), "--", *args], tmp_path / "logs")
    try:
        H.wait_for(marker.exists, "a shard writer inside sample 5")
        tmp = _tmp_files(out)
        assert tmp, "the held shard's temporary tar"
        if how.startswith("SIGINT"):
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGKILL)
        try:
            rc = proc.wait(timeout=120)  # a safety net against a hang
        except subprocess.TimeoutExpired:
            rc = None
        left = H.wait_for(lambda: not _group(proc.pid) or None, "the command's processes to end", timeout_s=60) \
            if rc is not None else None
        err = (tmp_path / "logs" / "stderr.txt").read_text()
        if how == "SIGKILL":
            expected_rc, one_line = -9, True
            left_tmp = _tmp_files(out)
            rerun = subprocess.run([sys.executable, "-m", "data_prep", *args], cwd=H.ROOT, env=H.child_env(),
                                   capture_output=True, text=True, timeout=600)
            tmp_ok = bool(left_tmp) and rerun.returncode == 0 and not _tmp_files(out) and (out / "train.json").is_file()
        else:
            expected_rc = 130
            one_line = len(_error_lines(err)) == 1 and "Traceback" not in err
            tmp_ok = not _tmp_files(out) and not (out / "train.json").exists()
        ok = rc == expected_rc and one_line and left is True and tmp_ok
        record(FAULT, f"dali: {how} while a shard is written", f"exit {rc}: " + (_error_lines(err) or ["-"])[-1],
               ok, f"no process left: {left is True}; temporary files "
                   f"{'removed by the next run' if how == 'SIGKILL' else 'removed'}: {tmp_ok}")
        assert rc == expected_rc, (rc, err[-3000:])
        assert one_line, err[-3000:]
        assert left is True and tmp_ok
    finally:
        _finish(proc)


def _full_disk_trial(trial: str, args: list[str], out: Path, logs: Path, simulated: bool = False) -> None:
    proc = _start([INJECT, "--enospc", "--", *args] if simulated else ["-m", "data_prep", *args], logs)
    try:
        try:
            rc = proc.wait(timeout=300)  # a safety net against a hang
        except subprocess.TimeoutExpired:
            rc = None
        left = H.wait_for(lambda: not _group(proc.pid) or None, "the command's processes to end", timeout_s=60) \
            if rc is not None else None
        err = (logs / "stderr.txt").read_text()
        lines = _error_lines(err)
        clear = len(lines) == 1 and "No space left on device" in lines[0] and "Traceback" not in err
        clean = not _tmp_files(out) and not list(out.rglob("*.beton")) and not (out / "train.json").exists()
        ok = rc == 4 and clear and left is True and clean
        record(FAULT, trial, f"exit {rc}: " + (lines or ["-"])[-1], ok,
               f"no process left: {left is True}; no temporary file, no sidecar: {clean}")
        assert rc == 4 and clear, (rc, err[-3000:])
        assert left is True and clean, _tmp_files(out)
    finally:
        _finish(proc)


@pytest.mark.ffcv
def test_ffcv_full_disk(need_ffcv, tmp_path, tmpfs) -> None:
    src = _source(tmp_path / "src", 30, (400, 500))  # about 18 MB of pixels, stored raw
    out = tmpfs("4m") / "out"
    _full_disk_trial("ffcv: disk full while the workers write", ["ffcv", str(src), str(out), *RAW, "--workers", "1"],
                     out, tmp_path / "logs")


@pytest.mark.dali
@pytest.mark.parametrize("workers", [1, 2])
def test_dali_full_disk(need_dali, tmp_path, tmpfs, workers) -> None:
    src = _source(tmp_path / "src", 12, (300, 400), noise=True)  # about 3 MB of JPEGs on a 1 MB disk
    out = tmpfs("1m") / "out"
    _full_disk_trial(f"dali: disk full while {workers} process(es) write shards",
                     ["dali", str(src), str(out), "--shards", "2", "--workers", str(workers)], out, tmp_path / "logs")


@pytest.mark.ffcv
def test_ffcv_simulated_full_disk(need_ffcv, tmp_path) -> None:
    src, out = _source(tmp_path / "src", 12, (30, 40)), tmp_path / "out"
    _full_disk_trial("ffcv: ENOSPC at a worker's first page write (simulated)",
                     ["ffcv", str(src), str(out), *RAW, "--workers", "2"], out, tmp_path / "logs", simulated=True)


@pytest.mark.dali
def test_dali_simulated_full_disk(need_dali, tmp_path) -> None:
    src, out = _source(tmp_path / "src", 12, (30, 40)), tmp_path / "out"
    _full_disk_trial("dali: ENOSPC at the first sample of a shard (simulated)",
                     ["dali", str(src), str(out), "--shards", "2", "--workers", "2"], out, tmp_path / "logs",
                     simulated=True)
