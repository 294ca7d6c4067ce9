"""Fixtures of the fault suite: one synthetic-data cache and one uninterrupted reference run per session."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

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
