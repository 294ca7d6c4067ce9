"""A stop request during an evaluation (step 0, mid-run, final) abandons it; the rerun repeats it and ends
finished with the uninterrupted run's weights and numbers (issue 13 item 4).

The moment is made to happen: the flag is raised by the evaluation itself once it has begun at the chosen
step, so the stop lands inside it on any machine.
"""
from __future__ import annotations

import json

import pytest
import torch

from advft import checkpoint as ckpt
from advft.engine import Interrupted
from advft.engine.stop import StopPoll
from advft.fare import FareTask, finetune


class Flag:
    """A stop flag polled anywhere (as launch.stopping.StopFlag), raised by the test."""

    anywhere = True

    def __init__(self) -> None:
        self.raised = False

    def __call__(self) -> bool:
        return self.raised


def _evals(run_dir) -> list[tuple[int, str]]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["kind"]) for r in recs if r["kind"].startswith("eval")]


@pytest.mark.parametrize("at", [0, 4, 8], ids=["initial", "mid-run", "final"])
def test_stop_inside_an_evaluation_is_repeated_after_the_requeue(at, tiny_cfg, monkeypatch):
    ref_cfg = tiny_cfg(name="ref")
    ref = finetune(ref_cfg)
    cfg = tiny_cfg(name="cut")
    flag, seen = Flag(), []
    evaluate = FareTask.evaluate

    def raise_flag_inside(self, step, final, check):
        def check_then_raise():
            seen.append(step)
            check()  # the first poll of the evaluation at `at` passes, the flag goes up, the next one stops it
            if step == at:
                flag.raised = True
        return evaluate(self, step, final, check_then_raise)

    monkeypatch.setattr(FareTask, "evaluate", raise_flag_inside)
    with pytest.raises(Interrupted) as e:
        finetune(cfg, should_stop=flag)
    assert e.value.step == at and seen.count(at) >= 2  # stopped inside the evaluation, not before it
    results = json.loads((cfg.run.dir / "results.json").read_text()) if (cfg.run.dir / "results.json").exists() else {}
    assert results.get("status") != "finished"
    assert all(s < at for s, _ in _evals(cfg.run.dir))  # nothing of the abandoned evaluation was logged
    monkeypatch.setattr(FareTask, "evaluate", evaluate)
    res = finetune(cfg)
    assert res["status"] == "finished"
    assert _evals(cfg.run.dir) == _evals(ref_cfg.run.dir)  # every evaluation once, in order
    for k in ("initial", "final"):
        assert res[k] == ref[k], k
    a, b = ckpt.load_latest(ref_cfg.run.dir)[1]["model"], ckpt.load_latest(cfg.run.dir)[1]["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_stop_before_the_run_starts_is_honoured_at_start_up(tiny_cfg):
    cfg = tiny_cfg(name="early")
    flag = Flag()
    flag.raised = True
    with pytest.raises(Interrupted) as e:
        finetune(cfg, should_stop=flag)
    assert e.value.step == 0 and ckpt.load_latest(cfg.run.dir) is None
    assert _evals(cfg.run.dir) == []  # not even the step-0 evaluation ran


def test_a_counting_callable_is_polled_at_log_steps_only():
    calls = []
    poll = StopPoll(lambda: calls.append(1) or False, torch.device("cpu"))
    assert not poll("start") and not poll("eval") and calls == []
    assert not poll("step") and calls == [1]
    with pytest.raises(ValueError, match="stop poll site"):
        poll("elsewhere")
