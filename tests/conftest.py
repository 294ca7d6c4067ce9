"""Shared fixtures: a tiny base encoder file and a fast job config rooted in a temp folder."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY_JOB = ROOT / "tests" / "assets" / "test_tiny.toml"  # the seconds-long job of the tests
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "disabled")
torch.set_num_threads(min(2, torch.get_num_threads()))


def require_or_skip(flag_env: str, available: bool, what: str) -> None:
    """Skip when an optional part is missing, unless CI demands it (then the missing part is a failure)."""
    if available:
        return
    if os.environ.get(flag_env) == "1":
        pytest.fail(f"{what} is required here ({flag_env}=1) but not available")
    pytest.skip(f"{what} not available")


def require_extra(what: str) -> None:
    """Skip without the optional loader package (ffcv | dali); with ADVFT_REQUIRE_EXTRAS=1 (CI) a missing
    package fails the test."""
    from advft.data import dali_loader, ffcv_loader

    ok = ffcv_loader.available() if what == "ffcv" else dali_loader.available()
    if ok:
        return
    if os.environ.get("ADVFT_REQUIRE_EXTRAS") == "1":
        pytest.fail(f"{what} is required here (ADVFT_REQUIRE_EXTRAS=1) but cannot be imported")
    pytest.skip(f"{what} is not installed (bash scripts/install_extras.sh)")


def wait_for(probe: Callable[[], Any], what: str, timeout_s: float = 240.0, poll_s: float = 0.3) -> Any:
    """Poll ``probe`` until it returns something truthy and return that; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture
def slurm(monkeypatch):
    """For sweeps on the local cluster (tests/slurm_util.py): SLURM_CONF set; the test appends its sweep
    folders to the yielded list, and every job (runs and pretrainings) they record is cancelled at the end."""
    from launch.sweeper.record import read_sweep
    from slurm_util import HOW, slurm_env

    env = slurm_env()
    require_or_skip("ADVFT_REQUIRE_SLURM", env is not None, HOW)
    monkeypatch.setenv("SLURM_CONF", env["SLURM_CONF"])
    sweeps: list[Path] = []
    yield sweeps
    for d in sweeps:
        rec = read_sweep(d)
        ids = {e["job_id"].split("_")[0] for part in ("runs", "pretraining")
               for e in rec.get(part, {}).values() if e.get("job_id")}
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


@pytest.fixture(scope="session")
def base_encoder(tmp_path_factory) -> Path:
    """A tiny CIFAR-stem encoder (random init, fixed seed) saved in advft's exported-encoder format."""
    from advft.models import build_encoder, encoder_state_dict

    torch.manual_seed(0)
    enc = build_encoder("tiny", "cifar")
    path = tmp_path_factory.mktemp("base") / "encoder.pt"
    torch.save({"format": "advft-encoder", "model": encoder_state_dict(enc), "arch": "tiny", "stem": "cifar",
                "normalize": "none"}, path)
    return path


@pytest.fixture
def tiny_cfg(tmp_path, base_encoder):
    """The tests' tiny job (TINY_JOB) with its run folder under tmp_path; extra --set items allowed."""
    from advft import config as C

    def make(*sets: str, name: str = "t"):
        return C.load(TINY_JOB,
                      [f"model.checkpoint={base_encoder}", f"run.root={tmp_path / 'runs'}",
                       f"run.name={name}", f"data.path={tmp_path / 'cache'}", *sets])

    return make


@pytest.fixture
def nan_at(monkeypatch):
    """``nan_at(TaskClass, k)``: the loss of global step k of that task turns NaN before its backward, in this
    test only (tests/faults/inject.py), as after a device fault; the library has no test hook."""
    from faults.inject import nan_step

    def arm(task_cls: type, step: int) -> None:
        monkeypatch.setattr(task_cls, "step", nan_step(task_cls, step))

    return arm


@pytest.fixture
def need_ffcv() -> None:
    """A test that needs FFCV: skipped without it, failed under ADVFT_REQUIRE_EXTRAS=1."""
    require_extra("ffcv")


@pytest.fixture
def need_dali() -> None:
    """A test that needs DALI: skipped without it, failed under ADVFT_REQUIRE_EXTRAS=1."""
    require_extra("dali")


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of thousands of tiny ops: one intra-op thread, so that a busy machine does not stall them at
    every thread barrier (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
