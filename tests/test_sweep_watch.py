"""The end of a followed sweep: a run that ended without a result (a time limit, a kill) is named with what
to do, a failed one is not counted as resumable; the table and the report are written either way."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from advft import config as C
from launch.profiles import load_profile
from launch.sweeper.plan import Plan, PlannedRun
from launch.sweeper.watch import follow


class _Done:
    def results(self) -> None:
        return None


def test_a_sweep_with_unfinished_runs_says_the_same_command_resumes_them(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    runs = []
    for name, status in (("a", "finished"), ("b", None), ("c", "failed")):
        cfg = C.load(None, [f"run.root={tmp_path}", f"run.name=sweep/{name}"])
        cfg.run.dir.mkdir(parents=True)
        if status:
            (cfg.run.dir / "results.json").write_text(json.dumps({"status": status}))
        runs.append(PlannedRun(name=name, point={}, cfg=cfg))
    plan = Plan(name="sweep", sweep_dir=tmp_path / "sweep", job=Path("job.toml"), axes=[], fixed={}, runs=runs,
                kind="debug", profile=load_profile("local"))
    record = {"runs": {r.name: {"job_id": ""} for r in runs}}
    assert follow(plan, [r.name for r in runs], record, {r.name: _Done() for r in runs}) == 1
    err = capsys.readouterr().err
    assert "1 run(s) ended without a result (time limit or killed; their logs above): rerun the same command to " \
           "resume them from their last checkpoint" in err
