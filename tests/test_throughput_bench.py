"""benchmarks/throughput.py runs end to end on a tiny encoder: the baseline comparison and the ablation of
the step's routes (FareSpec switches), each variant timed and reported. Speeds are not checked here."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "throughput.py"
TINY = ["--device", "cpu", "--arch", "tiny", "--stem", "cifar", "--res", "16", "--batch", "2", "--steps", "1",
        "--repeats", "2", "--warmup", "1", "--attack-steps", "2", "--compile", "off", "--precision", "fp32",
        "--threads", "1", "--no-flops"]


@pytest.mark.parametrize("mode, what, names", [
    (["--what", "step,attack"], ["step", "attack"], {"baseline", "advft"}),
    (["--ablate", "concat,input_grads"], ["step"], {"advft", "flip:concat", "flip:input_grads"}),
], ids=["vs-baseline", "ablate-routes"])
def test_the_benchmark_runs_and_reports_every_variant(tmp_path, mode, what, names) -> None:
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(SCRIPT), *TINY, *mode, "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert sorted(result["images_per_s"]) == sorted(what)
    for w in what:
        per = result["images_per_s"][w]
        assert set(per) == names
        assert all(s["n"] == 2 and math.isfinite(s["median"]) and s["median"] > 0 for s in per.values())
        ref = "baseline" if "baseline" in names else "advft"
        assert all(f"ratio_to_{ref}" in s for n, s in per.items() if n != ref)
