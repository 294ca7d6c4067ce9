"""FFCV's ``DatasetWriter``, made to fail instead of hanging.

FFCV's writer forks worker processes and waits in a loop until they have written every sample; a
worker that fails (a full disk, an I/O error) leaves it waiting forever, and its shared memory and
workers outlive an interrupted parent. Here its loop runs in a thread while the main thread waits
for the outcome, so a worker's error or a signal (``processes.Interrupted``) reaches the main thread
at once; it then stops the workers and frees the shared memory, and the caller removes the file.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import queue
import sys
import threading
import time
from functools import partial
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

from data_prep.processes import worker_init
from data_prep.sources import PrepError

_DONE = "done"


class WriteError(PrepError):
    """Writing the output failed for a reason other than the file system's (reported as OSError)."""


def _describe(e: BaseException) -> tuple[int | None, str]:
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno, e.strerror or str(e)
    return None, f"{type(e).__name__}: {e}"


def _guarded_worker(errors: Any, stop: Any, *args: Any) -> None:
    """FFCV's worker function, reporting its error instead of dying with a traceback."""
    from ffcv.writer import worker_job_indexed_dataset

    worker_init()
    if stop.is_set():  # forked after the writer was stopped
        sys.exit(1)
    try:
        worker_job_indexed_dataset(*args)
    except BaseException as e:  # noqa: BLE001 - every failure must reach the main process
        errors.put(_describe(e))
        sys.exit(1)


def write_beton(tmp: Path, fields: dict[str, Any], dataset: Any, workers: int, chunksize: int) -> None:
    """Writes ``dataset`` (``ds[i]`` = one tuple of field values) to ``tmp`` over ``workers`` processes.

    Raises OSError (with the errno) or WriteError when a worker or the writer fails, and
    ``Interrupted`` on a signal; in every case the workers are gone and the shared memory freed.
    """
    from ffcv.utils import chunks
    from ffcv.writer import DatasetWriter

    ctx = mp.get_context()  # the context FFCV's writer creates its processes with
    errors, stop = ctx.Queue(), ctx.Event()
    writer = DatasetWriter(str(tmp), fields, num_workers=workers)
    todo = list(enumerate(range(len(dataset))))

    def run() -> None:
        try:
            # from_indexed_dataset's own call, with the guarded worker function.
            writer._write_common(len(todo), chunks(todo, chunksize), partial(_guarded_worker, errors, stop),
                                 (dataset,))
            errors.put(_DONE)
        except BaseException as e:  # noqa: BLE001 - reported to the main thread
            errors.put(_describe(e))

    thread = threading.Thread(target=run, name="ffcv-writer", daemon=True)
    thread.start()
    try:
        while True:
            try:
                outcome = errors.get(timeout=0.2)
            except queue.Empty:
                continue
            if outcome == _DONE:
                break
            code, text = outcome
            if code is not None:
                raise OSError(code, text, str(tmp))
            raise WriteError(f"FFCV's writer failed on {tmp}: {text}")
    except BaseException:
        _stop(writer, thread, stop)
        raise
    thread.join()


def _stop(writer: Any, thread: threading.Thread, stop: Any) -> None:
    """Kills the writer's workers (now and any it still starts) and frees its shared memory."""
    stop.set()
    # The shared memory is made at the start of the writer's thread; wait for it or the thread's end.
    deadline = time.monotonic() + 10
    while thread.is_alive() and not isinstance(getattr(writer, "metadata_sm", None), shared_memory.SharedMemory):
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    children = mp.active_children()
    for p in children:
        p.kill()
    for p in children:
        p.join(10)
    sm = getattr(writer, "metadata_sm", None)
    if isinstance(sm, shared_memory.SharedMemory):
        sm.close()
        with contextlib.suppress(FileNotFoundError):  # already freed by a writer that got that far
            sm.unlink()
