#!/usr/bin/env python
"""Run ONE SimCLR pretraining: ``python launch/pretrain.py jobs/demo_pretrain.toml [--set key=value ...]``.

Makes a base encoder for fine-tuning: ``<run.root>/<run.name>/encoder.pt``, which a fine-tuning job names
as ``model.checkpoint``. Works as a single process or under torchrun / ``accelerate launch`` / srun (on CPU,
set ACCELERATE_USE_CPU=1 for several gloo ranks). The run resumes itself from its folder when started
again; rerunning a finished run does nothing."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from launch.cli import Command, main as cli_main


def _summary(cfg: Any, path: Path) -> str:
    from advft.engine import RunDir

    res = RunDir(cfg.run.dir).read_results()
    i, f, nan = res.get("initial") or {}, res.get("final") or {}, float("nan")
    return (f"encoder {path} ({cfg.model.arch}, {cfg.model.stem} stem): linear-probe accuracy "
            f"{i.get('probe_acc', nan):.1f} % at init -> {f.get('probe_acc', nan):.1f} % "
            f"on {f.get('n_test', '?')} held-out images (chance {f.get('chance_acc', nan):.0f} %); "
            f"results in {cfg.run.dir / 'results.json'}")


PRETRAIN = Command(
    prog="launch/pretrain.py", doc=__doc__, example_job="jobs/demo_pretrain.toml",
    keys="keys: the sections data, model, optim, simclr, eval, run (see advft/simclr/config.py). "
         "Example: --set optim.steps=200 --set simclr.temperature=0.2",
    load="advft.simclr.config:load_config", validate="advft.simclr.config:validate", run="advft.simclr:pretrain",
    summary=_summary)


def main(argv: list[str] | None = None) -> int:
    return cli_main(PRETRAIN, argv)


if __name__ == "__main__":
    sys.exit(main())
