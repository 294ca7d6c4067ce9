"""What rank 0 shows while a run trains: a tqdm bar on a terminal, plain log lines elsewhere.

A SLURM log is a file: a bar there is one endless line of carriage returns. Off a terminal each log step
is one line (step, losses, lr, images/s, ETA) and each evaluation one line with its accuracies.
"""
from __future__ import annotations

import datetime
import logging
import sys
from typing import Any, Mapping

log = logging.getLogger("advft.engine")


class Progress:
    """``run.progress`` on rank 0: the bar when stderr is a terminal, else a line per log step."""

    def __init__(self, label: str, keys: tuple[str, ...], steps: int, start: int, batch_size: int,
                 enabled: bool) -> None:
        self.label, self.keys, self.steps, self.batch_size = label, keys, steps, batch_size
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=steps, initial=start, desc=label, dynamic_ncols=True)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def logged(self, rec: Mapping[str, Any]) -> None:
        """A train record was written (``step``, ``lr``, ``img_per_s`` and the task's metrics)."""
        if self.bar is not None:
            self.bar.set_postfix({k: f"{rec[k]:.4g}" for k in self.keys if k in rec})
        elif self.enabled:
            step, rate = int(rec["step"]), float(rec["img_per_s"])
            left = (self.steps - step) * self.batch_size / rate if rate > 0 else float("nan")
            eta = str(datetime.timedelta(seconds=round(left))) if left == left else "?"
            losses = " ".join(f"{k} {rec[k]:.4g}" for k in self.keys if k in rec)
            log.info("%s step %d/%d | %s | lr %.3g | %.1f img/s | ETA %s", self.label, step, self.steps, losses,
                     rec["lr"], rate, eta)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def eval_line(label: str, step: int, kind: str, result: Mapping[str, Any]) -> str:
    """One line for one evaluation: its accuracies (the result's ``*_acc`` numbers) and its attack."""
    accs = " ".join(f"{k} {v:.2f}" for k, v in result.items() if k.endswith("acc") and isinstance(v, (int, float)))
    attack = f" ({result['attack']})" if "attack" in result else ""
    return f"{label} {kind} at step {step}{attack}: {accs}"
