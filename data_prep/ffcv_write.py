"""FFCV's ``DatasetWriter``, made to fail instead of hanging.

FFCV's writer forks worker processes and waits in a loop until they have written every sample; a
worker that fails (a full disk, an I/O error) leaves it waiting forever, and its shared memory and
workers outlive an interrupted parent. Here each worker reports its error, a watcher thread turns the
report into an interrupt of the main thread (as a signal, ``processes.Interrupted``, does), and the
main thread then stops the workers and frees the shared memory; the caller removes the file.
"""

from __future__ import annotations

import _thread
import contextlib
import multiprocessing as mp
import queue
import sys
import threading
from functools import partial
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep.processes import Interrupted, worker_init
from data_prep.sources import PrepError

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
    errors, stop, finished = ctx.Queue(), ctx.Event(), threading.Event()
    writer = DatasetWriter(str(tmp), fields, num_workers=workers)
    todo = list(enumerate(range(len(dataset))))
    failure: list[tuple[int | None, str]] = []

    def watch() -> None:
        # FFCV's loop runs in the main thread (forking from another thread is unsafe with numba's TBB);
        # a worker's error interrupts it like a Ctrl-C would.
        while not finished.is_set():
            try:
                failure.append(errors.get(timeout=0.2))
            except queue.Empty:
                continue
            _thread.interrupt_main()
            return

    watcher = threading.Thread(target=watch, name="ffcv-writer-watch", daemon=True)
    watcher.start()
    try:
        # from_indexed_dataset's own call, with the guarded worker function.
        writer._write_common(len(todo), chunks(todo, chunksize), partial(_guarded_worker, errors, stop), (dataset,))
    except (Interrupted, KeyboardInterrupt):  # KeyboardInterrupt: called outside stop_on_signals
        _stop(writer, stop)
        if not failure:
            raise
        code, text = failure[0]
        if code is not None:
            raise OSError(code, text, str(tmp)) from None
        raise WriteError(f"FFCV's writer failed on {tmp}: {text}") from None
    except BaseException:
        _stop(writer, stop)
        raise
    finally:
        finished.set()


def _stop(writer: Any, stop: Any) -> None:
    """Kills the writer's workers, frees its shared memory and ends its progress bar's line."""
    stop.set()
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
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
