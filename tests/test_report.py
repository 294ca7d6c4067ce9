"""Sweep reports from fake run folders: statuses, means and 95 % intervals over seeds, REPORT.md (its claims
follow the intervals), PNGs, the CLI, wandb.

The fake sweep: alpha in {0, 0.1, 1} x lr in {1e-4, 1e-3}; (0, 1e-4) has two finished seeds, (1, 1e-4) is
still running, (0, 1e-3) failed, (1, 1e-3) was planned in sweep.json but never started (missing).
"""
from __future__ import annotations

import importlib.machinery
import json
import math
import statistics
import struct
import subprocess
import sys
import types
from pathlib import Path

import pytest

from advft import report as R

ROOT = Path(__file__).resolve().parent.parent
STEPS = 40
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# name -> (alpha, lr, seed, status, final clean, final robust)
RUNS = {
    "alpha=0,lr=0.0001,seed=0-aaaa0000": (0.0, 1e-4, 0, "finished", 70.0, 20.0),
    "alpha=0,lr=0.0001,seed=1-aaaa0001": (0.0, 1e-4, 1, "finished", 74.0, 30.0),
    "alpha=0.1,lr=0.0001,seed=0-bbbb0000": (0.1, 1e-4, 0, "finished", 80.0, 15.0),
    "alpha=1,lr=0.0001,seed=0-cccc0000": (1.0, 1e-4, 0, "running", None, None),
    "alpha=0,lr=0.001,seed=0-dddd0000": (0.0, 1e-3, 0, "failed", None, None),
    "alpha=0.1,lr=0.001,seed=0-eeee0000": (0.1, 1e-3, 0, "finished", 60.0, 35.0),
}
MISSING = "alpha=1,lr=0.001,seed=0-ffff0000"
INITIAL = {"clean_acc": 85.0, "robust_acc": 2.0, "n_test": 200, "attack": "apgd-ce100+apgd-t100x9", "eps": 8.0}


def _config_toml(alpha: float, lr: float, seed: int, name: str, root: Path) -> str:
    return (f'[loss]\nalpha = {alpha!r}\nreduction = "sum"\n\n[optim]\nlr = {lr!r}\nsteps = {STEPS}\n'
            f'warmup_steps = 4\n\n[attack]\neps = 8.0\nsteps = 10\n\n'
            f'[run]\nname = "{name}"\nroot = "{root}"\nseed = {seed}\nwandb = "disabled"\n')


def _metrics(alpha: float, seed: int, status: str, final_clean: float | None,
             final_robust: float | None) -> list[dict]:
    last = {"finished": STEPS, "running": 20, "failed": 10}[status]
    recs: list[dict] = [{"step": 0, "kind": "eval", "clean_acc": 86.0, "robust_acc": 5.0, "n_test": 200,
                         "attack": "apgd-ce10", "eps": 8.0},
                        {"step": 0, "kind": "eval_final", **INITIAL}]
    for s in range(10, last + 1, 10):
        rec = {"step": s, "kind": "train", "loss": 4.0 / s, "adv_loss": 3.0 / s, "adv_cos": 0.9, "clean_cos": 0.95,
               "lr": 1e-4, "img_per_s": 100.0}
        if alpha > 0:
            rec["clean_loss"] = 1.0 / s
        recs.append(rec)
        if s % 20 == 0:
            recs.append({"step": s, "kind": "eval", "clean_acc": 80.0 - s / 10 + seed, "robust_acc": 5.0 + s / 2,
                         "probe_train_acc": 90.0, "n_test": 200, "attack": "apgd-ce10", "eps": 8.0})
    if status == "finished":
        recs.append({"step": STEPS, "kind": "eval_final", **INITIAL, "clean_acc": final_clean,
                     "robust_acc": final_robust})
    return recs


def make_run(sweep_dir: Path, name: str, alpha: float, lr: float, seed: int, status: str,
             final_clean: float | None, final_robust: float | None) -> Path:
    d = sweep_dir / name
    d.mkdir(parents=True)
    (d / "config.toml").write_text(_config_toml(alpha, lr, seed, name, sweep_dir))
    recs = _metrics(alpha, seed, status, final_clean, final_robust)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 99, "kind": "tr')
    results: dict = {"status": status, "initial": INITIAL}
    if status == "finished":
        results.update({"final": {**INITIAL, "clean_acc": final_clean, "robust_acc": final_robust},
                        "steps": STEPS, "alpha": alpha, "lr": lr})
    if status == "failed":
        results.update({"error": "non-finite loss at step 12; stopped without saving", "failed_step": 12})
    (d / "results.json").write_text(json.dumps(results))
    (d / "manifest.json").write_text(json.dumps({"starts": [
        {"time": "2026-01-02T03:04:05+0000", "git_commit": COMMIT, "git_dirty": False, "gpu": [],
         "cpu_count": 2, "torch": "2.x", "host": "testhost"}]}))
    return d


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    d = tmp_path / "runs" / "demo"
    for name, (alpha, lr, seed, status, fc, fr) in RUNS.items():
        make_run(d, name, alpha, lr, seed, status, fc, fr)
    planned = {name: {"dir": f"/elsewhere/{name}", "grid": {"loss.alpha": str(a), "optim.lr": str(lr),
                                                            "run.seed": str(seed)}}
               for name, (a, lr, seed, *_rest) in RUNS.items()}
    planned[MISSING] = {"dir": f"/elsewhere/{MISSING}", "grid": {"loss.alpha": "1", "optim.lr": "1e-3",
                                                                 "run.seed": "0"}}
    (d / "sweep.json").write_text(json.dumps({
        "name": "demo", "job": str(tmp_path / "no_such_job.toml"), "set": {},
        "command": ["python", "launch/sweep.py", "--grid", "alpha=0,0.1,1", "--grid", "lr=1e-4,1e-3"],
        "grid": {"loss.alpha": ["0", "0.1", "1"], "optim.lr": ["1e-4", "1e-3"]},
        "cluster": {"kind": "local", "profile": "local", "parameters": {"nodes": 1, "gpus_per_node": 0}},
        "submissions": [{"time": "2026-01-02T03:00:00+00:00", "cluster": "local", "job_ids": ["1"]}],
        "runs": planned}))
    (d / ".submitit").mkdir()  # the executor's folder is not a run
    return d


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    assert data[-8:-4] == b"IEND", f"{path} is truncated"
    return struct.unpack(">II", data[16:24])


# ---------------------------------------------------------------------------------------------- loading

def test_load_sweep_statuses_and_missing_run(sweep_dir: Path) -> None:
    sweep = R.load_sweep(sweep_dir)
    status = {r.name: r.status for r in sweep.runs}
    assert status == {**{n: v[3] for n, v in RUNS.items()}, MISSING: "missing"}
    missing = next(r for r in sweep.runs if r.name == MISSING)
    # its grid point comes from sweep.json (the job file is not on this machine)
    assert (missing.alpha, missing.lr, missing.seed) == (1.0, 1e-3, 0)
    running = next(r for r in sweep.runs if r.status == "running")
    assert running.last_step == 20 and running.steps == STEPS and running.final == {}
    # the torn last line of metrics.jsonl is ignored; eval and train records are separated and ordered
    assert [r["step"] for r in running.evals] == [0, 20]
    assert all(r.setting == "" for r in sweep.runs)  # only alpha, lr and seed vary
    assert sweep.name == "demo"


def test_aggregate_mean_and_interval_over_seeds(sweep_dir: Path) -> None:
    points = {(p.alpha, p.lr): p for p in R.aggregate(R.load_sweep(sweep_dir).runs)}
    assert len(points) == 6
    two = points[(0.0, 1e-4)]
    clean = two.final("clean_acc")
    assert clean.n == 2 and clean.mean == pytest.approx(72.0) and clean.method == "t"
    assert clean.std == pytest.approx(statistics.stdev([70.0, 74.0]))
    half = R.t975(1) * statistics.stdev([70.0, 74.0]) / math.sqrt(2)
    assert (clean.lo, clean.hi) == pytest.approx((72.0 - half, 72.0 + half))
    assert clean.text() == "72.0 [46.6, 97.4] (2 seeds)"
    assert two.final("robust_acc").text() == "25.0 [0.0, 88.5] (2 seeds)"  # clipped at 0
    # two seeds that agree exactly are still n_test images each: never narrower than one run's Wilson interval
    assert (two.initial("clean_acc").lo, two.initial("clean_acc").hi) == pytest.approx(R.wilson(85.0, 200))
    single = points[(0.1, 1e-4)].final("clean_acc")
    assert single.std is None and single.method == "wilson" and single.text() == "80.0 [73.9, 85.0] (n=200)"
    assert points[(1.0, 1e-4)].final("clean_acc") is None  # running: no final value is invented
    assert points[(1.0, 1e-4)].initial("clean_acc").mean == 85.0
    assert points[(0.0, 1e-3)].status_text() == "failed"
    assert points[(1.0, 1e-3)].status_text() == "missing"


def test_stat_and_curve() -> None:
    assert R.stat([]) is None
    assert R.stat([float("nan")]) is None
    s = R.stat([1.0, 2.0, 4.0])
    assert s.mean == pytest.approx(7 / 3) and s.std == pytest.approx(statistics.stdev([1.0, 2.0, 4.0]))

    def run(evals: list[dict]) -> R.Run:
        return R.Run("r", Path("."), "finished", 0.0, 1e-4, 0, "", 10, 10, (), tuple(evals), {}, {}, "", {}, {})

    steps, mean, std = R.curve([run([{"step": 0, "clean_acc": 50.0}, {"step": 10, "clean_acc": 60.0}]),
                                run([{"step": 0, "clean_acc": 54.0}])], "eval", "clean_acc")
    assert steps == [0, 10] and mean == [52.0, 60.0]
    assert std[0] == pytest.approx(math.sqrt(8)) and std[1] is None


def test_other_varying_settings_are_not_averaged(tmp_path: Path) -> None:
    d = tmp_path / "sw"
    a = make_run(d, "a", 0.1, 1e-4, 0, "finished", 70.0, 20.0)
    b = make_run(d, "b", 0.1, 1e-4, 0, "finished", 50.0, 40.0)
    (b / "config.toml").write_text((b / "config.toml").read_text().replace("[attack]\neps = 8.0", "[attack]\neps = 4.0"))
    points = R.aggregate(R.load_sweep(d).runs)
    assert sorted(p.setting for p in points) == ["attack.eps=4", "attack.eps=8"]
    assert all(len(p.runs) == 1 for p in points)
    assert a.is_dir()


# ----------------------------------------------------------------------------------------- the report

def test_report_renders_with_one_run_missing(sweep_dir: Path, tmp_path: Path) -> None:
    path = R.write_report(sweep_dir)
    assert path == sweep_dir / "REPORT.md"
    md = path.read_text()
    assert md.startswith("# Sweep report: demo")
    # sweep facts
    assert "python launch/sweep.py --grid alpha=0,0.1,1 --grid lr=1e-4,1e-3" in md
    assert COMMIT in md and "local, profile local" in md and "2026-01-02T03:00:00" in md
    assert "- runs: 7: 4 finished, 1 running, 1 failed, 1 missing" in md
    assert "apgd-ce100+apgd-t100x9 at eps 8/255" in md
    # the alpha x lr matrices: initial -> final with 95 % intervals, statuses in place of missing values
    clean = md.split("**Clean accuracy (%), initial -> final (strong attack)**")[1].split("**Robust")[0]
    assert "| alpha \\ lr | 0.0001 | 0.001 |" in clean
    assert ("| 0 | 85.0 [79.4, 89.3] (2 seeds) -> 72.0 [46.6, 97.4] (2 seeds) | 85.0 [79.4, 89.3] (n=200) -> "
            "failed |") in clean
    assert ("| 0.1 | 85.0 [79.4, 89.3] (n=200) -> 80.0 [73.9, 85.0] (n=200) | 85.0 [79.4, 89.3] (n=200) -> "
            "60.0 [53.1, 66.5] (n=200) |") in clean
    assert "| 1 | 85.0 [79.4, 89.3] (n=200) -> running | ? -> missing |" in clean
    robust = md.split("**Robust accuracy (%), initial -> final (strong attack)**")[1].split("**What")[0]
    assert "| 0 | 2.0 [0.8, 5.0] (2 seeds) -> 25.0 [0.0, 88.5] (2 seeds) | 2.0 [0.8, 5.0] (n=200) -> failed |" in robust
    # the last routine evaluation of the two seeds at step 40: clean 76 and 77, robust 25 in both
    assert ("| 0 | 0.0001 | 2 | 85.0 [79.4, 89.3] (2 seeds) -> 72.0 [46.6, 97.4] (2 seeds) | 2.0 [0.8, 5.0] "
            "(2 seeds) -> 25.0 [0.0, 88.5] (2 seeds) | 76.5 [70.1, 82.9] (2 seeds) / 25.0 [19.5, 31.4] (2 seeds) "
            "(40) | finished |") in md
    assert ("| 1 | 0.0001 | 1 | 85.0 [79.4, 89.3] (n=200) -> running | 2.0 [0.8, 5.0] (n=200) -> running | "
            "78.0 [71.8, 83.2] (n=200) / 15.0 [10.7, 20.6] (n=200) (20) | running |") in md
    # what the numbers support: lr at alpha = 0.1 separates (intervals apart), alpha at lr = 1e-4 does not
    found = md.split("**What the numbers support**")[1].split("**Per point")[0]
    assert ("- Final clean accuracy, alpha = 0.1, over 2 values of lr: from 60.0 % (lr = 0.001) to 80.0 % "
            "(lr = 0.0001), a spread of 20.0 points. Extremes of lr: higher at lr = 0.0001 (80.0 % [73.9, 85.0]) "
            "than at lr = 0.001 (60.0 % [53.1, 66.5]): the 95 % intervals do not overlap.") in found
    assert ("- Final robust accuracy, lr = 0.0001, over 2 values of alpha: from 15.0 % (alpha = 0.1) to 25.0 % "
            "(alpha = 0), a spread of 10.0 points. Extremes of alpha: alpha = 0 25.0 % [0.0, 88.5], alpha = 0.1 "
            "15.0 % [10.7, 20.6]: the difference is within the 95 % intervals, not resolved by this sweep.") in found
    assert ("- Robust accuracy, alpha = 0.1, lr = 0.001: higher at the end (35.0 % [28.7, 41.8]) than at step 0 "
            "(2.0 % [0.8, 5.0]): the 95 % intervals do not overlap.") in found
    # per-run status
    assert "**failed**: non-finite loss at step 12" in md
    assert "running (step 20/40)" in md
    assert f"| `{MISSING}` | fare | 1 | 0.001 | 0 | missing (planned, never started) | - | - |" in md
    assert ("| `alpha=0,lr=0.0001,seed=0-aaaa0000` | fare | 0 | 0.0001 | 0 | finished | 85.0 [79.4, 89.3] / 2.0 [0.8, 5.0] "
            "(n=200) | 70.0 [63.3, 75.9] / 20.0 [15.0, 26.1] (n=200) |") in md
    assert "## How to read this" in md
    # figures: embedded with relative links, every one a real PNG of a sensible size
    links = [line[line.index("](") + 2:-1] for line in md.splitlines() if line.startswith("![")]
    assert {Path(link).name for link in links} == {"tradeoff.png", "accuracy_by_alpha.png", "accuracy_by_lr.png",
                                                    "loss_by_alpha.png", "loss_by_lr.png", "final_heatmaps.png"}
    for link in links:
        assert not Path(link).is_absolute() and link.startswith("figures/")
        w, h = _png_size(sweep_dir / link)
        assert w >= 300 and h >= 200


def _alpha_sweep(d: Path, finals: dict[float, tuple[float, float]], n_test: int, lrs=(1e-4,)) -> Path:
    """Finished single-seed runs, one per (alpha, lr), evaluated on n_test images."""
    for lr in lrs:
        for alpha, (clean, robust) in finals.items():
            run = make_run(d, f"alpha={alpha},lr={lr}", alpha, lr, 0, "finished", clean, robust)
            res = json.loads((run / "results.json").read_text())
            for part in ("initial", "final"):
                res[part]["n_test"] = n_test
            (run / "results.json").write_text(json.dumps(res))
    return d


CAUSAL = ("because", "due to", "leads to", "causes", "at some cost", "keeps clean", "improv", "trade-off")


@pytest.mark.parametrize(("n_test", "resolved"), [(200, False), (10000, True)])
def test_claims_follow_the_intervals(tmp_path: Path, n_test: int, resolved: bool) -> None:
    """70 % vs 74 % clean: inside the intervals on 200 images, apart on 10 000; robust 20 % vs 21 % stays
    inside on both. The report says 'higher' only for what separates, states clean and robust spreads
    separately, and never says why."""
    d = _alpha_sweep(tmp_path / f"sw{n_test}", {0.0: (70.0, 20.0), 0.5: (73.0, 20.5), 1.0: (74.0, 21.0)}, n_test)
    md = R.render_markdown(R.load_sweep(d))
    found = md.split("**What the numbers support**")[1].split("**Per point")[0]
    clean = next(line for line in found.splitlines() if line.startswith("- Final clean accuracy, lr = 0.0001"))
    robust = next(line for line in found.splitlines() if line.startswith("- Final robust accuracy, lr = 0.0001"))
    assert "from 70.0 % (alpha = 0) to 74.0 % (alpha = 1), a spread of 4.0 points" in clean
    assert "from 20.0 % (alpha = 0) to 21.0 % (alpha = 1), a spread of 1.0 points" in robust
    if resolved:
        assert "higher at alpha = 1 (74.0 % [73.1, 74.9]) than at alpha = 0 (70.0 % [69.1, 70.9])" in clean
    else:
        assert "higher" not in clean and "within the 95 % intervals, not resolved by this sweep" in clean
    assert "higher" not in robust and "within the 95 % intervals" in robust
    assert not any(word in md.lower() for word in CAUSAL)


def test_figures_tradeoff_scatter_fitted_heatmap_and_by_lr_only_for_several_lrs(tmp_path: Path,
                                                                                monkeypatch) -> None:
    from matplotlib.axes import Axes  # a core dependency (the report's figures)

    calls: dict[str, list] = {"imshow": [], "errorbar": []}
    for name in calls:
        real = getattr(Axes, name)

        def spy(self, *a, _real=real, _name=name, **kw):
            calls[_name].append((a, kw))
            return _real(self, *a, **kw)

        monkeypatch.setattr(Axes, name, spy)
    one_lr = _alpha_sweep(tmp_path / "one", {0.0: (70.0, 20.0), 1.0: (74.0, 30.0)}, 1000)
    paths = R.render_figures(R.load_sweep(one_lr), tmp_path / "one_fig")
    assert sorted(p.name for p in paths) == ["accuracy_by_alpha.png", "final_heatmaps.png", "loss_by_alpha.png",
                                             "tradeoff.png"]
    for p in paths:
        w, h = _png_size(p)
        assert w >= 300 and h >= 200
    # the heatmaps' colour scales are the values' own ranges, not 0-100
    assert [(kw["vmin"], kw["vmax"]) for _, kw in calls["imshow"]] == [(70.0, 74.0), (20.0, 30.0)]
    # the scatter: clean on x, robust on y, both with their 95 % intervals (alpha = 1: 74 % and 30 % of 1000)
    lo_c, hi_c = R.wilson(74.0, 1000)
    lo_r, hi_r = R.wilson(30.0, 1000)
    bars = [(sum(kw["xerr"], []), sum(kw["yerr"], [])) for a, kw in calls["errorbar"] if a == ([74.0], [30.0])]
    assert len(bars) == 1
    assert bars[0][0] == pytest.approx([74.0 - lo_c, hi_c - 74.0]) and bars[0][1] == pytest.approx([30.0 - lo_r, hi_r - 30.0])
    two_lrs = _alpha_sweep(tmp_path / "two", {0.0: (70.0, 20.0), 1.0: (74.0, 30.0)}, 1000, lrs=(1e-4, 1e-3))
    names = {p.name for p in R.render_figures(R.load_sweep(two_lrs), tmp_path / "two_fig")}
    assert {"accuracy_by_lr.png", "loss_by_lr.png", "tradeoff.png"} <= names
    assert R.colour_range([50.0, 50.0]) == (49.0, 51.0)


def test_report_to_another_folder_and_without_sweep_json(sweep_dir: Path, tmp_path: Path) -> None:
    (sweep_dir / "sweep.json").unlink()
    out = tmp_path / "elsewhere" / "rep"
    path = R.write_report(sweep_dir, out)
    md = path.read_text()
    assert path == out / "REPORT.md" and (out / "figures" / "final_heatmaps.png").is_file()
    assert "- runs: 6: 4 finished, 1 running, 1 failed" in md and "missing" not in md.split("## How to read")[0]
    assert "| 1 | 85.0 [79.4, 89.3] (n=200) -> running | - |" in md  # the point never started is not in the grid
    assert "](figures/final_heatmaps.png)" in md
    assert not (sweep_dir / "REPORT.md").exists()


def test_import_advft_report_needs_no_matplotlib_or_wandb() -> None:
    code = ("import sys, advft, advft.report; "
            "bad = [m for m in ('matplotlib', 'wandb', 'wandb_workspaces', 'torch') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# -------------------------------------------------------------------------------------------------- CLI

def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    sys.path.insert(0, str(ROOT))
    from launch import report as cli

    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_report_and_prints_path(sweep_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(R, "render_figures", lambda sweep, fig_dir: [])  # figures: tested above
    code, out, err = _cli([str(sweep_dir)], capsys)
    assert code == 0 and out.strip() == f"report: {sweep_dir / 'REPORT.md'}" and err == ""


@pytest.mark.parametrize("case", ["no_such", "empty", "bad_json", "file"])
def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path, case: str, capsys) -> None:
    target = tmp_path / case
    if case == "empty":
        target.mkdir()
        (target / "unrelated").mkdir()
    elif case == "bad_json":
        target.mkdir()
        (target / "sweep.json").write_text("{not json")
    elif case == "file":
        target.write_text("x")
    code, out, err = _cli([str(target)], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and str(target) in err
    assert not (target / "REPORT.md").exists() if target.is_dir() else True


def test_cli_wandb_offline_is_skipped_with_a_message(sweep_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(R, "render_figures", lambda sweep, fig_dir: [])  # figures: tested above
    monkeypatch.setenv("WANDB_MODE", "offline")
    code, out, err = _cli([str(sweep_dir), "--wandb"], capsys)
    assert code == 0 and (sweep_dir / "REPORT.md").is_file()
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[1].startswith("wandb report not published: ")
    assert "WANDB_API_KEY" in lines[1] and "pip install wandb-workspaces" in lines[1]


def test_cli_wandb_without_the_package(sweep_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(R, "render_figures", lambda sweep, fig_dir: [])  # figures: tested above
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)  # find_spec -> None: as if not installed
    code, out, _ = _cli([str(sweep_dir), "--wandb"], capsys)
    assert code == 0 and "wandb-workspaces package is not installed" in out


def _fake_wandb_workspaces(monkeypatch, saved: list) -> None:
    """A stand-in for wandb_workspaces.reports.v2 that records what would be published."""

    class Thing:
        def __init__(self, *args, **kwargs):
            self.args, self.kwargs = args, kwargs

    class Report(Thing):
        url = "https://wandb.example/report/1"

        def save(self):
            saved.append(self)

    v2 = types.ModuleType("wandb_workspaces.reports.v2")
    for name in ("Runset", "LinePlot", "PanelGrid", "Config", "SummaryMetric", "ParallelCoordinatesPlot",
                 "ParallelCoordinatesPlotColumn", "H1", "MarkdownBlock"):
        setattr(v2, name, type(name, (Thing,), {}))
    v2.Report = Report
    for mod_name, mod in (("wandb_workspaces", types.ModuleType("wandb_workspaces")),
                          ("wandb_workspaces.reports", types.ModuleType("wandb_workspaces.reports")),
                          ("wandb_workspaces.reports.v2", v2)):
        mod.__spec__ = importlib.machinery.ModuleSpec(mod_name, None)
        monkeypatch.setitem(sys.modules, mod_name, mod)
    sys.modules["wandb_workspaces"].reports = sys.modules["wandb_workspaces.reports"]
    sys.modules["wandb_workspaces.reports"].v2 = v2


def test_cli_wandb_online_publishes_the_same_panels(sweep_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(R, "render_figures", lambda sweep, fig_dir: [])  # figures: tested above
    saved: list = []
    _fake_wandb_workspaces(monkeypatch, saved)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    monkeypatch.setenv("WANDB_ENTITY", "team")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    code, out, _ = _cli([str(sweep_dir), "--wandb"], capsys)
    assert code == 0 and out.strip().splitlines()[-1] == "wandb report: https://wandb.example/report/1"
    (report,) = saved
    assert report.kwargs["project"] == "proj" and report.kwargs["entity"] == "team" and "demo" in report.kwargs["title"]
    grids = [b for b in report.kwargs["blocks"] if type(b).__name__ == "PanelGrid"]
    plotted = [(p.kwargs["y"][0], p.kwargs["groupby"].args[0]) for g in grids for p in g.kwargs["panels"]
               if type(p).__name__ == "LinePlot"]
    for metric in ("eval/clean_acc", "eval/robust_acc", "train/adv_loss", "train/clean_loss"):
        assert {(metric, "loss.alpha"), (metric, "optim.lr"), (metric, "loss.name")} <= set(plotted)
    runset = grids[0].kwargs["runsets"][0]
    assert runset.kwargs["filters"] == "Metric('Group') == 'demo'"  # the sweep's runs: wandb group = sweep name
    (md,) = [b for b in report.kwargs["blocks"] if type(b).__name__ == "MarkdownBlock"]
    assert "72.0 [46.6, 97.4] (2 seeds)" in md.kwargs["text"]


def test_cli_wandb_publish_failure_is_one_line_exit_1(sweep_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(R, "render_figures", lambda sweep, fig_dir: [])  # figures: tested above
    saved: list = []
    _fake_wandb_workspaces(monkeypatch, saved)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_ENTITY", "team")
    monkeypatch.delenv("WANDB_MODE", raising=False)

    def refuse(self):
        raise ConnectionError("api.wandb.ai unreachable\nretry later")

    monkeypatch.setattr(sys.modules["wandb_workspaces.reports.v2"].Report, "save", refuse)
    code, out, err = _cli([str(sweep_dir), "--wandb"], capsys)
    assert code == 1 and (sweep_dir / "REPORT.md").is_file()
    assert err.strip() == "error: the wandb report failed to publish: ConnectionError: retry later"


def test_real_wandb_workspaces_accepts_the_report(sweep_dir: Path, monkeypatch) -> None:
    """The panels are valid for the installed wandb-workspaces (built, serialised, never saved)."""
    pytest.importorskip("wandb_workspaces.reports.v2")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    report = R.wandb_report(R.load_sweep(sweep_dir), project="advft", entity="someone")
    # constructing validates every field (pydantic); serialising would need a wandb login, so it is not done
    assert report.title == "advft sweep demo" and report.entity == "someone"
    assert sum(type(b).__name__ == "PanelGrid" for b in report.blocks) == 4  # by alpha, lr, loss; final
