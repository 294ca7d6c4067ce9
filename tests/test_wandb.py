"""The wandb mirror, offline (nothing leaves the machine): one safe id per run folder, kept across requeues;
job type, group, step axis, summary and artifacts; an online start without network goes on offline."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from advft.engine import Interrupted, RunDir
from advft.fare import finetune
from wandb_log import segment

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("wandb")


def test_the_wandb_id_is_safe_made_once_and_unique_to_its_folder(tmp_path):
    a, b = RunDir(tmp_path / "alpha=0,lr=1e-3-abc"), RunDir(tmp_path / "other")
    a.path.mkdir(), b.path.mkdir()
    first = a.wandb_id()
    assert re.fullmatch(r"[a-z0-9]{12}", first)
    assert a.wandb_id() == first == (a.path / "wandb_id").read_text().strip()
    assert b.wandb_id() != first


def test_a_requeued_offline_run_is_one_wandb_run_with_steps_increasing(tiny_cfg, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    # the run name of a two-axis grid point: commas and '=' are what wandb refuses in an id
    cfg = tiny_cfg("run.wandb=auto", "run.wandb_artifacts=true", name="alpha=0,lr=1e-3-0123abcd")
    polls = iter([False, True])  # stop at the second log step (step 4), as a requeue signal would
    with pytest.raises(Interrupted):
        finetune(cfg, should_stop=lambda: next(polls, False), group="sw")
    res = finetune(cfg, group="sw")
    assert res["status"] == "finished"
    import wandb

    wandb.teardown()  # as at the process's exit: the service writes its last records (the summary)
    wid = (cfg.run.dir / "wandb_id").read_text().strip()
    segs = sorted((cfg.run.dir / "wandb").glob("offline-run-*"))  # named by start time: in start order
    assert len(segs) == 2 and all(s.name.endswith(f"-{wid}") for s in segs)
    first, second = segment(segs[0]), segment(segs[1])
    for seg in (first, second):
        assert (seg["run"].run_id, seg["run"].run_group, seg["run"].job_type) == (wid, "sw", "finetune")
        assert seg["metrics"]["eval/*"] == "step" and seg["metrics"]["train/*"] == "step"
    steps1, steps2 = ([r["step"] for r in s["rows"]] for s in (first, second))
    assert steps1 == sorted(steps1) and steps2 == sorted(steps2) and max(steps1) < min(steps2)
    assert max(steps2) == cfg.optim.steps
    assert second["summary"]["final/robust_acc"] == res["final"]["robust_acc"]
    assert second["summary"]["initial/clean_acc"] == res["initial"]["clean_acc"]
    assert second["artifacts"] == ["base-encoder", "alpha_0_lr_1e-3-0123abcd-final"] and not first["artifacts"]


def test_online_without_network_goes_on_offline_with_one_warning(tmp_path):
    with socket.socket() as s:  # a port nobody listens on: every connection is refused, nothing leaves
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_API_KEY="0" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{port}", WANDB_INIT_TIMEOUT="5",
               WANDB_CONFIG_DIR=str(tmp_path / "cfg"), PYTHONPATH=str(ROOT))
    code = ("import logging, sys; from pathlib import Path; logging.basicConfig(level=logging.INFO)\n"
            "from advft.engine.record import start_wandb\nfrom advft.engine.rundir import RunDir\n"
            "rd = RunDir(Path(sys.argv[1])); rd.path.mkdir()\n"
            "run = start_wandb(rd, 'sw', 'finetune', {'x': 1}, 'online')\n"
            "run.log({'step': 2, 'train/loss': 1.0}); run.finish()\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("wandb could not start online") == 1 and "Traceback" not in r.stderr
    wid = (tmp_path / "run" / "wandb_id").read_text().strip()
    seg, = (tmp_path / "run" / "wandb").glob(f"offline-run-*-{wid}")
    assert [row["step"] for row in segment(seg)["rows"]] == [2]
