"""The one command-line path of an engine run (launch/train.py, launch/pretrain.py): the same arguments, stop
requests, error handling and exit codes for every task."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

EXIT_CODES = """Exit codes: 0 done, 2 bad input (one line on stderr), 3 training failed (non-finite loss),
4 checkpoint or run folder write failed (disk full or read-only), 75 interrupted on request (checkpoint
written; rerun to resume)."""
STOP_HELP = """Stop requests (for batch scripts that requeue themselves, see slurm/*.sbatch): with --stop-signals
TERM,USR1 (or ADVFT_STOP_SIGNALS) those signals, and with --stop-file PATH (or ADVFT_STOP_FILE) the appearance
of that file, make the run checkpoint at the next log step (all ranks agree on it) and exit 75."""


@dataclass(frozen=True)
class Command:
    """What differs between the engine's commands: the config they read and the task they run."""

    prog: str
    doc: str  # the description (--help)
    keys: str  # the --help epilog on config keys
    example_job: str
    # "module:function" names, imported only when used (--help needs no torch):
    load: str  # (job file, --set items) -> config
    validate: str  # (config, world_size=) -> config, or ConfigError
    run: str  # (config, should_stop=) -> result
    summary: Callable[[Any, Any], str]  # config, result -> the line printed at the end (rank 0)

    def call(self, which: str, *args: Any, **kwargs: Any) -> Any:
        import importlib

        module, name = getattr(self, which).split(":")
        return getattr(importlib.import_module(module), name)(*args, **kwargs)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, like every other bad input (argparse adds the usage)
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def main(cmd: Command, argv: list[str] | None = None) -> int:
    p = _Parser(prog=cmd.prog, description=f"{cmd.doc}\n\n{EXIT_CODES}\n\n{STOP_HELP}",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=cmd.keys)
    p.add_argument("job", help=f"TOML job file, e.g. {cmd.example_job}")
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
        cfg = cmd.call("load", args.job, args.overrides)
        if args.print_config:
            print(C.to_toml(cfg), end="")
            return 0
        cmd.call("validate", cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except C.ConfigError as e:
        return _fail(e, 2)
    from launch.stopping import StopFlag, parse_signals

    try:
        signals = parse_signals(args.stop_signals)
    except ValueError as e:
        return _fail(f"--stop-signals: {e}", 2)
    should_stop = None
    if signals or args.stop_file:
        should_stop = StopFlag(args.stop_file or None)
        should_stop.install(signals)

    from advft.checkpoint import CheckpointError
    from advft.data import DataError
    from advft.engine import Interrupted, NonFiniteLossError
    from advft.models import CheckpointFormatError

    try:
        result = cmd.call("run", cfg, should_stop=should_stop)
    except (C.ConfigError, CheckpointFormatError, DataError) as e:
        return _fail(e, 2)
    except NonFiniteLossError as e:
        return _fail(e, 3)
    except CheckpointError as e:
        return _fail(e, 4)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise  # not a full or read-only disk: keep the traceback, it is a bug or a broken machine
        return _fail(f"cannot write the run folder {cfg.run.dir}: {e.strerror}; the checkpoints already there "
                     f"are intact, rerun when there is room", 4)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 75
    if rank == 0:
        print(cmd.summary(cfg, result))
    return 0


def _fail(message: object, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code
