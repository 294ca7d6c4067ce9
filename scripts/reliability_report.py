#!/usr/bin/env python
"""Run the reliability suite and write RELIABILITY.md (summary) and docs/reliability.md (every trial).

    python scripts/reliability_report.py                 # run the suite, write both files
    python scripts/reliability_report.py --out X.md --full Y.md -- -k sigkill   # extra pytest arguments after --
    python scripts/reliability_report.py --no-run --results R.jsonl --junit J.xml   # re-render only

The suite is ``tests/faults/`` (requeue signals, SIGKILL, damaged checkpoints, NaN, full disk, concurrent
sweeps, data_prep writer faults), ``tests/test_data_prep_trust.py`` (data_prep outputs trusted only when right,
link loops, special files, unwritable outputs, alpha channels), ``tests/test_run_files.py`` (damaged run files,
smaller lies), ``tests/test_bad_input.py`` and ``tests/test_security.py``. Each trial appends one JSON record to
``$ADVFT_RELIABILITY_OUT`` (tests/faults/record.py): fault, trial, what happened, whether nothing was lost,
detail. This script sets that variable to a fresh file, runs pytest with a JUnit report next to it, and
renders both: the summary (``--out``: one row per fault, trials, outcome, "lost: nothing" or what was lost,
pytest's counts, the regeneration command) and the full report (``--full``: the same summary, then one table
per fault with every trial, pytest's own counts per file, skips and failures, the commands, the date and the
machine). Exit status: 0 when every test passed and every row says nothing was lost, else 1 (the reports are
written either way).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SUITE = ["tests/faults", "tests/test_data_prep_trust.py", "tests/test_run_files.py", "tests/test_bad_input.py",
         "tests/test_security.py"]
ENV = "ADVFT_RELIABILITY_OUT"
REGENERATE = ".venv/bin/python scripts/reliability_report.py"

# What each family's trials check: the test's contract, shown next to the measured outcome (not a result).
CHECKS = {
    "requeue signal": "stop request at a step boundary; checkpoint there; the resumed run's weights and optimizer "
                      "state bit-identical to an uninterrupted run; every step trained once and logged once",
    "SIGKILL": "kill -9 at a moment of the run, inside checkpoint writes too; the next start resumes from the newest "
               "valid checkpoint without error and ends bit-identical; no temporary file left",
    "damaged newest checkpoint": "rerun of launch/train.py detects it (checksum or load check), warns naming the "
                                 "file and reason, resumes from the previous one, ends bit-identical",
    "non-finite loss": "exit 3 with one error line; last good checkpoint intact; results.json failed; a sweep marks "
                       "the run failed and resubmits it alone; the rerun resumes from the good checkpoint",
    "full disk": "ENOSPC in a checkpoint write (or before the first write): exit 4 with one error line naming the file "
                 "and the cause; previous checkpoint intact, no temporary file; after making room the rerun ends "
                 "bit-identical",
    "two sweeps at once on one runs folder": "the lock serialises submission: each run submitted and started once, "
                                             "sweep.json and every checkpoint valid, results bit-identical",
    "data_prep writer fault": "SIGINT/SIGTERM/SIGKILL while an FFCV worker writes (held there), a full disk under "
                              "ffcv and dali: one line and exit 130/143/4 (SIGKILL: -9), no process of the command "
                              "left, shared memory freed, no temporary file (after SIGKILL: removed by the next run, "
                              "which removes only temporary files of dead writers on this host)",
    "data_prep output trusted only when right": "done = written, verified when asked, made from the source as it is "
                                                "now: a failed --verify leaves no sidecar and the rerun rebuilds; a "
                                                "rerun with --verify reads the output back and fails with one line "
                                                "on damage of the same size (.beton bytes, a label in the DALI "
                                                "list), then rebuilds; images added, removed or changed make ffcv "
                                                "and dali rebuild",
    "symlink loop in the source": "a link back up the tree (ln -s .. SRC/train/cat/loop), to another class or to a "
                                  "file already read: each real folder read once, each real file counted once, the "
                                  "links recorded as skipped; ffcv (--verify), dali and the training loaders (folder "
                                  "dataset, DALI reading a folder) hold the real images only, the same files",
    "special files in the source": "a FIFO, a socket, a link to /dev/zero and a dangling link named *.jpg: never "
                                   "opened (no hang), recorded as skipped; the conversion finishes with the regular "
                                   "images",
    "unwritable output": "an output folder on a read-only file system: exit 2 with one line naming it, before the "
                         "source is read (ffcv, dali); /proc, a parent that is a file and a .beton that is a folder "
                         "are rows of 'bad input: python -m data_prep'",
    "alpha channel": "an RGBA PNG (alpha 0..255) is stored, verified and read as PIL's convert('RGB') gives it "
                     "(alpha dropped, pixels bit-identical): ffcv raw and jpg with --verify, dali with --verify, "
                     "DALI's decoder, the folder loader",
    "damaged run files": "results.json not a JSON object, a metrics.jsonl line not an object, a torn last line: a "
                         "warning naming the file and line, no traceback; launch/train.py and launch/pretrain.py "
                         "resume from their checkpoints and finish; the report reads the rest and does not show "
                         "the damaged run as finished",
    "smaller lies": "a truncated encoder.pt is made again bit-identical (not 'already finished'); NaN/Inf final "
                    "accuracies are reported as failed; a NaN base encoder exits 3 without promising a checkpoint "
                    "to resume from; a FIFO as model.checkpoint is 'not a regular file'",
    "security": "checkpoints only via weights_only=True; malicious pickles refused without running; no planted "
                "secret in any file or log; hostile names refused",
}
ORDER = list(CHECKS)


def machine() -> "OrderedDict[str, str]":
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        mem = f"{kb / 2**20:.0f} GiB"
    except (OSError, AttributeError):
        pass
    try:
        import torch

        torch_v = f"{torch.__version__} (CPU threads per trial: 1)"
    except ImportError:
        torch_v = "not installed"

    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else "?"

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return OrderedDict([
        ("host", socket.gethostname()), ("cpu", f"{cpu}, {os.cpu_count()} logical cores"), ("memory", mem),
        ("os", platform.platform()), ("python", platform.python_version()), ("torch", torch_v),
        ("git", f"{git('rev-parse', '--short', 'HEAD')}{' + uncommitted changes' if dirty else ''}"),
    ])


def run_suite(results: Path, junit: Path, extra: list[str]) -> tuple[int, float, tuple[float, ...], list[str]]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITE, f"--junitxml={junit}", *extra]
    env = {**os.environ, ENV: str(results), "WANDB_MODE": "disabled"}
    load = os.getloadavg()
    t0 = time.monotonic()
    rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    return rc, time.monotonic() - t0, load, cmd


def read_junit(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0, "bad": [],
                           "skips": [], "files": OrderedDict()}
    if not path.is_file():
        return out
    for suite in ET.parse(path).getroot().iter("testsuite"):
        for k in ("tests", "failures", "errors", "skipped"):
            out[k] += int(suite.get(k, 0))
        out["time"] += float(suite.get("time", 0))
        for case in suite.iter("testcase"):
            f = case.get("classname", "?").replace(".", "/") + ".py"
            n, t = out["files"].get(f, (0, 0.0))
            out["files"][f] = (n + 1, t + float(case.get("time", 0)))
            name = f"{f}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                out["bad"].append(name)
            skip = case.find("skipped")
            if skip is not None:
                out["skips"].append(f"{name}: {skip.get('message', '')}")
    return out


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


_TMP = re.compile(r"/tmp/pytest-of-[^/\s]+/pytest-\d+/|" + re.escape(tempfile.gettempdir().rstrip("/")) + r"/")


def cell(text: Any) -> str:
    """Table-safe: temp paths shortened, the repository root dropped, pipes escaped, one line."""
    s = _TMP.sub("$TMP/", str(text)).replace(str(ROOT) + "/", "")
    return s.replace("|", "\\|").replace("\n", " ").strip()


def lost(ok: bool) -> str:
    return "nothing" if ok else "**YES**"


def _families(records: list[dict[str, Any]]) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    """(fault families, bad-input families), each in the order of CHECKS."""
    fams: "OrderedDict[str, list[dict[str, Any]]]" = OrderedDict()

    def rank(r: dict[str, Any]) -> tuple[int, str]:
        return (ORDER.index(r["fault"]) if r["fault"] in ORDER else len(ORDER), r["fault"])

    for r in sorted(records, key=rank):
        fams.setdefault(r["fault"], []).append(r)
    faults = {k: v for k, v in fams.items() if not k.startswith("bad input")}
    inputs = {k: v for k, v in fams.items() if k.startswith("bad input")}
    return faults, inputs


def _head(records: list[dict[str, Any]], junit: dict[str, Any], meta: dict[str, Any], title: str) -> list[str]:
    """Title, provenance, the verdict line and the summary table: the part both files share."""
    faults, inputs = _families(records)
    n_lost = sum(not r["nothing_lost"] for r in records)
    n_bad = sum(len(v) for v in inputs.values())
    passed = junit["tests"] - junit["failures"] - junit["errors"] - junit["skipped"]
    verdict = ("every row: lost nothing" if n_lost == 0 and not junit["bad"]
               else f"{n_lost} trial(s) lost something, {len(junit['bad'])} test(s) failed")
    L = [
        f"# {title}",
        "",
        f"Generated by `{REGENERATE}` on {meta['date']}; do not edit by hand, regenerate.",
        "",
        f"**{len(records) - n_bad} fault trials of {len(faults)} kinds and {n_bad} malformed inputs; {verdict}.** "
        f"pytest: {passed} passed, {junit['failures'] + junit['errors']} failed, {junit['skipped']} skipped, "
        f"{meta['wall']:.0f} s wall time.",
        "",
        "Every trial runs the real code on the tests' tiny job (a 12-step fine-tuning of a tiny ResNet on synthetic "
        "data, CPU, one thread per process) and compares the end state with an uninterrupted run of the same config: "
        "*lost: nothing* means final weights AND optimizer state bit-identical (`torch.equal`), every training step "
        "logged exactly once with the reference's values, and no leftover file. For bad input it means exit 2, one "
        "line on stderr naming the key/path/value, no traceback, and the runs and output folders untouched. For the "
        "data_prep and run-file families it means every check of the family's row held, as observed in the trial. "
        "Random choices (steps, kill moments, damaged bytes) come from a fixed seed and are listed per trial.",
        "",
        "## Summary",
        "",
        "| fault | trials | what each trial checks | outcome | lost |",
        "|---|---:|---|---|---|",
    ]
    for fam, rs in faults.items():
        ok = sum(r["nothing_lost"] for r in rs)
        L.append(f"| {cell(fam)} | {len(rs)} | {cell(CHECKS.get(fam, ''))} | {ok}/{len(rs)} as checked | "
                 f"{lost(ok == len(rs))} |")
    for fam, rs in inputs.items():
        ok = sum(r["nothing_lost"] for r in rs)
        L.append(f"| {cell(fam)} | {len(rs)} | exit 2, one line naming the key/path/value, no traceback, nothing "
                 f"written or submitted | {ok}/{len(rs)} rejected cleanly | {lost(ok == len(rs))} |")
    return L


def render_summary(records: list[dict[str, Any]], junit: dict[str, Any], meta: dict[str, Any], full_link: str) -> str:
    """RELIABILITY.md: the verdict and one row per fault, with a link to every trial and how to regenerate."""
    L = _head(records, junit, meta, "Reliability")
    L += ["", f"Every trial, the malformed inputs one by one, pytest's timing per file and the machine: "
              f"[{full_link}]({full_link}).", "",
          f"Machine: {cell(meta['machine'].get('cpu', '?'))}; git {cell(meta['machine'].get('git', '?'))}.", "",
          "Regenerate (runs the whole suite; takes several minutes):", "", "```", REGENERATE, "```"]
    if junit["bad"]:
        L += ["", "**Failed tests:**", ""] + [f"- {cell(s)}" for s in junit["bad"]]
    return "\n".join(L) + "\n"


def render(records: list[dict[str, Any]], junit: dict[str, Any], meta: dict[str, Any]) -> str:
    """docs/reliability.md: the summary, then every trial, every malformed input and the run's details."""
    faults, inputs = _families(records)
    L = _head(records, junit, meta, "Reliability report: every trial")
    L += ["", "## Faults, trial by trial", ""]
    for fam, rs in faults.items():
        L += [f"### {fam}", "", f"Checks: {CHECKS.get(fam, '-')}", "", "| trial | what happened | detail | lost |",
              "|---|---|---|---|"]
        L += [f"| {cell(r['trial'])} | {cell(r['happened'])} | {cell(r.get('detail', ''))} "
              f"| {lost(r['nothing_lost'])} |"
              for r in rs]
        L.append("")
    L += ["## Malformed inputs", "",
          "Each through the real command line, in its own process. `$RUNS` is a runs folder holding one earlier run "
          "(compared file by file before and after), `$BAD` the folder of malformed files, `$COMMON` = `--set "
          "model.checkpoint=<tiny encoder> --set data.path=<data cache> --set run.root=$RUNS`.", ""]
    for fam, rs in inputs.items():
        L += [f"### {fam.removeprefix('bad input: ')} ({len(rs)})", "",
              "| input | command | the one line on stderr | lost |",
              "|---|---|---|---|"]
        L += [f"| {cell(r['trial'])} | `{cell(r.get('command', ''))}` | {cell(r['happened'])} "
              f"| {lost(r['nothing_lost'])} |"
              for r in rs]
        L.append("")
    L += ["## Run", "", "| | |", "|---|---|", f"| date | {meta['date']} |"]
    L += [f"| {k} | {cell(v)} |" for k, v in meta["machine"].items()]
    L += [f"| load average at start | {' / '.join(f'{x:.1f}' for x in meta['load'])} (1/5/15 min; the machine may "
          f"be shared, so wall times are upper bounds) |",
          f"| wall time | {meta['wall']:.0f} s |", "", "Commands:", "", "```",
          REGENERATE, f"# runs: {ENV}=<results.jsonl> " + " ".join(
              ["python -m pytest -q -p no:cacheprovider", *SUITE, "--junitxml=<junit.xml>", *meta["extra"]]), "```", "",
          "Time per test file (pytest's own timing):", "", "| file | tests | seconds |", "|---|---:|---:|"]
    L += [f"| {cell(f)} | {n} | {t:.0f} |" for f, (n, t) in junit["files"].items()]
    if junit["skips"]:
        L += ["", "Skipped:", ""] + [f"- {cell(s)}" for s in junit["skips"]]
    if junit["bad"]:
        L += ["", "**Failed tests:**", ""] + [f"- {cell(s)}" for s in junit["bad"]]
    return "\n".join(L) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Whole file or the old one: a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/reliability_report.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "RELIABILITY.md"), help="the summary (default RELIABILITY.md)")
    p.add_argument("--full", default=str(ROOT / "docs" / "reliability.md"),
                   help="every trial (default docs/reliability.md)")
    p.add_argument("--results", help="records file (default: a fresh temporary file)")
    p.add_argument("--junit", help="pytest's JUnit XML (default: next to the records)")
    p.add_argument("--no-run", action="store_true", help="render existing --results/--junit, run nothing")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments, after --")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="advft-reliability-"))
    results = Path(a.results) if a.results else work / "results.jsonl"
    junit = Path(a.junit) if a.junit else results.with_suffix(".junit.xml")
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    if a.no_run:
        rc, wall, load = 0, 0.0, os.getloadavg()
    else:
        results.unlink(missing_ok=True)
        rc, wall, load, _ = run_suite(results, junit, a.pytest_args)
    records, j = read_records(results), read_junit(junit)
    if a.no_run:
        wall = j["time"]
    meta = {"date": date, "wall": wall, "load": load, "machine": machine(), "extra": a.pytest_args}
    out, full = Path(a.out), Path(a.full)
    link = os.path.relpath(full.resolve(), out.resolve().parent)
    write_atomic(full, render(records, j, meta))
    write_atomic(out, render_summary(records, j, meta, link))
    n_lost = sum(not r["nothing_lost"] for r in records)
    print(f"wrote {out} and {full}: {len(records)} records, {n_lost} lost something; pytest exit {rc}; "
          f"records in {results}")
    return 0 if rc == 0 and n_lost == 0 and records else 1


if __name__ == "__main__":
    sys.exit(main())
