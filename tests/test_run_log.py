"""What a run shows on rank 0: a tqdm bar on a terminal; in a file (a SLURM log) a plain line per log step
(step, losses, lr, images/s, ETA) and a line per evaluation with its accuracies."""
from __future__ import annotations

import io
import logging
import re
import sys

from advft.engine.progress import Progress
from advft.fare import finetune


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_each_log_step_and_each_evaluation_is_one_plain_line(tiny_cfg, caplog, capsys):
    caplog.set_level(logging.INFO)
    cfg = tiny_cfg("run.progress=true")
    finetune(cfg)
    msgs = [r.getMessage() for r in caplog.records]
    steps = [m for m in msgs if re.fullmatch(r"finetune t step \d+/8 \| loss \S+ adv_loss \S+ \| lr \S+ \| "
                                            r"[\d.]+ img/s \| ETA (\d+:\d\d:\d\d|\?)", m)]
    assert [int(re.search(r"step (\d+)/", m).group(1)) for m in steps] == [2, 4, 6, 8]
    assert steps[-1].endswith("ETA 0:00:00")
    evals = [m for m in msgs if m.startswith("finetune t eval")]
    assert [re.search(r"at step (\d+)", m).group(1) for m in evals] == ["0", "0", "4", "8", "8"]
    assert all(re.search(r"\bclean_acc [\d.]+\b", m) and re.search(r"\brobust_acc [\d.]+\b", m) for m in evals)
    assert "eval_final at step 8 (apgd-ce5+apgd-t5x2)" in " ".join(evals)
    assert "\r" not in capsys.readouterr().err  # no bar in a file


def test_on_a_terminal_a_bar_and_no_step_lines(monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    shown = Progress("finetune t", ("loss",), steps=4, start=0, batch_size=16, enabled=True)
    for step in (1, 2):
        shown.update()
    shown.logged({"step": 2, "loss": 0.5, "lr": 1e-3, "img_per_s": 100.0})
    shown.close()
    assert "2/4" in term.getvalue() and "loss=0.5" in term.getvalue()
    assert not [r for r in caplog.records if "step 2/4" in r.getMessage()]


def test_progress_off_shows_nothing(monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    shown = Progress("finetune t", ("loss",), steps=4, start=0, batch_size=16, enabled=False)
    shown.update()
    shown.logged({"step": 2, "loss": 0.5, "lr": 1e-3, "img_per_s": 100.0})
    shown.close()
    assert term.getvalue() == "" and not caplog.records
