"""scripts/reliability_report.py renders a summary (RELIABILITY.md) and every trial (docs/reliability.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "reliability_report.py"

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="3" failures="{failures}" errors="0" skipped="0" time="12.5">
<testcase classname="tests.faults.test_kill" name="test_kill" time="7.0">{failure}</testcase>
<testcase classname="tests.faults.test_kill" name="test_kill_in_write" time="4.0"/>
<testcase classname="tests.test_bad_input" name="test_bad_key" time="1.5"/>
</testsuite></testsuites>
"""


def _records(lost_one: bool) -> list[dict]:
    return [
        {"fault": "SIGKILL", "trial": "step 3", "happened": "resumed at step 3", "nothing_lost": True,
         "detail": "weights bit-identical"},
        {"fault": "SIGKILL", "trial": "inside a checkpoint write", "happened": "resumed at step 2",
         "nothing_lost": not lost_one, "detail": "a | pipe in the detail"},
        {"fault": "bad input: launch/train.py", "trial": "unknown key", "happened": "error: unknown key 'x'",
         "nothing_lost": True, "command": "launch/train.py jobs/bad.toml"},
    ]


def _render(tmp_path: Path, lost_one: bool) -> tuple[subprocess.CompletedProcess, str, str]:
    results, junit = tmp_path / "r.jsonl", tmp_path / "j.xml"
    results.write_text("".join(json.dumps(r) + "\n" for r in _records(lost_one)))
    failure = '<failure message="boom"/>' if lost_one else ""
    junit.write_text(JUNIT.format(failures=int(lost_one), failure=failure))
    out, full = tmp_path / "RELIABILITY.md", tmp_path / "docs" / "reliability.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--no-run", "--results", str(results), "--junit", str(junit),
                           "--out", str(out), "--full", str(full)], capture_output=True, text=True, timeout=120)
    return done, out.read_text(), full.read_text()


def test_summary_and_full_report_from_recorded_trials(tmp_path: Path) -> None:
    done, summary, full = _render(tmp_path, lost_one=False)
    assert done.returncode == 0, done.stdout + done.stderr
    headline = "**2 fault trials of 1 kinds and 1 malformed inputs; every row: lost nothing.**"
    for text in (summary, full):
        assert headline in text and "pytest: 3 passed, 0 failed, 0 skipped" in text
        assert "| SIGKILL | 2 |" in text and "| 2/2 as checked | nothing |" in text
        assert "| bad input: launch/train.py | 1 |" in text
    # the summary: one row per fault, a link to every trial, the regeneration command; no trial rows
    assert "[docs/reliability.md](docs/reliability.md)" in summary
    assert ".venv/bin/python scripts/reliability_report.py" in summary
    assert "inside a checkpoint write" not in summary and "unknown key" not in summary
    # the full report: every trial, pipes escaped, the malformed input with its command, timing per file
    assert "| inside a checkpoint write | resumed at step 2 | a \\| pipe in the detail | nothing |" in full
    assert "| unknown key | `launch/train.py jobs/bad.toml` | error: unknown key 'x' | nothing |" in full
    assert "| tests/faults/test_kill.py | 2 | 11 |" in full
    assert not list(tmp_path.rglob(".*.tmp"))


def test_a_lost_trial_or_failed_test_shows_in_both_files_and_the_exit_status(tmp_path: Path) -> None:
    done, summary, full = _render(tmp_path, lost_one=True)
    assert done.returncode == 1
    for text in (summary, full):
        assert "1 trial(s) lost something, 1 test(s) failed" in text
        assert "| 1/2 as checked | **YES** |" in text
        assert "tests/faults/test_kill.py::test_kill" in text
