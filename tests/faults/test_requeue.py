"""The requeue signal at random steps (and twice in one run): the run checkpoints at that step boundary and
the resumed run ends bit-identical to an uninterrupted one, with no step computed twice or skipped.

Ten single stops and one double stop run in this process through ``finetune(should_stop=...)`` (the flag a
signal handler raises, polled at log steps); one trial sends a REAL SIGUSR1 to ``launch/train.py
--stop-signals USR1``, held at a log step until the signal has come (``hold.py``), and checks its exit
code 75.
"""
from __future__ import annotations

import collections
import random
import re

import pytest

from advft.engine import Interrupted
from advft.fare import FareTask, finetune
from faults import helpers as H
from faults.record import record

RNG = random.Random(H.SEED)
SINGLE = sorted(RNG.sample(range(1, H.STEPS), 10))  # steps 1..11: the last step goes on to the final save
TWICE = sorted(RNG.sample(range(1, H.STEPS), 2))
FAULT = "requeue signal"


def stop_at(step: int, start: int):
    """The flag a stop request raises, seen at the log step ``step`` (polled once per step from ``start``)."""
    polls = {"n": 0}

    def should_stop() -> bool:
        polls["n"] += 1
        return start + polls["n"] == step

    return should_stop


@pytest.fixture
def step_counter(monkeypatch) -> collections.Counter:
    """How often each global step's training step ran in this process."""
    counts: collections.Counter = collections.Counter()
    step = FareTask.step

    def counted(self, x, y, s):
        counts[s] += 1
        return step(self, x, y, s)

    monkeypatch.setattr(FareTask, "step", counted)
    return counts


@pytest.mark.parametrize("stops", [[s] for s in SINGLE] + [TWICE],
                         ids=[f"step{s}" for s in SINGLE] + ["twice-" + "-".join(map(str, TWICE))])
def test_requeue_at_a_step_resumes_bit_identical(stops, fault_run, reference, step_counter):
    cfg, _ = fault_run("rq-" + "-".join(map(str, stops)))
    stopped, saved, start = [], [], 0
    for s in stops:
        with pytest.raises(Interrupted) as e:
            finetune(cfg, should_stop=stop_at(s, start))
        start = e.value.step
        stopped.append(start)
        saved.append(H.newest_valid(cfg.run.dir))
    finetune(cfg)
    ok, detail = H.compare_to_reference(cfg.run.dir, reference)
    once = dict(step_counter) == {s: 1 for s in range(H.STEPS)}
    resumed = H.starts(cfg.run.dir)
    ok = ok and once and stopped == stops and saved == stops and resumed == [0, *stops]
    record(FAULT, "steps " + " and ".join(map(str, stops)) if len(stops) > 1 else f"step {stops[0]}",
           f"checkpointed at step {' and '.join(map(str, stopped))}, resumed there "
           f"(starts at steps {resumed}); each step trained exactly once", ok,
           f"{detail}; " + (f"each of steps 0-{H.STEPS - 1} trained exactly once (counted)" if once
                            else f"steps trained {sorted(step_counter.items())}"), how="in-process should_stop")
    assert stopped == stops and saved == stops, (stopped, saved)
    assert resumed == [0, *stops]
    assert once, f"steps computed {dict(step_counter)}"  # none recomputed, none skipped
    assert ok, detail


def test_real_sigusr1_to_launch_train_exits_75_and_the_rerun_is_bit_identical(fault_run, reference, tmp_path):
    after = random.Random(H.SEED + 1).randint(2, 6)
    cfg, sets = fault_run("rq-usr1")
    rc, err = H.usr1_when_held(sets, tmp_path / "log", poll=after)  # the run waits at its log step `after`
    m = re.search(r"interrupted: stopped at step (\d+) on request", err)
    stop = int(m.group(1)) if m else -1
    saved = H.newest_valid(cfg.run.dir)
    finetune(cfg)  # the requeued job: the same run, started again
    ok, detail = H.compare_to_reference(cfg.run.dir, reference)
    resumed = H.starts(cfg.run.dir)
    ok = ok and rc == 75 and stop == after and saved == stop and resumed == [0, stop]
    record(FAULT, f"real SIGUSR1 at step {after}",
           f"launch/train.py checkpointed at step {stop} and exited {rc}; rerun resumed at step {stop}", ok,
           detail, how="os.kill(pid, SIGUSR1) to launch/train.py --stop-signals USR1, held at that log step")
    assert rc == 75 and m, err[-2000:]
    assert stop == after and saved == stop and resumed == [0, stop]
    assert ok, detail
