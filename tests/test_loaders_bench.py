"""benchmarks/loaders.py: its pure parts, and smoke runs on a tiny generated tree.

The run with FFCV and DALI is marked; it skips without them, and fails instead when
ADVFT_REQUIRE_EXTRAS=1 (CI), as in tests/test_data_prep.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, require_extra
from PIL import Image

from advft.data import dali_loader, ffcv_loader
from benchmarks import loaders as bench

SCRIPT = ROOT / "benchmarks" / "loaders.py"




def test_interleaving_runs_every_loader_once_per_repeat_in_rotated_order() -> None:
    order = bench.interleaved(["a", "b", "c"], 3)
    assert order == [(0, "a"), (0, "b"), (0, "c"), (1, "b"), (1, "c"), (1, "a"), (2, "c"), (2, "a"), (2, "b")]


def test_the_steady_window_times_batches_inside_the_second_epoch() -> None:
    # 32 batches per epoch, 16 timed: past the first boundary (batch 32), centred in the rest of epoch 2.
    w = bench.timing_window(per_epoch=32, batches=16)
    assert w == {"warmup_batches": 40, "epoch_boundaries": 0}
    first, last = w["warmup_batches"], w["warmup_batches"] + 16 - 1
    assert first // 32 == last // 32 == 1 and first % 32 >= 1
    # The tightest fit: one batch of slack after the boundary, the window ends with the epoch.
    assert bench.timing_window(per_epoch=17, batches=16) == {"warmup_batches": 18, "epoch_boundaries": 0}


def test_the_epoch_start_window_and_given_warmups_count_the_boundaries_they_time() -> None:
    assert bench.timing_window(16, 16, window="epoch-start") == {"warmup_batches": 16, "epoch_boundaries": 1}
    assert bench.timing_window(16, 40, window="epoch-start") == {"warmup_batches": 16, "epoch_boundaries": 3}
    # A given warm-up wins over the window; its boundaries are counted all the same.
    assert bench.timing_window(5, 2, warmup_batches=1) == {"warmup_batches": 1, "epoch_boundaries": 0}
    assert bench.timing_window(5, 2, warmup_batches=4) == {"warmup_batches": 4, "epoch_boundaries": 1}


@pytest.mark.parametrize("per_epoch, batches, window, match", [
    (16, 16, "steady", "--batches 16 do not fit inside one epoch of 16 batches"),
    (1, 1, "steady", "do not fit"),
    (16, 4, "middle", "--window 'middle': valid are steady, epoch-start"),
])
def test_a_window_that_cannot_be_timed_is_refused(per_epoch: int, batches: int, window: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bench.timing_window(per_epoch, batches, window=window)


def test_the_command_refuses_a_steady_window_larger_than_an_epoch_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    assert bench.main(["--images", "1024", "--batch", "64", "--batches", "16", "--work", str(work)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --batches 16 do not fit inside one epoch of 16 batches") and "--images" in err
    assert not work.exists()  # nothing generated, nothing converted


def test_summary_takes_medians_and_ratios_within_a_repeat() -> None:
    runs = [{"repeat": r, "loader": name, "images_per_s": v, "images_per_cpu_s": v / 2, "warmup_s": 1.0}
            for r, speeds in enumerate([{"folder": 100, "fast": 250}, {"folder": 50, "fast": 150},
                                        {"folder": 80, "fast": 160}])
            for name, v in speeds.items()]
    runs.append({"repeat": 3, "loader": "fast", "error": "crashed"})
    s = bench.summarize(runs, ["folder", "fast"], baselines=("folder",))
    assert s["loaders"]["fast"]["n"] == 3
    assert s["loaders"]["fast"]["images_per_s"] == {"median": 160, "min": 150, "max": 250}
    assert s["loaders"]["folder"]["images_per_cpu_s"]["median"] == 40
    # Per-repeat ratios 2.5, 3, 2: the median pairs measurements of one repeat, not the two medians (2).
    assert s["ratios"]["vs_folder"]["fast"] == {"n": 3, "median": 2.5, "min": 2.0, "max": 3.0}
    assert s["cpu_ratios"]["vs_folder"]["fast"] == s["ratios"]["vs_folder"]["fast"]  # per-CPU speeds: v / 2
    assert "folder" not in s["ratios"]["vs_folder"]


def test_generated_tree_is_deterministic_and_imagenet_like(tmp_path: Path) -> None:
    a = bench.generate_tree(tmp_path / "a", images=6, classes=3, seed=5, workers=1)
    bench.generate_tree(tmp_path / "b", images=6, classes=3, seed=5, workers=1)
    files = sorted((tmp_path / "a" / "train").rglob("*.JPEG"))
    assert [f.relative_to(tmp_path / "a").as_posix() for f in files] == [
        f"train/class{i % 3:03d}/img{i:05d}.JPEG" for i in sorted(range(6), key=lambda i: (i % 3, i))]
    for f in files:
        assert f.read_bytes() == (tmp_path / "b" / f.relative_to(tmp_path / "a")).read_bytes()
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            short, long = sorted(im.size)
            assert 330 <= short <= 375 and 400 <= long <= 500
            pixels = np.asarray(im)
        assert pixels.std() > 20  # content, not a flat image
    assert not a["reused"] and bench.generate_tree(tmp_path / "a", 6, 3, 5, 1)["reused"]
    info = bench.describe_tree(tmp_path / "a" / "train")
    assert info["images"] == 6 and info["classes"] == 3 and 20_000 < info["mean_bytes"] < 200_000


def test_cpu_seconds_grow_with_work() -> None:
    before = bench.cpu_seconds()
    x = 0
    for i in range(3_000_000):
        x += i * i
    assert before is not None and bench.cpu_seconds() > before


def _run(tmp_path: Path, *extra: str) -> tuple[dict, str]:
    out = tmp_path / "loaders.json"
    argv = [sys.executable, str(SCRIPT), "--images", "40", "--classes", "3", "--batch", "8", "--batches", "2",
            "--warmup-batches", "1", "--workers", "1", "--resolution", "64", "--work", str(tmp_path / "work"),
            "--out", str(out), *extra]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out.read_text()), done.stdout


def _check_report(report: dict, loaders: list[str], repeats: int) -> None:
    assert [r["loader"] for r in report["runs"]] == [n for _, n in bench.interleaved(loaders, repeats)]
    for run in report["runs"]:
        assert run["images_per_s"] > 0 and run["images"] == 16 and run["warmup_s"] >= run["first_batch_s"] > 0
    assert sorted(report["loaders"]) == sorted(loaders)
    assert all(report["loaders"][n]["n"] == repeats for n in loaders)
    assert sorted(report["ratios"]["vs_folder"]) == sorted(set(loaders) - {"folder"})
    assert report["settings"]["warmup_batches"] == 1 and report["settings"]["transform"] == "rrc_flip"
    assert report["settings"]["window"] == "given" and report["settings"]["batches_per_epoch"] == 5
    assert report["settings"]["epoch_boundaries_timed"] == 0
    assert report["data"]["images"] == 40 and report["data"]["generated"]["settings"]["images"] == 40
    m = report["machine"]
    assert m["cpu_model"] and m["cpus_usable"] >= 1 and "torch" in m["versions"]
    assert "load average" in report["uptime_before"] and "load average" in report["uptime_after"]
    assert report["command"].startswith("python") or "loaders.py" in report["command"]


@pytest.mark.slow
def test_smoke_folder_loaders_interleaved(tmp_path: Path) -> None:
    # channels-last batches from both (measure() refuses a batch in another memory format)
    report, stdout = _run(tmp_path, "--loaders", "folder,torchvision", "--repeats", "2", "--channels-last")
    _check_report(report, ["folder", "torchvision"], repeats=2)
    assert report["settings"]["channels_last"] is True
    assert report["prep"] == {} and report["unavailable"] == {}
    assert "torchvision" in stdout and "x folder" in stdout
    assert "timed: batches 1..2 (5 per epoch), 0 epoch boundaries among them" in stdout


@pytest.mark.slow
@pytest.mark.ffcv
@pytest.mark.dali
def test_smoke_folder_ffcv_and_dali(tmp_path: Path) -> None:
    require_extra("ffcv")
    require_extra("dali")
    loaders = ["folder", "ffcv", "dali"]  # each FFCV measurement compiles its pipeline: keep them few
    report, _ = _run(tmp_path, "--loaders", ",".join(loaders), "--repeats", "1")
    _check_report(report, loaders, repeats=1)
    assert report["unavailable"] == {} and report["settings"]["channels_last"] is False
    assert report["prep"]["ffcv"]["stored"]["raw"] + report["prep"]["ffcv"]["stored"]["jpeg"] == 40
    assert report["prep"]["ffcv"]["settings"]["write_mode"] == "proportion"
    assert report["prep"]["dali"]["path"].endswith("train.txt")


@pytest.mark.slow
@pytest.mark.dali
def test_dali_ab_pairs_two_versions_of_the_loader(tmp_path: Path) -> None:
    require_extra("dali")
    _run(tmp_path, "--loaders", "dali", "--repeats", "1")  # writes the plan dali_ab.py reads
    out = tmp_path / "ab.json"
    module = str(ROOT / "advft" / "data" / "dali_loader.py")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dali_ab.py"), "--work", str(tmp_path / "work"),
                           "--a", module, "--b", module, "--repeats", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert [(r["repeat"], r["loader"]) for r in report["runs"]] == [(0, "a"), (0, "b"), (1, "b"), (1, "a")]
    assert all(r["images"] == 16 and r["images_per_cpu_s"] > 0 for r in report["runs"])
    assert report["ratios"]["vs_a"]["b"]["n"] == report["cpu_ratios"]["vs_a"]["b"]["n"] == 2
    assert "B / A images/s" in done.stdout
