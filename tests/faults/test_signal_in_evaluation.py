"""A REAL SIGUSR1 to ``launch/train.py`` inside the step-0 evaluation: the run abandons the evaluation and
exits 75 (requeue) without a checkpoint to write; the rerun evaluates again and ends bit-identical to an
uninterrupted run (issue 13 item 4). The run waits at its second evaluation poll (after the first chunk of
the evaluation) until the signal has come (``hold.py``), so the signal lands inside it on any machine.
"""
from __future__ import annotations

import os
import re
import signal

from advft.fare import finetune
from faults import helpers as H
from faults import hold


def test_real_sigusr1_inside_the_initial_evaluation_exits_75_and_the_rerun_is_bit_identical(fault_run, reference,
                                                                                             tmp_path):
    cfg, sets = fault_run("usr1-eval")
    held = tmp_path / "hold"
    env = H.child_env(**hold.environment(held, at="eval", poll=2))
    proc = H.start_cli(["launch/train.py", *H.train_argv(sets, "--stop-signals", "USR1")], tmp_path / "log", env)
    try:
        hold.wait_held(held, alive=lambda: proc.poll() is None)
        os.kill(proc.pid, signal.SIGUSR1)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (tmp_path / "log" / "stderr.txt").read_text()
    assert rc == 75 and re.search(r"interrupted: stopped at step 0 on request", err), err[-2000:]
    assert H.status(cfg.run.dir) != "finished" and H.logged_steps(cfg.run.dir) == []
    with H.threads():
        finetune(cfg)  # the requeued job: the same run, started again
    assert H.starts(cfg.run.dir) == [0, 0]
    ok, detail = H.compare_to_reference(cfg.run.dir, reference)
    assert ok, detail
