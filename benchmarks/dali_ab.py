"""Two versions of ``advft/data/dali_loader.py`` against each other, with the loader benchmark's protocol.

    mkdir -p bench_work && git show 577c91c:advft/data/dali_loader.py > bench_work/dali_loader_577c91c.py
    .venv/bin/python benchmarks/loaders.py --work bench_work --loaders folder,dali --repeats 1   # writes the plan
    .venv/bin/python benchmarks/dali_ab.py --work bench_work --a bench_work/dali_loader_577c91c.py \\
        --b advft/data/dali_loader.py --repeats 8 --out benchmarks/results/dali_resize_ab.json

Each measurement is ``loaders.measure("dali", plan)`` in a fresh process whose
``advft.data.dali_loader`` is the file given (``--a`` or ``--b``), on the plan (file list, batch,
warm-up, timed batches, threads) that ``loaders.py`` last wrote in ``--work``. Repeat r runs A and B,
in an order that alternates with r. The ratios (B / A in images/s and in images per CPU second) are
medians of the per-repeat pairs, with their range, as in ``loaders.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loaders  # noqa: E402 - the benchmark next to this file (it also puts the repository root on sys.path)


def _measure_with(module_file: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """``loaders.measure("dali", plan)`` with ``advft.data.dali_loader`` loaded from ``module_file``."""
    spec = importlib.util.spec_from_file_location("advft.data.dali_loader", module_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules["advft.data.dali_loader"] = module
    spec.loader.exec_module(module)
    return loaders.measure("dali", plan)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="the --work folder of a loaders.py run that included dali")
    p.add_argument("--a", required=True, help="a version of dali_loader.py (the reference)")
    p.add_argument("--b", required=True, help="another version of dali_loader.py")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--timeout", type=float, default=600, help="seconds one measurement may take")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement, in a child process
    args = p.parse_args(argv)
    plan_path = Path(args.work) / "plan.json"
    if args.measure:
        result = _measure_with(Path(args.measure), json.loads(plan_path.read_text()))
        print(loaders.RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    if not plan_path.is_file() or "dali" not in json.loads(plan_path.read_text())["inputs"]:
        print(f"error: no plan with dali in {plan_path}; run benchmarks/loaders.py --work {args.work} "
              "--loaders folder,dali first", file=sys.stderr)
        return 2
    files = {"a": Path(args.a).resolve(), "b": Path(args.b).resolve()}
    runs: list[dict[str, Any]] = []
    started, uptime_before = time.strftime("%Y-%m-%dT%H:%M:%S%z"), loaders._run_text("uptime")
    for repeat in range(args.repeats):
        for name in ("a", "b") if repeat % 2 == 0 else ("b", "a"):
            load = os.getloadavg()
            argv_child = [sys.executable, str(Path(__file__).resolve()), "--work", args.work, "--a", args.a,
                          "--b", args.b, "--measure", str(files[name])]
            try:
                done = subprocess.run(argv_child, capture_output=True, text=True, timeout=args.timeout)
                lines = [s for s in done.stdout.splitlines() if s.startswith(loaders.RESULT_PREFIX)]
                result = (json.loads(lines[-1][len(loaders.RESULT_PREFIX):]) if done.returncode == 0 and lines
                          else {"error": f"exit {done.returncode}: {done.stderr.strip()[-2000:]}"})
            except subprocess.TimeoutExpired:
                result = {"error": f"no result within {args.timeout:.0f} s"}
            runs.append({"repeat": repeat, "loader": name, "load_before": [round(v, 2) for v in load], **result})
            shown = f"{result['images_per_s']:.1f} images/s" if "images_per_s" in result else result["error"][-300:]
            print(f"repeat {repeat} {name} {shown}  (load {load[0]:.2f})", file=sys.stderr)
    summary = loaders.summarize(runs, ["a", "b"], baselines=("a",))
    for key in ("ratios", "cpu_ratios"):
        r = summary[key].get("vs_a", {}).get("b")
        if r:
            print(f"B / A {'images/s' if key == 'ratios' else 'images/CPU-s'}: {r['median']:.2f} "
                  f"[{r['min']:.2f}, {r['max']:.2f}], n = {r['n']}")
    for name, e in summary["loaders"].items():
        s, c = e["images_per_s"], e.get("images_per_cpu_s", {})
        print(f"{name} ({files[name]}): images/s {s['median']:.1f} [{s['min']:.1f}, {s['max']:.1f}], "
              f"images/CPU-s {c.get('median', float('nan')):.1f} [{c.get('min', float('nan')):.1f}, "
              f"{c.get('max', float('nan')):.1f}]")
    if args.out:
        report = {"benchmark": "dali_ab", "command": " ".join([Path(sys.executable).name, *sys.argv]),
                  "started": started, "uptime_before": uptime_before, "uptime_after": loaders._run_text("uptime"),
                  "machine": loaders.machine(), "files": {k: str(v) for k, v in files.items()},
                  "plan": json.loads(plan_path.read_text()), **summary, "runs": runs}
        loaders.write_json(Path(args.out), report)
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
