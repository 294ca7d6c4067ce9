"""The one training engine: the run loop, the run folder and the run's record, shared by every task.

A task (``advft.fare`` fine-tuning, ``advft.simclr`` pretraining) subclasses :class:`Task`; nothing here
imports a task.
"""
from __future__ import annotations

import importlib
from typing import Any

# names resolved on first use: the run folder's readers (advft.engine.rundir) need no torch, so the report can
# read runs on a machine without it
_WHERE = {"Interrupted": "errors", "NonFiniteLossError": "errors", "any_rank": "errors", "Task": "loop", "run": "loop",
          "RunDir": "rundir", "atomic_write": "rundir", "read_metrics": "rundir", "write_json": "rundir"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'advft.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"advft.engine.{_WHERE[name]}"), name)


__all__ = ["Interrupted", "NonFiniteLossError", "RunDir", "Task", "any_rank", "atomic_write", "read_metrics", "run",
           "write_json"]
