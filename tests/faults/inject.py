#!/usr/bin/env python
"""``launch/train.py`` with a fault armed for THIS process only: the fault suite's subprocess driver.

    python tests/faults/inject.py [--sweep] [--nan-at STEP [--nan-in TEXT]] [--hold-ckpt STEP:WINDOW]
                                  [--hold-train STEP] [--hold-final] [--enospc-ckpt STEP] -- ARGS

ARGS are launch/train.py's own arguments (with --sweep: launch/sweep.py's; use ``--cluster debug`` so the
runs execute in this process, where the fault is armed); its ``main`` runs unchanged, with one of these armed:

--nan-at STEP         a transient device fault: the loss of global step STEP (0-based) turns NaN before its
                      backward (:func:`nan_step`), and the run's config (and so its hash and folder) stays
                      the one the user gave. A rerun without the flag is the same run, as after a flaky GPU.
                      With --nan-in TEXT only runs whose run.name contains TEXT are hit (one run of a sweep).
--hold-ckpt S:WINDOW  the save of the checkpoint of step S stops inside its write window until the process is
                      killed: WINDOW ``tmp`` with the temporary data file complete and no checksum yet,
                      ``rename`` with the checksum renamed into place and the data file not yet.
--hold-train STEP     the run stops before it logs train step STEP (the step is computed) until killed.
--hold-final          the run stops before results.json says finished (the final evaluation is done) until
                      killed. A test SIGKILLs the process at a hold: the moment cannot pass before the kill,
                      however fast the machine; a hold nobody kills ends the process loudly after a deadline.
--enospc-ckpt STEP    the write of the checkpoint of STEP fails half-way with ENOSPC (a full disk where no
                      small filesystem can be mounted).

Each fault is armed by patching this process only, here, so the library carries no test hooks; the code
paths that meet the fault (the non-finite check, the atomic save, the error messages) are the real ones.
"""
from __future__ import annotations

import argparse
import errno
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[2]


# where each task computes its loss: the function whose result is poisoned (module, name, how)
_LOSSES: dict[str, tuple[str, str, Callable[[Any], Any]]] = {
    "FareTask": ("advft.fare.step", "training_loss", lambda out: {**out, "loss": out["loss"] * float("nan")}),
    "SimCLRTask": ("advft.simclr.task", "nt_xent_logits", lambda out: (out[0] * float("nan"), out[1])),
}


def nan_step(task_cls: type, at_step: int, when: Callable[[Any], bool] = lambda cfg: True) -> Callable[..., Any]:
    """``task_cls.step`` whose call for global step ``at_step`` (for configs where ``when(cfg)``) computes a NaN
    loss before its backward, so the weights see it too, as after a real device fault. Install it with
    ``monkeypatch.setattr(task_cls, "step", nan_step(task_cls, k))`` or by assignment in a child process."""
    import importlib

    step = task_cls.step
    module, name, poison = _LOSSES[task_cls.__name__]
    mod = importlib.import_module(module)

    def faulty(self: Any, x: Any, y: Any, s: int) -> Any:
        if s != at_step or not when(self.cfg):
            return step(self, x, y, s)
        loss = getattr(mod, name)
        setattr(mod, name, lambda *a, **kw: poison(loss(*a, **kw)))
        try:
            return step(self, x, y, s)
        finally:
            setattr(mod, name, loss)

    return faulty


def ckpt_name(step: int) -> str:
    return f"step_{step:08d}.pt"


HOLD_DEADLINE_S = 600.0


def wait_to_be_killed(where: str) -> None:
    """Stay here until a test kills this process; end it loudly if none does within the deadline."""
    deadline = time.monotonic() + HOLD_DEADLINE_S
    while time.monotonic() < deadline:
        time.sleep(0.05)
    print(f"inject.py: held {where} for {HOLD_DEADLINE_S:.0f} s and nobody killed the process", file=sys.stderr)
    os._exit(70)


def hold_checkpoint(step: int, window: str) -> None:
    import advft.checkpoint as K

    if window not in ("tmp", "rename"):
        raise SystemExit(f"--hold-ckpt {step}:{window}: the window is tmp or rename")
    name = ckpt_name(step)
    sha256 = K._sha256

    def held_sha256(path: Path) -> str:
        if window == "tmp" and path.name.startswith(f".{name}.") and path.name.endswith(".tmp"):
            wait_to_be_killed(f"in {name}'s write (temporary data file written and fsynced, no checksum yet)")
        return sha256(path)

    class HeldReplaceOs:
        """``os`` for advft.checkpoint only, holding right after the checksum's rename."""

        def __getattr__(self, attr: str) -> Any:
            return getattr(os, attr)

        @staticmethod
        def replace(src: Any, dst: Any) -> None:
            os.replace(src, dst)
            if window == "rename" and Path(dst).name == name + ".sha256":
                wait_to_be_killed(f"in {name}'s write (checksum in place, data file not renamed yet)")

    K._sha256 = held_sha256
    K.os = HeldReplaceOs()


def hold_train_record(step: int) -> None:
    from advft.engine.record import MetricsLog

    log = MetricsLog.log

    def held_log(self: Any, record: Any) -> None:
        if record.get("kind") == "train" and record.get("step") == step:
            wait_to_be_killed(f"before logging train step {step}")
        log(self, record)

    MetricsLog.log = held_log


def hold_final_results() -> None:
    from advft.engine import RunDir

    write_results = RunDir.write_results

    def held_write_results(self: Any, results: dict[str, Any]) -> None:
        if results.get("status") == "finished":
            wait_to_be_killed("after the final evaluation, before results.json says finished")
        write_results(self, results)

    RunDir.write_results = held_write_results


def enospc_checkpoint(step: int) -> None:
    import advft.checkpoint as K

    name = ckpt_name(step)

    class FullDiskFile:
        """A file that accepts 64 KiB, then fails every write as a full disk does."""

        def __init__(self, f: Any) -> None:
            self.f, self.room = f, 64 * 1024

        def write(self, data: Any) -> int:
            n = len(memoryview(data))
            if n > self.room:
                self.f.write(memoryview(data)[: self.room])
                self.room = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.room -= n
            return self.f.write(data)

        def __getattr__(self, attr: str) -> Any:
            return getattr(self.f, attr)

        def __enter__(self) -> "FullDiskFile":
            return self

        def __exit__(self, *exc: Any) -> None:
            self.f.close()

    def full_open(path: Any, mode: str = "r", *args: Any, **kw: Any) -> Any:
        f = open(path, mode, *args, **kw)
        return FullDiskFile(f) if Path(path).name.startswith(f".{name}.") and "w" in mode else f

    K.open = full_open  # module global shadows the builtin inside advft.checkpoint only


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tests/faults/inject.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--nan-at", type=int)
    p.add_argument("--nan-in", default="")
    p.add_argument("--hold-ckpt", metavar="STEP:WINDOW")
    p.add_argument("--hold-train", type=int, metavar="STEP")
    p.add_argument("--hold-final", action="store_true")
    p.add_argument("--enospc-ckpt", type=int)
    p.add_argument("train_args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    rest = a.train_args[1:] if a.train_args[:1] == ["--"] else a.train_args
    sys.path.insert(0, str(ROOT))
    if a.nan_at is not None:
        from advft.fare import FareTask

        FareTask.step = nan_step(FareTask, a.nan_at, lambda cfg: a.nan_in in cfg.run.name)
    if a.hold_ckpt:
        step, _, window = a.hold_ckpt.partition(":")
        hold_checkpoint(int(step), window)
    if a.hold_train is not None:
        hold_train_record(a.hold_train)
    if a.hold_final:
        hold_final_results()
    if a.enospc_ckpt is not None:
        enospc_checkpoint(a.enospc_ckpt)
    if a.sweep:
        from launch.sweep import main as sweep_main

        sys.argv = [str(ROOT / "launch" / "sweep.py"), *rest]
        return sweep_main(rest)
    from launch.train import main as train_main

    sys.argv = [str(ROOT / "launch" / "train.py"), *rest]
    return train_main(rest)


if __name__ == "__main__":
    sys.exit(main())
