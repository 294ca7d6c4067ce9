"""benchmarks/gpu_check.sh: parses, answers --help, refuses bad options, enforces its time limits, and on a
machine without CUDA runs its CPU-safe parts (--smoke) and reports every GPU part as skipped."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import wait_for

from benchmarks import gpu_check as G

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
ENV = {**os.environ, "PYTHON": sys.executable}
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a machine without CUDA reports")


def _check(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _numbers(obj, path: str = ""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def test_the_script_parses_and_explains_itself() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    if shutil.which("shellcheck"):  # CI installs it (scripts/test.sh)
        lint = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout
    done = _check("--help", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "8 minutes" in done.stdout and "skipped: no CUDA device" in done.stdout
    for option in ("--smoke", "--peak-tflops", "--total", "--budget-cuda-tests", "--budget-step", "--budget-loaders"):
        assert option in done.stdout
    assert sum(G.BUDGETS.values()) <= G.TOTAL_S == 480


@pytest.mark.parametrize("args, named", [
    (["--peak-tflops", "-3"], "--peak-tflops"), (["--parts", "step,warp"], "--parts"),
    (["--budget-step", "0"], "--budget-step"), (["--total", "soon"], "--total"),
])
def test_bad_options_get_one_line_and_exit_2(tmp_path: Path, args: list[str], named: str) -> None:
    done = _check(*args, "--out", str(tmp_path / "r.json"), timeout=120)
    assert done.returncode == 2 and named in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r.json").exists()


def test_every_file_with_gpu_tests_is_run() -> None:
    marked = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py")
              if re.search(r"mark\.gpu\b|pytest\.mark\.gpu", p.read_text())}
    assert "tests/test_gpu.py" in marked and marked <= set(G.GPU_TEST_FILES)


def test_peak_table_picks_the_most_specific_name() -> None:
    assert G.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert G.peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert G.peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert G.peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert G.peak_tflops("NVIDIA A10", "bf16") == 125.0 and G.peak_tflops("NVIDIA L40S", "bf16") == 362.0
    assert G.peak_tflops("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 tensor cores
    assert G.peak_tflops("Some Future GPU", "bf16") is None


def test_a_part_past_its_limit_is_killed_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    # the child starts a grandchild and then waits forever: only the limit ends it
    code = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '100000']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(100000)")
    r = G.run_limited([sys.executable, "-c", code], limit_s=3)
    assert r["rc"] is None and "started" in r["output_tail"]
    pid = int(pid_file.read_text())
    wait_for(lambda: not _alive(pid), "the grandchild to end", timeout_s=60)  # it may still be in its exit


def _alive(pid: int) -> bool:
    """Running, not a zombie (a killed orphan stays one until whoever adopted it reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_a_spent_total_budget_skips_the_remaining_parts(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    done = _check("--total", "4", "--out", str(out), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert {p: r["status"] for p, r in report["parts"].items()} == {p: "skipped: total budget spent"
                                                                   for p in G.PARTS}


@no_cuda
def test_without_cuda_the_gpu_parts_say_so(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    done = _check("--parts", "step,loaders", "--out", str(out), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["env"]["cuda_available"] is False and report["ok"] is True
    assert {p: r["status"] for p, r in report["parts"].items()} == {"step": G.NO_CUDA, "loaders": G.NO_CUDA}


@pytest.mark.slow
@no_cuda
def test_cpu_smoke_run_writes_the_json_schema(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    # generous limits: this checks what the JSON says, not how fast a shared CI machine is (limits: above)
    budgets = {"cuda_tests": 600, "step": 1200, "loaders": 600}
    limits = [f"--budget-{p.replace('_', '-')}={s}" for p, s in budgets.items()]
    done = _check("--smoke", "--peak-tflops", "0.5", "--total", "2400", *limits, "--out", str(out), timeout=2600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert {"check", "schema", "command", "started", "finished", "seconds", "smoke", "total_budget_s", "env",
            "parts", "ok"} <= set(report)
    assert report["ok"] is True and report["smoke"] is True and list(report["parts"]) == list(G.PARTS)
    for path, value in _numbers(report):
        assert math.isfinite(value), path
    assert report["seconds"] <= report["total_budget_s"]
    for part, r in report["parts"].items():
        assert r["seconds"] <= r["budget_s"] <= budgets[part]

    tests = report["parts"]["cuda_tests"]  # collected, and every one skipped for want of CUDA
    assert tests["status"] == G.NO_CUDA
    assert tests["passed"] == tests["failed"] == 0 and tests["skipped"] >= 4
    assert any("test_gpu.py" in t or "test_gpu::" in t for t in tests["tests"])
    assert all(v.startswith("skipped") for v in tests["tests"].values())

    step = report["parts"]["step"]
    assert step["status"] == "ok" and step["gpu_run"] == G.NO_CUDA and step["device"] == "cpu"
    assert list(step["variants"]) == ["eager", "compiled"]
    for name, v in step["variants"].items():
        assert v["status"] == "ok" and v["compile"] is (name == "compiled")
        assert v["images_per_s"]["n"] == 2 and v["images_per_s"]["median"] > 0
        assert v["flops_per_step"] > 0 and v["achieved_tflops"] > 0
        assert v["peak_tflops"] == 0.5 and v["peak_source"] == "--peak-tflops"
        assert v["mfu"] == pytest.approx(v["achieved_tflops"] / 0.5)
        assert 0 < v["fraction_of_measured_matmul"]

    loaders = report["parts"]["loaders"]
    assert loaders["status"] == "ok" and loaders["gpu_run"] == G.NO_CUDA
    assert loaders["images_per_s"]["folder"] > 0
