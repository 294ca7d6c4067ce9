"""launch/sweep.py as a package: cli (arguments, the passes of a sweep), plan (configs, pretrainings,
decisions), record (sweep.json), submit (job array, pretraining jobs), watch (following jobs to their end).
A pretraining is a job the runs depend on: it is planned, decided, submitted and watched as they are."""
from launch.sweeper.cli import main, parse_args
from launch.sweeper.plan import Decision, Plan, build_plan
from launch.sweeper.submit import submit

__all__ = ["Decision", "Plan", "build_plan", "main", "parse_args", "submit"]
