#!/usr/bin/env python
"""Run ONE SimCLR pretraining: ``python launch/pretrain.py jobs/demo_pretrain.toml [--set key=value ...]``.

Makes a base encoder for fine-tuning: ``<run.root>/<run.name>/encoder.pt``, which a fine-tuning job names
as ``model.checkpoint``. Works as a single process or under torchrun / ``accelerate launch`` / srun (on CPU,
set ACCELERATE_USE_CPU=1 for several gloo ranks). The run resumes itself from its folder when started
again; rerunning a finished run does nothing. Exit codes: 0 done, 2 bad input (one line on stderr),
3 training failed (non-finite loss), 4 checkpoint write failed, 75 interrupted on request (checkpoint
written; rerun to resume).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="launch/pretrain.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="keys: the sections data, model, optim, simclr, eval, run (see advft/pretrain.py). "
               "Example: --set optim.steps=200 --set simclr.temperature=0.2")
    p.add_argument("job", help="TOML job file, e.g. jobs/demo_pretrain.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = p.parse_args(argv)

    from advft import config as C
    from advft import pretrain as P

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s r{rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = P.load_config(args.job, args.overrides)
        if args.print_config:
            print(C.to_toml(cfg), end="")
            return 0
        P.validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from advft.checkpoint import CheckpointError
    from advft.data import DataError
    from advft.models import CheckpointFormatError
    from advft.train import Interrupted, NonFiniteLossError

    try:
        path = P.pretrain(cfg)
    except (C.ConfigError, CheckpointFormatError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 75
    if rank == 0:
        res = json.loads((cfg.run.dir / "results.json").read_text())
        i, f = res.get("initial") or {}, res.get("final") or {}
        print(f"encoder {path} ({cfg.model.arch}, {cfg.model.stem} stem): linear-probe accuracy "
              f"{i.get('probe_acc', float('nan')):.1f} % at init -> {f.get('probe_acc', float('nan')):.1f} % "
              f"on {f.get('n_test', '?')} held-out images (chance {f.get('chance_acc', float('nan')):.0f} %); "
              f"results in {cfg.run.dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
