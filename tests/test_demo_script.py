"""scripts/demo.sh's presets, planned without running anything (--dry-run): the default alpha grid and the
loss comparison, both with the demo's generous time limit per job."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _plan(tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "ADVFT_DEMO_CLUSTER": "local", "WANDB_MODE": "disabled"}
    p = subprocess.run(["bash", "scripts/demo.sh", *args, "--dry-run", "--set", f"run.root={tmp_path}"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert not any(tmp_path.iterdir()), "a dry run writes nothing"
    return p.stdout


@pytest.mark.parametrize("preset, sweep, runs", [
    ((), "demo", ["alpha=0-", "alpha=0.1-", "alpha=1-"]),
    (("losses",), "demo_losses", ["alpha=0,loss=fare-", "alpha=1,loss=fare-", "alpha=0,loss=cosine-",
                                  "alpha=1,loss=cosine-", "loss=trades-", "loss=deacl-"]),
])
def test_demo_presets_plan_their_runs(tmp_path: Path, preset: tuple[str, ...], sweep: str, runs: list[str]) -> None:
    out = _plan(tmp_path, *preset)
    assert f"sweep {sweep}: {len(runs)} run(s) of jobs/demo.toml in {tmp_path / sweep}" in out
    table = out.split("\nrun ")[1].split("\ndry run:")[0].splitlines()[1:]  # the plan's rows after its header
    # without a base encoder (a fresh clone) the pretraining is planned first and the runs wait for it
    planned = [line.split()[0] for line in table if not line.startswith("pretraining")]
    assert [name.rsplit("-", 1)[0] + "-" for name in planned] == runs
    assert "120 min/job" in out  # not the test profile's 10 minutes: a busy laptop's runs outlast it
