"""Trial records for RELIABILITY.md: one JSON line per fault or bad input tried, appended to a results file.

The file is ``$ADVFT_RELIABILITY_OUT`` (``scripts/reliability_report.py`` sets it), else a file in the temp
folder. A test records what it observed BEFORE it asserts, so a failing trial leaves a row that says
``lost: yes`` instead of no row at all; the report also counts pytest's own failures.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

ENV = "ADVFT_RELIABILITY_OUT"


def results_path() -> Path:
    return Path(os.environ.get(ENV) or Path(tempfile.gettempdir()) / "advft-reliability.jsonl")


def record(fault: str, trial: str, happened: str, nothing_lost: bool, detail: str = "", **extra: Any) -> None:
    """Append one trial: the fault's family (a row of the report), this trial's name (e.g. the step it hit),
    what the system did, whether nothing was lost, and details (steps, exit code, message)."""
    rec = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "fault": fault, "trial": trial, "happened": happened,
           "nothing_lost": bool(nothing_lost), "detail": detail, **extra}
    path = results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # one write of one line in append mode: concurrent writers (xdist) do not interleave within a line
    with open(path, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")
