#!/usr/bin/env python
"""Run ONE fine-tuning run: ``python launch/train.py jobs/demo.toml [--set key=value ...]``.

Works as a single process or under torchrun / ``accelerate launch`` / srun: the distributed setup is read
from the environment (on CPU, set ACCELERATE_USE_CPU=1 for several gloo ranks). The run lives in
``<run.root>/<run.name>/`` and resumes itself from there when started again; rerunning a finished run does
nothing."""
from __future__ import annotations

import sys
from typing import Any

from launch.cli import Command, main as cli_main


def _summary(cfg: Any, res: dict[str, Any]) -> str:
    i, f, nan = res.get("initial") or {}, res.get("final") or {}, float("nan")
    return (f"run {cfg.run.dir}: clean {i.get('clean_acc', nan):.1f} -> {f.get('clean_acc', nan):.1f} %, "
            f"robust {i.get('robust_acc', nan):.1f} -> {f.get('robust_acc', nan):.1f} % "
            f"({f.get('attack', '?')}, eps {cfg.attack.eps:g}/255); results in {cfg.run.dir / 'results.json'}")


TRAIN = Command(
    prog="launch/train.py", doc=__doc__, example_job="jobs/demo.toml",
    keys="keys: the sections data, model, attack, loss, optim, eval, run (see advft/config.py); "
         "aliases: alpha = loss.alpha, beta = loss.beta, lr = optim.lr. "
         "Example: --set alpha=0.1 --set optim.steps=200",
    load="advft.config:load", validate="launch.base_encoder:validate", run="advft.fare:finetune", summary=_summary)


def main(argv: list[str] | None = None) -> int:
    return cli_main(TRAIN, argv)


if __name__ == "__main__":
    sys.exit(main())
