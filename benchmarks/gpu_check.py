#!/usr/bin/env python
"""One check of a GPU machine, in at most 8 minutes, written as JSON: the CUDA tests, the FARE step's
throughput with its achieved TFLOP/s and MFU, and the data loaders' images/s.

    bash benchmarks/gpu_check.sh                          # writes gpu_check.json
    bash benchmarks/gpu_check.sh --peak-tflops 989 --out r.json   # a GPU the peak table does not know
    bash benchmarks/gpu_check.sh --smoke --out s.json     # tiny sizes; on a CPU-only machine what runs there

Parts, each a child process under its own time limit (``--budget-<part>``; the total, ``--total`` = 480 s,
caps them: a part gets at most what is left of it). A part that overruns is killed with its children and
recorded as ``timeout after N s``; the JSON is rewritten after every part, so what finished survives.

- ``cuda_tests``: ``pytest -m gpu`` on the files holding GPU tests (``GPU_TEST_FILES``): the compiled bf16
  FARE step equals eager, no host synchronisation inside the attack, DALI's ``mixed`` loader.
- ``step``: ``benchmarks/throughput.py`` on advft's FARE step alone (ResNet-50, 224 px, batch 256, precision
  ``auto`` = bf16 on a GPU that has it), eager with a third of the budget, then compiled with the rest (a
  slow compilation still leaves numbers): images/s, matmul+conv FLOPs of one step (torch's
  FlopCounterMode formulas, ``benchmarks/common.count_flops``), achieved TFLOP/s, and MFU = achieved /
  the GPU's dense peak for that precision (``PEAK_TFLOPS`` by ``torch.cuda.get_device_name``, or
  ``--peak-tflops``). The FLOPs are the whole step's: attack, FARE loss, backward.
- ``loaders``: ``benchmarks/loaders.py --device cuda``, one short round of folder, torchvision, FFCV and DALI
  (those installed; DALI decodes on the GPU), channels-last.

Without a CUDA device every part says ``skipped: no CUDA device`` (the CUDA tests still run, to show that
they are collected and skip). ``--smoke`` runs the step and loader parts on tiny sizes on whatever device
is there, which is what CI does on CPUs (tests/test_gpu_check.py). Exit status: 0 when no part failed or
timed out (skipped parts are fine), else 1.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = "skipped: no CUDA device"
PARTS = ("cuda_tests", "step", "loaders")
BUDGETS = {"cuda_tests": 120, "step": 240, "loaders": 120}  # seconds; they add up to the 480 s total
TOTAL_S = 480
GPU_TEST_FILES = ("tests/test_gpu.py", "tests/test_attacks.py")

# Dense (no sparsity) tensor-core peak in TFLOP/s by precision, from the vendors' data sheets; the first
# name contained in torch.cuda.get_device_name wins, so the more specific names come first.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("GH200", {"bf16": 989.0, "fp32": 67.0}),
    ("H200", {"bf16": 989.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp32": 67.0}),
    ("B200", {"bf16": 2250.0, "fp32": 80.0}),
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp32": 91.6}),
    ("L4", {"bf16": 121.0, "fp32": 30.3}),
    ("A10", {"bf16": 125.0, "fp32": 31.2}),
    ("RTX 4090", {"bf16": 165.2, "fp32": 82.6}),
    ("V100", {"fp32": 15.7}),
)


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The table's dense peak for this GPU and precision, or None when the GPU (or precision) is not in it."""
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peaks.get(precision)
    return None


def run_limited(cmd: list[str], limit_s: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` in its own process group; past ``limit_s`` kill the whole group (loader workers and
    compile workers included). Returns rc (None on timeout), seconds and the tail of its output."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(1.0, limit_s))
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                out, _ = proc.communicate(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                out = ""
        rc = None
    return {"rc": rc, "seconds": round(time.monotonic() - t0, 1), "output_tail": (out or "")[-3000:]}


def junit_counts(path: Path) -> dict[str, Any]:
    """pytest's JUnit XML: counts and each test's outcome."""
    tests: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '?')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            tests[name] = "failed"
        elif case.find("skipped") is not None:
            tests[name] = "skipped: " + (case.find("skipped").get("message") or "")
        else:
            tests[name] = "passed"
    count = {k: sum(v.split(":")[0] == k for v in tests.values()) for k in ("passed", "failed", "skipped")}
    return {**count, "tests": tests}


def part_cuda_tests(limit_s: float, cuda: bool, work: Path) -> dict[str, Any]:
    junit = work / "gpu_tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", *GPU_TEST_FILES,
           f"--junitxml={junit}"]
    r = run_limited(cmd, limit_s)
    out: dict[str, Any] = {"command": " ".join(cmd[1:]), "seconds": r["seconds"]}
    if r["rc"] is None:
        return {**out, "status": f"timeout after {limit_s:.0f} s", "output_tail": r["output_tail"]}
    if not junit.is_file():
        return {**out, "status": f"failed: pytest exit {r['rc']}, no report", "output_tail": r["output_tail"]}
    out.update(junit_counts(junit))
    if out["failed"] or r["rc"] not in (0, 5):  # 5: nothing collected, judged below
        return {**out, "status": f"failed: pytest exit {r['rc']}", "output_tail": r["output_tail"]}
    if out["passed"] + out["skipped"] == 0:
        return {**out, "status": "failed: no GPU test collected"}
    if not cuda:
        return {**out, "status": NO_CUDA}
    return {**out, "status": "ok" if out["skipped"] == 0 else f"ok, {out['skipped']} skipped"}


def _measure_step(limit_s: float, device: str, smoke: bool, compile_: bool, peak_override: float | None,
                  res: Path) -> dict[str, Any]:
    """One run of throughput.py on advft's FARE step alone, read back as images/s, FLOPs, TFLOP/s and MFU."""
    size = (["--arch", "tiny", "--stem", "cifar", "--res", "16", "--batch", "2", "--repeats", "2", "--warmup", "1"]
            if smoke else
            ["--arch", "resnet50", "--stem", "imagenet", "--res", "224", "--batch", "256", "--repeats", "3",
             "--warmup", "2"])
    threads = ["--threads", "1"] if device == "cpu" else []
    cmd = [sys.executable, "benchmarks/throughput.py", "--device", device, *size, *threads, "--steps", "1",
           "--compile", "on" if compile_ else "off",
           "--ablate=", "--out", str(res)]  # --ablate with no switch: advft's step alone, no baseline
    r = run_limited(cmd, limit_s)
    out: dict[str, Any] = {"command": " ".join(cmd[1:-2]), "seconds": r["seconds"]}
    if r["rc"] is None:
        return {**out, "status": f"timeout after {limit_s:.0f} s", "output_tail": r["output_tail"]}
    if r["rc"] != 0 or not res.is_file():
        return {**out, "status": f"failed: exit {r['rc']}", "output_tail": r["output_tail"]}
    t = json.loads(res.read_text())
    rate = t["images_per_s"]["step"]["advft"]
    batch, precision = t["args"]["batch"], t["advft_config"]["precision"]
    flop_img = t["flops_per_image"]["advft_step"]
    achieved = flop_img * rate["median"] / 1e12  # per wall-clock second, as a GPU's peak is
    name = t["env"].get("gpu", t["env"]["cpu"])
    peak, source = (peak_override, "--peak-tflops") if peak_override else (peak_tflops(name, precision), "table")
    measured = t["matmul_peak"]["flop_per_s"] / 1e12
    out.update({
        "status": "ok", "device_name": name, "precision": precision, "compile": t["advft_config"]["compile"],
        "arch": t["args"]["arch"], "resolution": t["args"]["res"], "batch": batch,
        "images_per_s": {k: rate[k] for k in ("n", "median", "min", "max")},
        "flops_per_step": flop_img * batch, "achieved_tflops": achieved,
        "peak_tflops": peak, "peak_source": source if peak else f"unknown for {name!r} in {precision}: pass "
                                                                  "--peak-tflops",
        "mfu": achieved / peak if peak else None,
        "measured_matmul_tflops": measured, "fraction_of_measured_matmul": achieved / measured,
    })
    return out


def part_step(limit_s: float, device: str, smoke: bool, peak_override: float | None, work: Path) -> dict[str, Any]:
    """Eager first, with a third of the limit (numbers even if compiling is slow), then compiled with the rest."""
    t0 = time.monotonic()
    eager = _measure_step(limit_s / 3, device, smoke, False, peak_override, work / "step_eager.json")
    left = limit_s - (time.monotonic() - t0)
    compiled = (_measure_step(left, device, smoke, True, peak_override, work / "step_compiled.json") if left >= 5
                else {"status": "skipped: the step's budget spent"})
    variants = {"eager": eager, "compiled": compiled}
    bad = [f"{k}: {v['status']}" for k, v in variants.items() if not v["status"].startswith("ok")]
    return {"status": "; ".join(bad) if bad else "ok", "device": device, "seconds": round(time.monotonic() - t0, 1),
            "variants": variants}


def part_loaders(limit_s: float, device: str, smoke: bool, work: Path) -> dict[str, Any]:
    res = work / "loaders.json"
    size = (["--loaders", "folder", "--images", "40", "--classes", "3", "--batch", "8", "--batches", "2",
             "--warmup-batches", "1", "--workers", "1", "--resolution", "64"] if smoke else
            ["--loaders", "folder,torchvision,ffcv,dali", "--images", "512", "--batch", "64", "--batches", "4",
             "--channels-last",
             "--workers", str(max(1, min(8, (os.cpu_count() or 2) // 2)))])
    cmd = [sys.executable, "benchmarks/loaders.py", "--device", device, *size, "--repeats", "1",
           "--timeout", str(int(max(10, limit_s / 2))), "--work", str(work / "loaders_work"), "--out", str(res)]
    r = run_limited(cmd, limit_s)
    out: dict[str, Any] = {"command": " ".join(cmd[1:-4]), "device": device, "seconds": r["seconds"]}
    if r["rc"] is None:
        return {**out, "status": f"timeout after {limit_s:.0f} s", "output_tail": r["output_tail"]}
    if not res.is_file():
        return {**out, "status": f"failed: exit {r['rc']}", "output_tail": r["output_tail"]}
    rep = json.loads(res.read_text())
    out["images_per_s"] = {n: e["images_per_s"]["median"] for n, e in rep["loaders"].items()
                           if "images_per_s" in e}
    out["unavailable"] = rep.get("unavailable", {})
    failed = [run["loader"] for run in rep["runs"] if "error" in run]
    out["status"] = "ok" if r["rc"] == 0 and not failed else f"failed: exit {r['rc']}, errors in {failed}"
    if failed:
        out["output_tail"] = r["output_tail"]
    return out


def environment(cuda: bool) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
                           "cuda_available": cuda, "cpu_cores": os.cpu_count()}
    if cuda:
        env.update(gpu=torch.cuda.get_device_name(0), gpu_count=torch.cuda.device_count(), cuda=torch.version.cuda,
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    return env


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    """Whole JSON or the previous one: the file may be read while the next part runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False))
    os.replace(tmp, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON (default gpu_check.json)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes; the step and loaders run on a CPU too")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of: {', '.join(PARTS)}")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense peak in the step's precision, TFLOP/s "
                                                     "(default: the table in benchmarks/gpu_check.py)")
    p.add_argument("--total", type=float, default=TOTAL_S, help=f"seconds for all parts (default {TOTAL_S})")
    for part, s in BUDGETS.items():
        p.add_argument(f"--budget-{part.replace('_', '-')}", type=float, default=s, dest=f"budget_{part}",
                       help=f"seconds for {part} (default {s})")
    a = p.parse_args(argv)
    a.parts = [x for x in a.parts.split(",") if x]
    if not a.parts or not set(a.parts) <= set(PARTS):
        p.error(f"--parts takes a comma list of: {', '.join(PARTS)}; got {','.join(a.parts) or 'nothing'}")
    if a.peak_tflops is not None and not (math.isfinite(a.peak_tflops) and a.peak_tflops > 0):
        p.error(f"--peak-tflops must be a positive number of TFLOP/s, got {a.peak_tflops}")
    for name in ("total", *(f"budget_{x}" for x in PARTS)):
        if not getattr(a, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be positive seconds, got {getattr(a, name)}")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    t0 = time.monotonic()
    report: dict[str, Any] = {
        "check": "gpu_check", "schema": 1, "command": " ".join(["benchmarks/gpu_check.sh", *(argv or sys.argv[1:])]),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "smoke": a.smoke,
        "total_budget_s": a.total, "env": environment(cuda), "parts": {},
    }
    with tempfile.TemporaryDirectory(prefix="advft-gpu-check-") as tmp:
        work = Path(tmp)
        for part in PARTS:
            if part not in a.parts:
                continue
            left = a.total - (time.monotonic() - t0)
            limit = min(getattr(a, f"budget_{part}"), left)
            if limit < 5:
                res: dict[str, Any] = {"status": "skipped: total budget spent"}
            elif part == "cuda_tests":
                res = part_cuda_tests(limit, cuda, work)
            elif not cuda and not a.smoke:
                res = {"status": NO_CUDA}
            elif part == "step":
                res = part_step(limit, device, a.smoke, a.peak_tflops, work)
            else:
                res = part_loaders(limit, device, a.smoke, work)
            if not cuda and part != "cuda_tests" and res["status"] != NO_CUDA:
                res["gpu_run"] = NO_CUDA  # what ran was the CPU smoke run
            res["budget_s"] = round(limit, 1)
            report["parts"][part] = res
            report["seconds"] = round(time.monotonic() - t0, 1)
            write_atomic(a.out, report)
            print(f"gpu_check {part}: {res['status']} ({res.get('seconds', 0)} s of {limit:.0f})", flush=True)
    bad = [p for p, r in report["parts"].items() if "failed" in r["status"] or "timeout" in r["status"]]
    report["ok"] = not bad
    report["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    report["seconds"] = round(time.monotonic() - t0, 1)
    write_atomic(a.out, report)
    print(f"gpu_check: wrote {a.out} in {report['seconds']:.0f} s; " + (f"failed: {bad}" if bad else "no failures"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
