"""Fixtures of the fault suite: one synthetic-data cache and one uninterrupted reference run per session."""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from advft import config as C

from faults import helpers as H


@pytest.fixture(scope="session")
def fault_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fault-cache")  # the synthetic set is generated once per session


@pytest.fixture(scope="session")
def reference(tmp_path_factory, base_encoder, fault_cache) -> dict[str, Any]:
    """Final state and train records of the fault run, uninterrupted."""
    return H.run_reference(base_encoder, fault_cache, tmp_path_factory.mktemp("reference"))


@pytest.fixture
def fault_run(tmp_path, base_encoder, fault_cache) -> Callable[..., tuple[C.Config, list[str]]]:
    """``fault_run(name, *extra_sets)`` -> (config, --set items) of a fresh fault run under tmp_path/runs."""

    def make(name: str, *extra: str) -> tuple[C.Config, list[str]]:
        sets = H.fault_sets(base_encoder, fault_cache, tmp_path / "runs", name, *extra)
        return H.load_cfg(sets), sets

    return make


@pytest.fixture(autouse=True)
def one_thread():
    """Every trial runs with the thread count the reference ran with (see helpers.THREADS)."""
    with H.threads():
        yield


@pytest.fixture
def tmpfs(tmp_path) -> Iterator[Callable[[str], Path]]:
    """``tmpfs(size)`` mounts a tmpfs of that size (e.g. "6m") under tmp_path; all are unmounted afterwards.
    Mounting needs root: elsewhere the test is skipped (the simulated full-disk trials run everywhere)."""
    mounted = []

    def mount(size: str) -> Path:
        mnt = tmp_path / f"fs-{size}"
        mnt.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not root'}); the simulated trials run")
        mounted.append(mnt)
        return mnt

    try:
        yield mount
    finally:
        for mnt in mounted:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
