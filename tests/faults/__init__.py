"""Fault-injection suite: requeue signals, SIGKILL (also inside checkpoint writes), damaged checkpoints, a
non-finite loss, a full disk, two sweeps at once. Every trial checks that nothing was lost (final weights and
optimizer state bit-identical to an uninterrupted run, every training step logged once) and appends a record
for RELIABILITY.md (see ``record.py`` and ``scripts/reliability_report.py``).
"""
