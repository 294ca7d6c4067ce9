#!/usr/bin/env python
"""Run ONE fine-tuning run: ``python launch/train.py jobs/demo.toml [--set key=value ...]``.

Works as a single process or under torchrun / ``accelerate launch`` / srun: the distributed setup is read
from the environment (on CPU, set ACCELERATE_USE_CPU=1 for several gloo ranks). The run lives in
``<run.root>/<run.name>/`` and resumes itself from there when started again; rerunning a finished run does
nothing. Exit codes: 0 done, 2 bad input (one line on stderr), 3 training failed (non-finite loss),
4 checkpoint or run folder write failed (disk full or read-only), 75 interrupted on request (checkpoint
written; rerun to resume).

Stop requests (for batch scripts that requeue themselves, see slurm/*.sbatch): with ``--stop-signals
TERM,USR1`` (or ADVFT_STOP_SIGNALS) those signals, and with ``--stop-file PATH`` (or ADVFT_STOP_FILE) the
appearance of that file, make the run checkpoint at the next log step (all ranks agree on it) and exit 75.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, like every other bad input (argparse adds the usage)
        print(f"error: {message} (see launch/train.py --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    p = _Parser(
        prog="launch/train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="keys: " + "the sections data, model, attack, loss, optim, eval, run (see advft/config.py); "
               "aliases: alpha = loss.alpha, lr = optim.lr. Example: --set alpha=0.1 --set optim.steps=200")
    p.add_argument("job", help="TOML job file, e.g. jobs/demo.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value (repeatable)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--stop-signals", default=os.environ.get("ADVFT_STOP_SIGNALS", ""), metavar="SIGS",
                   help="comma list (e.g. TERM,USR1): on these, checkpoint at the next log step and exit 75")
    p.add_argument("--stop-file", default=os.environ.get("ADVFT_STOP_FILE", ""), metavar="PATH",
                   help="when this file exists, checkpoint at the next log step and exit 75")
    args = p.parse_args(argv)

    from advft import config as C

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s r{rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = C.load(args.job, args.overrides)
        if args.print_config:
            print(C.to_toml(cfg), end="")
            return 0
        C.validate(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from launch.stopping import StopFlag, parse_signals

    try:
        signals = parse_signals(args.stop_signals)
    except ValueError as e:
        print(f"error: --stop-signals: {e}", file=sys.stderr)
        return 2
    should_stop = None
    if signals or args.stop_file:
        should_stop = StopFlag(args.stop_file or None)
        should_stop.install(signals)

    from advft.checkpoint import CheckpointError
    from advft.models import CheckpointFormatError
    from advft.train import Interrupted, NonFiniteLossError, finetune

    try:
        res = finetune(cfg, should_stop=should_stop)
    except (C.ConfigError, CheckpointFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise  # not a full or read-only disk: keep the traceback, it is a bug or a broken machine
        print(f"error: cannot write the run folder {cfg.run.dir}: {e.strerror}; the checkpoints already there "
              f"are intact, rerun when there is room", file=sys.stderr)
        return 4
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 75
    if rank == 0:
        i, f = res.get("initial") or {}, res.get("final") or {}
        print(f"run {cfg.run.dir}: clean {i.get('clean_acc', float('nan')):.1f} -> {f.get('clean_acc', float('nan')):.1f} %, "
              f"robust {i.get('robust_acc', float('nan')):.1f} -> {f.get('robust_acc', float('nan')):.1f} % "
              f"({f.get('attack', '?')}, eps {cfg.attack.eps:g}/255); results in {cfg.run.dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
