"""Split DALI conversion (``data_prep dali --shard-range``) and ``slurm/prep_imagenet.sbatch``.

The contract: writing the file list, then disjoint shard ranges in any order, then a final run,
gives the bytes of one ``data_prep dali --shards N`` run; the final run keeps complete shards and
rewrites damaged ones; shards are never kept for a file list they were not written from.

The SLURM tests submit the script to the local one-node cluster (`bash slurm/local-cluster.sh up`);
they skip without one, and fail instead when ADVFT_REQUIRE_SLURM=1. FFCV's job also needs FFCV
(ADVFT_REQUIRE_EXTRAS=1 makes its absence a failure). Only PIL and numpy are needed otherwise.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, require_or_skip
from slurm_util import HOW, slurm_env, wait_sacct
from PIL import Image

from data_prep.__main__ import main

SHARDS = 4
SCRIPT = ROOT / "slurm" / "prep_imagenet.sbatch"


def _make_tree(root: Path, extra: int = 0) -> Path:
    """``root/train/c{0,1,2}/*.JPEG``: 5 noise images per class (+ ``extra`` in c2), a grayscale one
    (re-encoded into the shards) and a broken one (skipped)."""
    rng = np.random.default_rng(0)
    for c in range(3):
        folder = root / "train" / f"c{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(5 + (extra if c == 2 else 0)):
            img = rng.integers(0, 256, (24 + k, 32 + c, 3), dtype=np.uint8)
            Image.fromarray(img).save(folder / f"img{k}.JPEG", quality=90)
    Image.fromarray(rng.integers(0, 256, (20, 30), dtype=np.uint8)).save(root / "train/c0/gray.JPEG", quality=90)
    (root / "train/c1/broken.JPEG").write_bytes(b"\xff\xd8\xff not a JPEG")
    return root


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return _make_tree(tmp_path / "src")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _shard_record(out: Path) -> dict:
    """The sidecar's record of the shards, without the counts of this particular run."""
    shards = dict(json.loads((out / "train.json").read_text())["shards"])
    return {k: v for k, v in shards.items() if k not in ("written", "kept")}


def _dali(tree: Path, out: Path, *extra: str) -> int:
    return main(["dali", str(tree), str(out), "--workers", "1", *extra])


@pytest.fixture
def one_run(tree: Path, tmp_path: Path) -> Path:
    """The reference: one conversion with all shards, seed 1."""
    out = tmp_path / "one"
    assert _dali(tree, out, "--shards", str(SHARDS), "--seed", "1") == 0
    return out


def test_list_then_ranges_then_final_run_equals_one_run(tree: Path, one_run: Path, tmp_path: Path, caplog) -> None:
    out = tmp_path / "split"
    assert _dali(tree, out) == 0  # the list
    for rng in ("1:4", "0:1"):  # any order
        assert _dali(tree, out, "--shards", str(SHARDS), "--seed", "1", "--shard-range", rng) == 0
    # The ranges write shards only: the sidecar still describes the list-only output.
    assert json.loads((out / "train.json").read_text())["shards"] is None
    assert _files(out / "train_shards") == _files(one_run / "train_shards")
    with caplog.at_level(logging.INFO, logger="data_prep"):
        assert _dali(tree, out, "--shards", str(SHARDS), "--seed", "1") == 0
    assert "reusing the image check" in caplog.text and "checking images" not in caplog.text
    meta = json.loads((out / "train.json").read_text())
    assert meta["complete"] and (meta["shards"]["written"], meta["shards"]["kept"]) == (0, SHARDS)
    assert _files(out / "train_shards") == _files(one_run / "train_shards")
    assert (out / "train.txt").read_bytes() == (one_run / "train.txt").read_bytes()
    assert _shard_record(out) == _shard_record(one_run)
    assert _shard_record(out)["reencoded"] == ["c0/gray.JPEG"]
    ref = json.loads((one_run / "train.json").read_text())
    for key in ("settings", "skipped", "not_rgb_jpeg", "counts_per_class", "files", "num_samples"):
        assert meta[key] == ref[key], key


def test_final_run_rewrites_damaged_and_foreign_shards(tree: Path, one_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "split"
    assert _dali(tree, out) == 0
    assert _dali(tree, out, "--shards", str(SHARDS), "--seed", "1", "--shard-range", f"0:{SHARDS}") == 0
    shard_dir = out / "train_shards"
    tar = shard_dir / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 3])  # a writer killed mid-file
    # The index of another seed's shard 2: same file name, other samples.
    other = tmp_path / "seed2"
    assert _dali(tree, other, "--shards", str(SHARDS), "--seed", "2") == 0
    shutil.copy(other / "train_shards/shard-000002.idx", shard_dir / "shard-000002.idx")
    (shard_dir / "shard-000009.tar").write_bytes(b"left over from a run with more shards")
    assert _dali(tree, out, "--shards", str(SHARDS), "--seed", "1") == 0
    shards = json.loads((out / "train.json").read_text())["shards"]
    assert (shards["written"], shards["kept"]) == (2, SHARDS - 2)
    assert _files(shard_dir) == _files(one_run / "train_shards")


def test_changed_source_is_checked_again_and_its_old_shards_are_not_kept(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _dali(tree, out, "--shards", str(SHARDS)) == 0
    _make_tree(tree, extra=2)  # two more images: the file list changes, and so what each key means
    assert _dali(tree, out, "--shards", str(SHARDS), "--shard-range", "0:1") == 2  # the list must be redone first
    assert _dali(tree, out) == 0  # checks the images again: the shards of the old list go
    assert not list((out / "train_shards").iterdir())
    assert _dali(tree, out, "--shards", str(SHARDS), "--shard-range", f"0:{SHARDS}") == 0
    assert _dali(tree, out, "--shards", str(SHARDS)) == 0
    assert json.loads((out / "train.json").read_text())["shards"]["kept"] == SHARDS
    ref = tmp_path / "ref"
    assert _dali(tree, ref, "--shards", str(SHARDS)) == 0
    assert _files(out / "train_shards") == _files(ref / "train_shards")


def test_shard_range_needs_the_list_and_valid_bounds(tree: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert _dali(tree, out, "--shards", str(SHARDS), "--shard-range", "0:2") == 2
    assert "write it first with `python -m data_prep dali" in capsys.readouterr().err
    assert not out.exists() or not any(out.rglob("*.tar"))
    assert _dali(tree, out) == 0
    for argv, message in [(("--shards", "4", "--shard-range", "2:2"), "0 <= START < END <= --shards 4"),
                          (("--shards", "4", "--shard-range", "0:5"), "0 <= START < END <= --shards 4"),
                          (("--shard-range", "0:1"), "needs --shards N"),
                          (("--shards", "4", "--shard-range", "0:1", "--verify"), "final run without --shard-range"),
                          (("--shards", "99", "--shard-range", "0:1"), "more than the 16 images")]:
        assert _dali(tree, out, *argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        _dali(tree, out, "--shards", "4", "--shard-range", "1-2")
    assert "expected START:END" in capsys.readouterr().err


def test_sbatch_script_passes_shellcheck() -> None:
    # scripts/test.sh installs shellcheck; a missing linter is a failure, not a silent skip
    assert shutil.which("shellcheck") is not None, "shellcheck is not installed (apt-get install shellcheck)"
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


# ---------------------------------------------------------------- the sbatch script on the local cluster


@pytest.fixture
def slurm() -> tuple[dict[str, str], list[str]]:
    """(environment for SLURM commands, list of submitted job ids) once the local cluster answers;
    whatever of those jobs is still queued at the end is cancelled."""
    env = slurm_env()
    require_or_skip("ADVFT_REQUIRE_SLURM", env is not None, HOW)
    submitted: list[str] = []
    yield env, submitted
    if submitted:
        subprocess.run(["scancel", *submitted], env=env, capture_output=True, timeout=30)


def _sbatch_wait(slurm: tuple[dict[str, str], list[str]], log: Path, settings: dict[str, str]) -> str:
    """Submits the script from the repository root, waits for it and returns its job id; fails with
    its log when it fails."""
    env, submitted = slurm
    exports = ",".join(["ALL", f"PYTHON={sys.executable}", *(f"{k}={v}" for k, v in settings.items())])
    argv = ["sbatch", "--parsable", "--wait", "--job-name=advft-prep-test", "-c", "1", "--time=10", "-o", str(log),
            f"--export={exports}", str(SCRIPT)]
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job_id = proc.stdout.readline().strip().split(";")[0]  # printed at submission, before the wait
    submitted.append(job_id)
    _, err = proc.communicate(timeout=600)
    text = log.read_text() if log.exists() else "(no log)"
    assert proc.returncode == 0, f"job {job_id}: {err}\n{text}"
    return job_id


@pytest.mark.slurm
@pytest.mark.slow
def test_dali_conversion_as_list_job_shard_array_and_finish_job(slurm, tree: Path, one_run: Path,
                                                                tmp_path: Path) -> None:
    env, submitted = slurm
    out, logs = tmp_path / "out", tmp_path / "logs"
    logs.mkdir()
    _sbatch_wait(slurm, logs / "list.out", {"SRC": str(tree), "OUT": str(out), "SHARDS": str(SHARDS), "TASKS": "3",
                                            "SEED": "1", "TASK_CPUS": "1", "TASK_TIME": "10"})
    driver = (logs / "list.out").read_text()
    found = re.search(r"shards job (\d+) \(3 tasks\), finish job (\d+)", driver)
    assert found, driver
    shards_job, finish_job = found.groups()
    submitted += [shards_job, finish_job]
    wait_sacct(env, finish_job, [f"{finish_job}|COMPLETED"], "JobID,State", timeout_s=480)
    # the array's tasks appear as separate records in the accounting some time after the array has run
    wait_sacct(env, shards_job, [f"{shards_job}_{i}|COMPLETED" for i in range(3)], "JobID,State", sort=True)
    # Task i of 3 wrote shards [4i/3, 4(i+1)/3): 0, 1, 2..3; logs sit next to the first job's.
    ranges = {i: (logs / f"slurm-advft-prep-test-shards-{shards_job}_{i}.out").read_text() for i in range(3)}
    for i, rng in enumerate(("0:1", "1:2", "2:4")):
        assert f"--shard-range {rng}" in ranges[i]
    finish_log = (logs / f"slurm-advft-prep-test-finish-{finish_job}.out").read_text()
    assert f"writing 0 shards to {out / 'train_shards'} ({SHARDS} of shards 0..{SHARDS - 1} already" in finish_log
    assert _files(out / "train_shards") == _files(one_run / "train_shards")
    meta = json.loads((out / "train.json").read_text())
    assert meta["complete"] and meta["settings"] == json.loads((one_run / "train.json").read_text())["settings"]


@pytest.mark.slurm
@pytest.mark.ffcv
@pytest.mark.slow
def test_ffcv_conversion_as_one_job(slurm, tree: Path, tmp_path: Path) -> None:
    from advft.data import ffcv_loader

    require_or_skip("ADVFT_REQUIRE_EXTRAS", ffcv_loader.available(), "FFCV (bash scripts/install_extras.sh)")
    out = tmp_path / "ffcv"
    log = tmp_path / "ffcv.out"
    _sbatch_wait(slurm, log, {"FORMAT": "ffcv", "SRC": str(tree), "OUT": str(out),
                                  "FFCV_ARGS": "--max-res 64 --write-mode raw", "VERIFY": "1"})
    beton = out / "train_64_0.50_90_raw.beton"
    meta = json.loads(beton.with_suffix(".json").read_text())
    assert meta["complete"] and meta["num_samples"] == 16 and meta["stored"] == {"raw": 16, "jpeg": 0}
    assert f"verified {beton}" in log.read_text()
