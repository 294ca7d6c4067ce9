#!/usr/bin/env python
"""Run a grid of fine-tuning runs as ONE submitit job array: ``python launch/sweep.py --grid alpha=0,0.1,1``.

The code is the package launch/sweeper/ (``--help`` tells everything else)."""
from __future__ import annotations

import sys

from launch.sweeper import Decision, Plan, build_plan, main, parse_args, submit

__all__ = ["Decision", "Plan", "build_plan", "main", "parse_args", "submit"]

if __name__ == "__main__":
    sys.exit(main())
