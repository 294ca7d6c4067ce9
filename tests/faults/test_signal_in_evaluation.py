"""A REAL SIGUSR1 to ``launch/train.py`` inside the step-0 evaluation: the run abandons the evaluation and
exits 75 (requeue) without a checkpoint to write; the rerun evaluates again and ends bit-identical to an
uninterrupted run (issue 13 item 4). The run waits at its second evaluation poll (after the first chunk of
the evaluation) until the signal has come (``hold.py``), so the signal lands inside it on any machine.
"""
from __future__ import annotations

import re

from advft.fare import finetune
from faults import helpers as H


def test_real_sigusr1_inside_the_initial_evaluation_exits_75_and_the_rerun_is_bit_identical(fault_run, reference,
                                                                                             tmp_path):
    cfg, sets = fault_run("usr1-eval")
    rc, err = H.usr1_when_held(sets, tmp_path / "log", at="eval", poll=2)
    assert rc == 75 and re.search(r"interrupted: stopped at step 0 on request", err), err[-2000:]
    assert H.status(cfg.run.dir) != "finished" and H.logged_steps(cfg.run.dir) == []
    with H.threads():
        finetune(cfg)  # the requeued job: the same run, started again
    assert H.starts(cfg.run.dir) == [0, 0]
    ok, detail = H.compare_to_reference(cfg.run.dir, reference)
    assert ok, detail
