"""The one training engine: the run loop, the run folder and the run's record, shared by every task.

A task (``advft.fare`` fine-tuning, ``advft.simclr`` pretraining) subclasses :class:`Task`; nothing here
imports a task.
"""
from advft.engine.errors import Interrupted, NonFiniteLossError, any_rank
from advft.engine.loop import Task, run
from advft.engine.rundir import RunDir, atomic_write, read_metrics, write_json

__all__ = ["Interrupted", "NonFiniteLossError", "RunDir", "Task", "any_rank", "atomic_write", "read_metrics", "run",
           "write_json"]
