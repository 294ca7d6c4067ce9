"""Run files that are not what the tools expect: results.json not a JSON object, a metrics.jsonl line that is
not an object, a torn last line, a truncated encoder.pt, NaN final accuracies, a NaN base encoder, a FIFO
as a checkpoint. Each gets a warning (or error) naming the file and line and saying what is true; a run
resumes from its checkpoints (the truth of where a run is), the report never shows a lie as finished.
Each test records what it observed for RELIABILITY.md (tests/faults/record.py) before it asserts."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from advft import config as C
from advft.engine import RunDir
from faults.record import record
from launch import pretrain as LP, report as LR, train as LT

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "tests" / "assets" / "test_tiny.toml"
DAMAGED = "damaged run files"
LIES = "smaller lies"


def _damage(rd: RunDir) -> list[str]:
    """results.json a JSON list, metrics.jsonl line 2 a number, and a torn last line; the expected warnings."""
    rd.results.write_text("[1, 2]\n")
    lines = rd.metrics.read_text().splitlines(keepends=True)
    n = len(lines) + 2  # the torn line's number
    rd.metrics.write_text(lines[0] + "42\n" + "".join(lines[1:]) + '{"step": 9, "ki')
    return [f"{rd.results} line 1: a JSON list, not an object", f"{rd.metrics} line 2: a JSON int, not an object",
            f"{rd.metrics} line {n}: torn last line"]


def _unwarned(caplog, needles: list[str]) -> list[str]:
    """The expected warnings that were not logged."""
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    return [needle for needle in needles if needle not in text]


def _warned(caplog, needles: list[str]) -> None:
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    for needle in needles:
        assert needle in text, (needle, text)


def test_train_warns_about_damaged_run_files_and_resumes_from_its_checkpoints(tmp_path, base_encoder, caplog,
                                                                             capsys):
    caplog.set_level(logging.INFO)
    argv = [str(JOB), "--set", f"model.checkpoint={base_encoder}", "--set", f"run.root={tmp_path}",
            "--set", "run.name=t", "--set", f"data.path={tmp_path / 'cache'}"]
    assert LT.main(argv) == 0
    rd = RunDir(tmp_path / "t")
    expected = _damage(rd)
    caplog.clear()
    rc = LT.main(argv)
    err = capsys.readouterr().err
    missing = _unwarned(caplog, expected)
    status = rd.read_results().get("status") if rc == 0 else None
    resumed = json.loads(rd.manifest.read_text())["starts"][-1]["resume_step"]
    objects = all(isinstance(json.loads(line), dict) for line in rd.metrics.read_text().splitlines())
    record(DAMAGED, "launch/train.py: results.json a list, a metrics.jsonl line a number, a torn last line",
           f"exit {rc}; resumed from step {resumed} (the final checkpoint: 8); status {status}", rc == 0 and
           not missing and "Traceback" not in err and status == "finished" and resumed == 8 and objects,
           f"warnings missing: {missing or 'none'}; metrics.jsonl all objects after the rerun: {objects}")
    assert rc == 0, err
    _warned(caplog, expected)
    assert "Traceback" not in err
    assert status == "finished"
    assert resumed == 8  # from the final checkpoint
    assert objects


def test_pretrain_remakes_a_truncated_encoder_and_resumes_past_damaged_files(tmp_path, caplog, capsys):
    from advft.simclr.config import load_config
    from simclr.test_pretrain import TINY

    caplog.set_level(logging.INFO)
    cfg = load_config(None, [*TINY, f"run.root={tmp_path / 'runs'}", "run.name=p", f"data.path={tmp_path / 'c'}"])
    job = tmp_path / "job.toml"
    job.write_text(C.to_toml(cfg))
    assert LP.main([str(job)]) == 0
    rd = RunDir(cfg.run.dir)
    good = rd.encoder.read_bytes()
    rd.encoder.write_bytes(good[: len(good) // 2])  # a copy cut short
    caplog.clear()
    rc = LP.main([str(job)])
    lied = "already finished" in caplog.text
    missing = _unwarned(caplog, [f"{rd.encoder} is unreadable"])
    same = rd.encoder.read_bytes() == good  # made again from the final checkpoint: the same encoder
    record(LIES, "launch/pretrain.py: encoder.pt cut to half its size", f"exit {rc}; 'already finished': {lied}; "
           f"encoder.pt made again, bit-identical: {same}", rc == 0 and not lied and not missing and same,
           f"warning missing: {missing or 'none'}")
    assert rc == 0
    assert not lied
    _warned(caplog, [f"{rd.encoder} is unreadable"])
    assert same
    expected = _damage(rd)
    caplog.clear()
    rc = LP.main([str(job)])
    err = capsys.readouterr().err
    missing = _unwarned(caplog, expected)
    status = rd.read_results().get("status") if rc == 0 else None
    same = rd.encoder.read_bytes() == good
    record(DAMAGED, "launch/pretrain.py: results.json a list, a metrics.jsonl line a number, a torn last line",
           f"exit {rc}; status {status}; encoder.pt unchanged: {same}",
           rc == 0 and not missing and "Traceback" not in err and status == "finished" and same,
           f"warnings missing: {missing or 'none'}")
    assert rc == 0, err
    _warned(caplog, expected)
    assert status == "finished" and same


def test_a_nan_base_encoder_fails_without_promising_a_checkpoint(tmp_path, capsys):
    from advft.models import build_encoder, encoder_state_dict

    enc = build_encoder("tiny", "cifar")
    state = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
             for k, v in encoder_state_dict(enc).items()}
    bad = tmp_path / "nan.pt"
    torch.save({"format": "advft-encoder", "model": state, "arch": "tiny", "stem": "cifar", "normalize": "none"},
               bad)
    argv = [str(JOB), "--set", f"model.checkpoint={bad}", "--set", f"run.root={tmp_path}", "--set", "run.name=n",
            "--set", f"data.path={tmp_path / 'cache'}"]
    rc = LT.main(argv)
    err = capsys.readouterr().err
    said = "non-finite loss at step 0" in err and "no checkpoint was written" in err
    promised = "resumes from it" in err
    checkpoints = (tmp_path / "n" / "checkpoints").exists()
    record(LIES, "a base encoder full of NaN", f"exit {rc}: {err.strip().splitlines()[-1] if err.strip() else '-'}",
           rc == 3 and said and not promised and not checkpoints,
           f"promises a checkpoint to resume from: {promised}; a checkpoints folder: {checkpoints}")
    assert rc == 3
    assert said
    assert not promised and not checkpoints


def test_a_fifo_as_the_checkpoint_is_not_a_regular_file(tmp_path, capsys):
    fifo = tmp_path / "enc.pt"
    os.mkfifo(fifo)
    argv = [str(JOB), "--set", f"model.checkpoint={fifo}", "--set", f"run.root={tmp_path}"]
    rc = LT.main(argv)
    err = capsys.readouterr().err.strip()
    want = f"error: model.checkpoint: {fifo} is not a regular file (a FIFO, device or socket?); give the " \
           f"checkpoint file"
    record(LIES, "a FIFO as model.checkpoint", f"exit {rc}: {err}", rc == 2 and err == want)
    assert rc == 2
    assert err == want


def _finished_run(sweep: Path, name: str, final: dict) -> RunDir:
    rd = RunDir(sweep / name)
    rd.path.mkdir(parents=True)
    cfg = C.load(JOB, [f"run.name={name}", f"run.root={sweep}"])
    rd.config.write_text(C.to_toml(cfg))
    rd.metrics.write_text(json.dumps({"step": 2, "kind": "train", "loss": 1.0}) + "\n")
    rd.write_results({"status": "finished", "initial": {"clean_acc": 10.0, "robust_acc": 0.0}, "final": final})
    return rd


def test_the_report_flags_damaged_files_and_nan_finals(tmp_path, capsys, caplog):
    from advft.report import load_sweep

    sweep = tmp_path / "sw"
    ok = _finished_run(sweep, "ok", {"clean_acc": 20.0, "robust_acc": 5.0})
    nan = _finished_run(sweep, "nan", {"clean_acc": float("nan"), "robust_acc": float("inf")})
    torn = _finished_run(sweep, "torn", {"clean_acc": 30.0, "robust_acc": 6.0})
    expected = _damage(torn)
    ok.metrics.write_text("[]\n" + ok.metrics.read_text())
    runs = {r.name: r for r in load_sweep(sweep).runs}
    ok_read = runs["ok"].status == "finished" and runs["ok"].last_step == 2
    nan_failed = runs["nan"].status == "failed" and "final clean_acc, robust_acc not finite" in (runs["nan"].error
                                                                                                 or "")
    torn_unfinished = runs["torn"].status == "running"  # results.json unreadable: not finished, whatever it held
    missing = _unwarned(caplog, [*expected, f"{ok.metrics} line 1: a JSON list, not an object"])
    caplog.clear()
    rc = LR.main([str(sweep)])
    report = (sweep / "REPORT.md").read_text() if rc == 0 else ""
    shown = "final clean_acc, robust_acc not finite" in report
    missing_cli = _unwarned(caplog, expected)
    record(DAMAGED, "the report: results.json a list, metrics.jsonl lines not objects, a torn last line",
           f"damaged run: {runs['torn'].status}; the run with a bad first line read to step {runs['ok'].last_step}; "
           f"launch/report.py exit {rc}", ok_read and torn_unfinished and not missing and rc == 0 and not missing_cli,
           f"warnings missing: {(missing + missing_cli) or 'none'}")
    record(LIES, "NaN and Inf final accuracies in a finished results.json (the report)",
           f"status {runs['nan'].status}: {runs['nan'].error}; REPORT.md says so: {shown}", nan_failed and shown)
    assert ok_read
    assert nan_failed
    assert torn_unfinished
    assert not missing, missing
    assert rc == 0
    assert shown
    _warned(caplog, expected)
