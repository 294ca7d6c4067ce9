"""Command line: ``python -m data_prep {ffcv,dali} SRC OUT [options]`` (run from the repository root).

Examples
    python -m data_prep ffcv /data/imagenet /data/ffcv --split train --max-res 500 --compress-prob 0.5
    python -m data_prep ffcv /data/cifar10 /data/ffcv --split test --write-mode raw
    python -m data_prep dali /data/imagenet /data/dali --split train --shards 1024 --verify
    python -m data_prep dali /data/imagenet /data/dali --shards 1024 --shard-range 0:64   # one slice, after the list

Sources: symbolic links are followed (as torchvision's ImageFolder does), but each real folder and
file is read once, so a link loop cannot multiply the data; only regular files are opened (a FIFO,
socket or device named like an image is listed as skipped, with unreadable images). The training
loaders reading a folder (data.format=folder, DALI) apply the same rule: they read the files converted here.
An output is kept on a rerun only if it was made with the same settings from the source as it is now.

Exit status (every failure is one line on stderr, and leaves no temporary file, worker process or
shared memory behind):
    0    success, also when the output already existed (with --verify: and was read back again)
    2    a bad source, output or setting, or --verify found a mismatch (naming the path or value);
         an output folder that cannot be written is found before any work
    4    writing failed: the disk is full, read-only or failing; rerun when there is room
    130  stopped by SIGINT (Ctrl-C), 143 by SIGTERM; a rerun starts over (DALI: keeps finished shards)
After SIGKILL the workers die with the main process, and the next run removes its temporary files.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from data_prep.processes import Interrupted, stop_on_signals
from data_prep.sources import PrepError

# numba's default TBB threading layer (FFCV's writer) never exits when the process is bound to one CPU;
# OpenMP's does. Set before ffcv/numba are imported; a user's own choice wins.
os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")

_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG)


class _Parser(argparse.ArgumentParser):
    """argparse's errors in one line, like every other bad input (the subcommands' parsers are of this class too)."""

    def error(self, message: str) -> None:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m data_prep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(s: argparse.ArgumentParser) -> None:
        s.add_argument("src", help="ImageFolder tree (SRC/<split>/<class>/* or SRC/<class>/*) or CIFAR-10 root; "
                                   "links are followed, each real folder and file read once, and only regular "
                                   "files opened (others are listed as skipped)")
        s.add_argument("out", help="output folder")
        s.add_argument("--split", default="train", help="train / val / test")
        s.add_argument("--workers", type=int, default=0, help="processes (0 = one per CPU)")
        s.add_argument("--strict", action="store_true", help="fail on an unreadable image instead of skipping it")
        s.add_argument("--verify", action="store_true",
                       help="read the output back and check it against the source (also an existing output)")

    f = sub.add_parser("ffcv", help="write an FFCV .beton", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common(f)
    f.add_argument("--max-res", type=int, default=500, help="longest stored side; larger images shrink (0 = keep)")
    f.add_argument("--write-mode", default="proportion", choices=("raw", "jpg", "proportion", "smart"))
    f.add_argument("--compress-prob", type=float, default=0.5, help="share stored as JPEG in 'proportion' mode")
    f.add_argument("--jpeg-quality", type=int, default=90)
    f.add_argument("--smart-threshold", type=int, default=256 * 1024, help="raw bytes above which 'smart' stores JPEG")
    f.add_argument("--subset", type=int, default=0, help="keep N images: the first N of a seeded permutation (0 = all)")
    f.add_argument("--seed", type=int, default=0, help="seed of the --subset permutation")

    d = sub.add_parser("dali", help="write a DALI file list, class index and optional webdataset shards",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common(d)
    d.add_argument("--shards", type=int, default=0, help="number of webdataset tar shards (0 = file list only)")
    d.add_argument("--seed", type=int, default=0, help="seed of the sample order in the shards")
    d.add_argument("--shard-range", type=_shard_range, default=None, metavar="START:END",
                   help="write only shards START..END-1, from the file list already in OUT (for job arrays; "
                        "a final run without it writes the sidecar)")
    return p


def _shard_range(text: str) -> tuple[int, int]:
    start, sep, end = text.partition(":")
    if not sep or not start.isdigit() or not end.isdigit():
        raise argparse.ArgumentTypeError(f"expected START:END (two integers), got {text!r}")
    return int(start), int(end)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[data_prep] %(message)s", stream=sys.stderr)
    try:
        with stop_on_signals():
            _run(args)
    except PrepError as e:
        print(f"data_prep: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _WRITE_ERRORS:
            raise  # not a full, read-only or failing disk: keep the traceback, it is a bug
        where = f" {e.filename}" if e.filename else ""
        print(f"data_prep: error: cannot write{where}: {e.strerror}; nothing half-written is kept, "
              "rerun when there is room", file=sys.stderr)
        return 4
    except Interrupted as e:
        print(f"data_prep: stopped by {e}; temporary files removed, finished outputs kept", file=sys.stderr)
        return 128 + e.signum
    return 0


def _run(args: argparse.Namespace) -> None:
    """The command of ``args``; raises PrepError, OSError or Interrupted (see ``main``)."""
    if args.workers < 0:
        raise PrepError(f"--workers must be >= 0 (0 = one per CPU), got {args.workers}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise PrepError(f"output {args.out} exists and is not a folder; give a folder (created if missing)")
    if args.command == "ffcv":
        from data_prep.ffcv_prep import FFCVSettings, convert

        settings = FFCVSettings(split=args.split, max_res=args.max_res, compress_prob=args.compress_prob,
                                jpeg_quality=args.jpeg_quality, write_mode=args.write_mode,
                                smart_threshold=args.smart_threshold, subset=args.subset, seed=args.seed)
        print(convert(args.src, args.out, settings, workers=args.workers, strict=args.strict, verify=args.verify))
    else:
        from data_prep.dali_prep import DALISettings, prepare

        settings = DALISettings(split=args.split, shards=args.shards, seed=args.seed)
        paths = prepare(args.src, args.out, settings, workers=args.workers, strict=args.strict, verify=args.verify,
                        shard_range=args.shard_range)
        print(paths.shard_dir if args.shard_range else paths.file_list)


if __name__ == "__main__":
    sys.exit(main())
