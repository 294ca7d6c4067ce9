"""The run folder: one atomic write for every file, the readers, and the claim on a folder."""
from __future__ import annotations

import json

import pytest

from advft import config as C
from advft.engine import RunDir, atomic_write
from advft.engine.rundir import read_metrics


def test_atomic_write_replaces_whole_files_and_leaves_nothing_half_written(tmp_path):
    p = tmp_path / "results.json"
    atomic_write(p, "old\n")
    atomic_write(p, b"new\n")
    assert p.read_text() == "new\n"

    def dies_half_way(f) -> None:
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(p, dies_half_way, sync=True)
    assert p.read_text() == "new\n" and sorted(x.name for x in tmp_path.iterdir()) == ["results.json"]


def test_metrics_reader_skips_a_torn_last_line(tmp_path):
    run = RunDir(tmp_path)
    run.metrics.write_text(json.dumps({"step": 1}) + "\n" + '{"step": 2, "lo')
    assert run.read_metrics() == read_metrics(run.metrics) == [{"step": 1}]
    assert run.read_results() == {} and run.status() is None
    run.write_results({"status": "running"})
    assert run.status() == "running"


def test_a_folder_is_claimed_by_one_config(tmp_path):
    a, b = C.load(None, ["run.name=x"]), C.load(None, ["run.name=x", "alpha=1"])
    run = RunDir(tmp_path / "x")
    run.claim(a, C.load, C.to_toml(a), is_main=True)
    assert C.load(run.config) == a
    run.claim(a, C.load, C.to_toml(a), is_main=True)  # the same config again: a resume
    with pytest.raises(C.ConfigError, match="already holds a run with a different config"):
        run.claim(b, C.load, C.to_toml(b), is_main=True)
