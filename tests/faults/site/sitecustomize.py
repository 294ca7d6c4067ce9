"""Run by every python started with this folder on PYTHONPATH: arms the hold of tests/faults/hold.py when
ADVFT_TEST_HOLD is set (only a test's child processes have it; without it this does nothing)."""
import os

if os.environ.get("ADVFT_TEST_HOLD"):
    import sys
    from pathlib import Path

    _tests = Path(__file__).resolve().parents[2]
    for _p in (str(_tests.parent), str(_tests)):  # the repository (launch.stopping) and tests/ (faults.hold)
        if _p not in sys.path:
            sys.path.append(_p)
    from faults import hold

    hold.arm()
