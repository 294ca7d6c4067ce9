#!/usr/bin/env python
"""``python -m data_prep`` with the FFCV writer held mid-write, for THIS process only: the fault suite's driver.

    python tests/faults/prep_inject.py --hold-at K --marker FILE -- ARGS
    python tests/faults/prep_inject.py --enospc -- ARGS

ARGS are ``python -m data_prep``'s own arguments. The FFCV writer's read of sample K (in one of its worker
processes), or under ``dali`` the shard writer's addition of the sample with key K, writes FILE and then
waits forever. Under ``ffcv``: the writer has started (its temporary ``.beton`` exists,
its workers and shared memory are live), and the test sends its signal at that moment, never after a sleep.
The name of the writer's shared memory goes to FILE.shm, so the test can check that it is freed.
With ``--enospc`` the writing fails instead as on a full disk, where no small file system can be mounted:
FFCV's first page write (in a worker) or, under ``dali``, the first sample added to a shard raises ENOSPC.
Each fault is armed by patching this process only (workers are forked from it), so data_prep carries no
test hooks.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _arm_enospc(command: str) -> None:
    def full(*_args, **_kwargs) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if command == "ffcv":
        from ffcv.memory_allocator import MemoryAllocator

        flush = MemoryAllocator.flush_page

        def flush_or_fail(self) -> None:
            if self.my_page >= 0:  # a page with data: the first write that needs room
                full()
            flush(self)

        MemoryAllocator.flush_page = flush_or_fail
    else:
        import data_prep.wds as W

        W.ShardWriter.add = full


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--hold-at", type=int, default=-1)
    p.add_argument("--marker", default="")
    p.add_argument("--enospc", action="store_true")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT))
    args = a.args[1:] if a.args[:1] == ["--"] else a.args

    def hold() -> None:
        Path(a.marker).write_text(f"{os.getpid()}\n")
        while True:
            time.sleep(3600)

    if a.enospc:
        _arm_enospc(args[0])
    elif args[:1] == ["ffcv"]:
        import data_prep.ffcv_prep as F
        from ffcv.writer import DatasetWriter

        read, prepare = F._WriterDataset.__getitem__, DatasetWriter.prepare

        def held(self, i: int):
            if i == a.hold_at:
                hold()
            return read(self, i)

        def prepare_and_tell(self) -> None:
            prepare(self)
            Path(a.marker + ".shm").write_text(self.metadata_sm.name + "\n")

        F._WriterDataset.__getitem__ = held
        DatasetWriter.prepare = prepare_and_tell
    else:
        import data_prep.wds as W

        add = W.ShardWriter.add

        def held_add(self, key: str, components: dict) -> None:
            if int(key) == a.hold_at:
                hold()
            add(self, key, components)

        W.ShardWriter.add = held_add
    from data_prep.__main__ import main as prep

    return prep(args)


if __name__ == "__main__":
    sys.exit(main())
