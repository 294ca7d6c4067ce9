#!/usr/bin/env python
"""Write a sweep's report: ``python launch/report.py runs/<sweep> [--out DIR] [--wandb]``.

Reads the sweep folder (sweep.json when present, and every run's config.toml, metrics.jsonl, results.json,
manifest.json), works offline, and writes ``REPORT.md`` plus PNG figures under ``figures/`` into the sweep
folder (or ``--out``); prints REPORT.md's path. Runs still going, failed, or planned but never started are
shown as such, so the report can be written at any time during a sweep.

``--wandb`` also publishes a wandb report with the same panels (needs the wandb-workspaces package and a
wandb login); when it cannot be published from here it says why in one line and the exit code stays 0,
since the local report was written. Exit codes: 0 written, 1 the wandb report failed to publish, 2 bad
input (one line on stderr; nothing written).
"""
from __future__ import annotations

import argparse
import sys

from advft import report as R


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, like every other bad input
        print(f"error: {message} (see launch/report.py --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="launch/report.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="the sweep folder, e.g. runs/demo")
    p.add_argument("--out", help="where REPORT.md and figures/ go (default: the sweep folder)")
    p.add_argument("--wandb", action="store_true", help="also publish a wandb report (online only)")
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # --help, or a bad flag (already reported on one line)
        return int(e.code or 0)
    try:
        path = R.write_report(args.sweep, args.out)
    except R.ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out not writable, a full disk: the path and the reason, not a traceback
        print(f"error: cannot write the report: {e.strerror or e} ({e.filename or args.out or args.sweep})",
              file=sys.stderr)
        return 2
    print(f"report: {path}")
    if not args.wandb:
        return 0
    why = R.wandb_unavailable()
    if why is not None:
        print(f"wandb report not published: {why}; to publish it: pip install wandb-workspaces, set "
              f"WANDB_API_KEY (and WANDB_PROJECT / WANDB_ENTITY if not the defaults), rerun with --wandb")
        return 0
    try:
        url = R.publish_wandb(R.load_sweep(args.sweep))
    except Exception as e:  # noqa: BLE001 - network, permissions, API changes: one line, the local report stands
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        print(f"error: the wandb report failed to publish: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1
    print(f"wandb report: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
