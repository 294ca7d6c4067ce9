"""launch/sweep.py and launch/job.py: grids and run names, profiles, bad input, dry run, local sweeps, the
lock, a grid of losses crossed with alpha (locally and on SLURM), and requeues that lose no step (a local
time limit; on SLURM ``job._interrupt()``, a real time limit and a partition preemption). A run that a
signal must cut waits for it at a log step (tests/faults/hold.py): these tests never bet on a run still
being at work when its signal lands.

Tests marked ``slurm`` talk to the cluster of ``slurm/local-cluster.sh up``: without one they skip, unless
ADVFT_REQUIRE_SLURM=1 (CI), where they fail. The tiny job runs with its evaluations cut to the bone: these
tests are about scheduling and resuming, not accuracy.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from advft import checkpoint as ckpt
from advft import config as C
from advft.fare import finetune
from conftest import TINY_JOB, wait_for
from faults import hold
from slurm_util import in_queue, wait_sacct
from launch.sweeper import grid as G
from launch import report as REPORT
from launch import sweep as S
from launch.profiles import KEYS, PROFILE_DIR, load_profile
from launch.sweeper.record import read_sweep, sweep_lock

ROOT = Path(__file__).resolve().parent.parent
JOB = TINY_JOB
LEAN = ["eval.final_targets=0", "eval.probe_epochs=5", "eval.final_attack_steps=2", "eval.attack_steps=2",
        "eval.probe_train_size=64", "eval.test_size=32", "eval.every=0"]
# the run the interruption tests cut: log every 2 steps, periodic checkpoints every 8
LONG = ["optim.steps=40", "run.ckpt_every=8"]
# the loss comparison of issue 15, as small as it gets: fare once per alpha, trades (reads beta) once
LOSS_GRID = ["--grid", "loss.name=fare,trades", "--grid", "alpha=0,1"]
LOSS_RUNS = {"alpha=0,loss=fare": ("fare", 0.0, None), "alpha=1,loss=fare": ("fare", 1.0, None),
             "loss=trades": ("trades", None, 1.0)}  # run label -> (loss, alpha, beta)


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic-cache")  # shared: the synthetic set is generated once


def args_for(root: Path, encoder: Path, cache: Path, *extra: str, sets: list[str] = ()) -> list[str]:
    sets = [f"model.checkpoint={encoder}", f"data.path={cache}", f"run.root={root}", *LEAN, *sets]
    return ["--job", str(JOB), *(x for s in sets for x in ("--set", s)), *extra]


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = S.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def only_run(sweep_dir: Path) -> tuple[str, dict]:
    (name, entry), = read_sweep(sweep_dir)["runs"].items()
    return name, entry


def train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == "train"]


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in train_records(run_dir)]


def starts(run_dir: Path) -> list[dict]:
    path = run_dir / "manifest.json"
    return json.loads(path.read_text())["starts"] if path.is_file() else []


def job_logs(sweep_dir: Path, job_id: str) -> tuple[str, str]:
    """stdout and stderr of a job's first task, where submitit and the run log."""
    folder = Path(read_sweep(sweep_dir)["cluster"]["submitit_folder"].replace("%j", job_id))
    return tuple((folder / f"{job_id}_0_log.{ext}").read_text() for ext in ("out", "err"))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    step, state = ckpt.load_latest(run_dir)
    return state["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_each_run_trained_its_loss(sweep_dir: Path, report_dir: Path) -> None:
    """The finished sweep of LOSS_GRID: the runs of LOSS_RUNS and no others, each finished with its loss and
    weights in results.json and config.toml, each logged step minimised its own loss's sum of terms, the
    encoders differ, and launch/report.py names both losses."""
    rec = read_sweep(sweep_dir)
    assert rec["grid"] == {"loss.name": ["fare", "trades"], "loss.alpha": ["0", "1"]}
    runs = {n.rsplit("-", 1)[0]: sweep_dir / n for n in rec["runs"]}
    assert sorted(runs) == sorted(LOSS_RUNS)
    weights = {}
    for label, run in runs.items():
        loss, alpha, beta = LOSS_RUNS[label]
        res = json.loads((run / "results.json").read_text())
        assert (res["status"], res["loss"], res["alpha"], res["beta"]) == ("finished", loss, alpha, beta), res
        cfg = tomllib.loads((run / "config.toml").read_text())["loss"]
        assert (cfg["name"], cfg.get("alpha"), cfg.get("beta")) == (loss, alpha, beta), cfg
        logged = train_records(run)
        assert logged, run
        for r in logged:  # the job ran the config's loss, not the default one (metrics are rounded to 1e-6)
            want = (r["adv_loss"] + alpha * r.get("clean_loss", 0.0) if loss == "fare"
                    else r["clean_loss"] + beta * r["adv_loss"])
            assert r["loss"] == pytest.approx(want, rel=1e-6, abs=1e-5), (label, r)
        weights[label] = final_weights(run)
    # same start, data and seed: only the loss (or alpha) can make the encoders differ
    for a, b in itertools.combinations(sorted(weights), 2):
        assert any(not torch.equal(weights[a][k], weights[b][k]) for k in weights[a]), (a, b)
    assert REPORT.main([str(sweep_dir), "--out", str(report_dir)]) == 0
    report = (report_dir / "REPORT.md").read_text()
    assert "fare" in report and "trades" in report


@pytest.fixture(scope="module")
def reference(tmp_path_factory, base_encoder, cache) -> dict[str, torch.Tensor]:
    """Final weights of the LONG run, uninterrupted, in this process."""
    root = tmp_path_factory.mktemp("reference")
    cfg = C.load(JOB, [f"model.checkpoint={base_encoder}", f"data.path={cache}", f"run.root={root}",
                       "run.name=ref", *LEAN, *LONG])
    # the sweep's jobs run with cpus_per_task = 1 thread; float reductions depend on the thread count, so the
    # reference must use the same count for a bit-identical comparison
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert finetune(cfg)["status"] == "finished"
        return final_weights(cfg.run.dir)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- grids, names, profiles (no training)

def test_grid_expands_the_cartesian_product_in_canonical_named_runs():
    axes = G.parse_grid(["lr=1e-4,1e-3", "alpha=0,0.1,1"])
    points = G.expand(axes)
    assert len(points) == 6 and points[0] == {"optim.lr": "1e-4", "loss.alpha": "0"}
    cfg = C.load(JOB, points[0])
    name = G.run_name(cfg, axes)
    assert name == f"alpha=0,lr=0.0001-{cfg.hash()}"  # sorted labels, resolved values, config hash
    # another spelling of the same values names the same run: a rerun finds it again
    same = C.load(JOB, {"optim.lr": "0.0001", "loss.alpha": "0.0"})
    assert G.run_name(same, G.parse_grid(["alpha=0.0", "optim.lr=0.0001"])) == name


def test_grid_values_with_commas_and_unsafe_characters():
    axes = G.parse_grid(["optim.betas=(0.9,0.95),(0.9,0.999)", "model.head=a/b,c"])
    assert [a.values for a in axes] == [("(0.9,0.95)", "(0.9,0.999)"), ("a/b", "c")]
    cfg = C.load(JOB, {"optim.betas": "(0.9,0.999)", "model.head": "../x/y"})
    name = G.run_name(cfg, axes)
    assert "/" not in name and ".." not in name and name.startswith("betas=0.9-0.999,head=")
    # two axes with the same last component fall back to their full keys
    assert [a.label for a in G.parse_grid(["optim.steps=1,2", "attack.steps=3"])] == ["optim.steps", "attack.steps"]


def test_shipped_profiles_load_and_describe_their_world():
    names = sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))
    assert "local" in names
    for n in names:
        p = load_profile(n)
        assert p.world_size == p.nodes * p.tasks >= 1
    gpu = load_profile("example-gpu", {"nodes": "2"})
    assert gpu.tasks == gpu.gpus_per_node and gpu.world_size == 2 * gpu.gpus_per_node


def test_profile_errors_name_the_key(tmp_path):
    good = (PROFILE_DIR / "local.toml").read_text()
    (tmp_path / "typo.toml").write_text(good + 'partiton = "x"\n')
    with pytest.raises(C.ConfigError, match="unknown key 'partiton'"):
        load_profile(str(tmp_path / "typo.toml"))
    (tmp_path / "short.toml").write_text("\n".join(line for line in good.splitlines()
                                                   if not line.startswith("timeout_min")))
    with pytest.raises(C.ConfigError, match="missing key.*timeout_min"):
        load_profile(str(tmp_path / "short.toml"))
    with pytest.raises(C.ConfigError, match="nodes must be an integer"):
        load_profile("local", {"nodes": "two"})
    with pytest.raises(C.ConfigError, match="timeout_min = 0 must be >= 1"):
        load_profile("local", {"timeout_min": "0"})
    assert set(KEYS) >= {"partition", "signal_delay_s", "max_num_timeout", "array_parallelism"}


# ---------------------------------------------------------------- bad input, dry run, lock

BAD = {
    "no '='": (["--grid", "alpha"], "--grid expects KEY=v1,v2"),
    "empty values": (["--grid", "alpha="], "empty value"),
    "empty value in the list": (["--grid", "alpha=0,,1"], "empty value"),
    "repeated key": (["--grid", "alpha=0", "--grid", "loss.alpha=1"], "given twice"),
    "unknown key": (["--grid", "alpah=0,1"], "unknown config key 'alpah'"),
    "grid and --set": (["--grid", "alpha=0,1", "--set", "alpha=0"], "also given with --set"),
    "grid over run.root": (["--grid", "run.root=a,b"], "sets run.name and run.root itself"),
    "run.name set": (["--set", "run.name=x"], "the sweep names its runs"),
    "same config twice": (["--grid", "alpha=0.1,1e-1"], "give the same config"),
    "invalid value": (["--grid", "alpha=0,-1"], "loss.alpha = -1.0 must be >= 0"),
    "wrong type": (["--grid", "lr=fast"], "optim.lr: expected a number"),
    "name with a slash": (["--name", "a/b"], "not a valid name"),
    "name with ..": (["--name", ".."], "not a valid name"),
    "unknown cluster key": (["--cluster-set", "gpu=1"], "unknown cluster key 'gpu'"),
    "unknown profile": (["--profile", "nosuch"], "cluster profile 'nosuch' not found"),
    "unknown cluster": (["--cluster", "aws"], "--cluster 'aws' is not valid"),
    "unknown flag": (["--gird", "alpha=0"], "unrecognized arguments"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tmp_path, base_encoder, cache, capsys):
    extra, message = BAD[case]
    root = tmp_path / "runs"
    rc, out, err = run_main(capsys, args_for(root, base_encoder, cache, "--cluster", "local", *extra))
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not root.exists()


def test_slurm_without_sbatch_is_bad_input_but_auto_falls_back_to_local(monkeypatch, tmp_path, base_encoder,
                                                                         cache, capsys):
    import launch.cluster as K

    monkeypatch.setattr(K.shutil, "which", lambda name: None)
    root = tmp_path / "runs"
    rc, _, err = run_main(capsys, args_for(root, base_encoder, cache, "--cluster", "slurm"))
    assert rc == 2 and "sbatch/srun are not on PATH" in err and not root.exists()
    assert K.resolve_kind("auto") == "local"
    rc, out, _ = run_main(capsys, args_for(root, base_encoder, cache, "--dry-run"))  # auto
    assert rc == 0 and "cluster local" in out and "--cluster auto: local processes, since sbatch/srun are not on PATH" in out


def test_dry_run_shows_the_array_and_its_sbatch_script_and_submits_nothing(tmp_path, base_encoder, cache,
                                                                           capsys):
    root = tmp_path / "runs"
    rc, out, err = run_main(capsys, args_for(root, base_encoder, cache, "--cluster", "slurm", "--dry-run",
                                             "--grid", "alpha=0,0.1", "--grid", "lr=1e-4,1e-3",
                                             "--timeout-min", "30", "--name", "dry"))
    assert rc == 0, err
    assert out.count("would submit") == 4 and "alpha=0.1,lr=0.001-" in out
    for line in ("#SBATCH --array=0-3%4", "#SBATCH --signal=USR2@30", "#SBATCH --partition=debug",
                 "#SBATCH --time=30", "#SBATCH --ntasks-per-node=1", "--cpus-per-task=1 ", "-m submitit.core._submit"):
        assert line in out, line
    assert "PYTHONPATH" not in out  # the job imports the installed advft/launch, no path tricks
    assert "nothing submitted" in out and not root.exists()


def test_a_held_lock_makes_a_second_sweep_wait_then_give_up_without_submitting(monkeypatch, tmp_path,
                                                                               base_encoder, cache, capsys):
    root = tmp_path / "runs"
    monkeypatch.setenv("ADVFT_SWEEP_LOCK_TIMEOUT", "1")
    with sweep_lock(root / "locked"):
        t0 = time.monotonic()
        rc, out, err = run_main(capsys, args_for(root, base_encoder, cache, "--cluster", "local", "--name",
                                                 "locked"))
        assert time.monotonic() - t0 >= 1
    assert rc == 1 and "waiting for another sweep" in out and "held" in err
    assert not (root / "locked" / "sweep.json").exists()


# ---------------------------------------------------------------- local sweeps

@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, base_encoder, cache):
    """A 2x2 sweep (the design card's two-axis grid) through submitit's local executor, with wandb offline
    and a planted API key."""
    root = tmp_path_factory.mktemp("local")
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_API_KEY", "advft-test-fake-key-0123456789abcdef0123")
    mp.setenv("WANDB_DIR", str(root / "wandb-elsewhere"))  # wandb must still write into the run folder
    import launch.cluster as K

    mp.setattr(K.shutil, "which", lambda name: None)  # no sbatch: --cluster auto runs locally
    argv = args_for(root, base_encoder, cache, "--grid", "alpha=0,0.1", "--grid", "lr=1e-4,1e-3", "--name", "sw",
                    "--wait",
                    sets=["run.wandb=auto"])  # the tiny job disables wandb; auto + WANDB_MODE=offline
    from io import StringIO
    from contextlib import redirect_stdout

    buf = StringIO()
    try:
        with redirect_stdout(buf):
            rc = S.main(argv)
    finally:
        mp.undo()
    return {"root": root, "dir": root / "sw", "argv": argv, "rc": rc, "out": buf.getvalue()}


def test_local_sweep_runs_records_and_reports(local_sweep):
    d, out = local_sweep["dir"], local_sweep["out"]
    assert local_sweep["rc"] == 0, out
    rec = read_sweep(d)
    assert rec["cluster"]["kind"] == "local"
    assert rec["grid"] == {"loss.alpha": ["0", "0.1"], "optim.lr": ["1e-4", "1e-3"]}
    assert sorted(n.rsplit("-", 1)[0] for n in rec["runs"]) == [
        "alpha=0,lr=0.0001", "alpha=0,lr=0.001", "alpha=0.1,lr=0.0001", "alpha=0.1,lr=0.001"]
    assert len(rec["submissions"]) == 1
    assert "--grid" in rec["command"] and all(e["job_id"] for e in rec["runs"].values())
    for name, entry in rec["runs"].items():
        res = json.loads((d / name / "results.json").read_text())
        assert res["status"] == "finished" and Path(entry["dir"]) == d / name
        assert res["alpha"] == float(entry["grid"]["loss.alpha"])
    assert "clean % [95 % CI] (initial -> final)" in out and out.count("finished") >= 8
    assert f"wandb sync {d}/*/wandb/offline-run-*" in out
    # --wait ends with the report of the whole sweep, written into its folder, and says where it is
    assert out.rstrip().splitlines()[-1] == f"report: {d / 'REPORT.md'}"
    report = (d / "REPORT.md").read_text()
    assert all(name in report for name in rec["runs"]) and (d / "figures" / "final_heatmaps.png").is_file()


def test_wandb_is_offline_one_run_per_advft_run_and_the_key_is_written_nowhere(local_sweep):
    from wandb_log import segment

    d = local_sweep["dir"]
    ids = set()
    for name in read_sweep(d)["runs"]:
        wid = (d / name / "wandb_id").read_text().strip()  # grid names hold ',' and '=': never the id
        offline = list((d / name / "wandb").glob("offline-run-*"))
        assert len(offline) == 1 and offline[0].name.endswith(f"-{wid}"), offline
        run = segment(offline[0])["run"]
        assert (run.run_id, run.run_group, run.job_type, run.display_name) == (wid, "sw", "finetune", name)
        ids.add(wid)
    assert len(ids) == 4
    key = b"advft-test-fake-key-0123456789abcdef0123"
    leaks = [p for p in d.rglob("*") if p.is_file() and key in p.read_bytes()]
    assert not leaks


def test_rerun_skips_finished_runs_and_resubmits_only_the_failed_one(local_sweep, capsys, monkeypatch):
    d = local_sweep["dir"]
    import launch.cluster as K

    monkeypatch.setattr(K.shutil, "which", lambda name: None)
    argv = [a for a in local_sweep["argv"] if a != "--wait"]
    rc, out, _ = run_main(capsys, argv)
    assert rc == 0 and "nothing to submit" in out and out.count("finished (skipped)") == 4
    assert len(read_sweep(d)["submissions"]) == 1
    # make one run fail as the engine records it (a non-finite loss after its last checkpoint)
    failed = sorted(read_sweep(d)["runs"])[0]
    res = json.loads((d / failed / "results.json").read_text())
    res.update(status="failed", error="non-finite loss at step 7", failed_step=7)
    (d / failed / "results.json").write_text(json.dumps(res))
    rc, out, err = run_main(capsys, argv + ["--wait"])
    assert rc == 0, out + err
    rec = read_sweep(d)
    assert len(rec["submissions"]) == 2 and rec["submissions"][-1]["runs"] == [failed]
    assert out.count("submitted") == 1 and "finished (skipped)" in out
    assert json.loads((d / failed / "results.json").read_text())["status"] == "finished"
    assert len(starts(d / failed)) == 2 and starts(d / failed)[1]["resume_step"] == 8  # resumed, not redone


def test_two_sweeps_started_at_once_submit_each_run_once(tmp_path, base_encoder, cache):
    argv = [sys.executable, "launch/sweep.py", *args_for(tmp_path, base_encoder, cache, "--cluster", "local",
                                                          "--name", "twice", "--wait",
                                                          sets=["optim.steps=2"])]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    procs = [subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    rec = read_sweep(tmp_path / "twice")
    assert len(rec["submissions"]) == 1 and len(rec["submissions"][0]["runs"]) == 1
    assert sum("submitted" in o for o, _ in outs) == 1
    assert sum("queued or running (skipped)" in o or "finished (skipped)" in o for o, _ in outs) == 1


def test_local_sweep_crosses_losses_with_alpha(tmp_path, base_encoder, cache, capsys):
    rc, out, err = run_main(capsys, args_for(tmp_path, base_encoder, cache, "--cluster", "local", *LOSS_GRID,
                                             "--name", "losses", "--wait", sets=["optim.steps=2"]))
    assert rc == 0, out + err
    assert "loss.name = 'trades' does not read loss.alpha" in err
    assert_each_run_trained_its_loss(tmp_path / "losses", tmp_path / "report")


def test_local_time_limit_requeues_and_the_finished_run_is_bit_identical(tmp_path, base_encoder, cache,
                                                                         reference, capsys, monkeypatch):
    # submitit's local controller sends USR2 `timeout - signal_delay` = 30 s into every start of the job and
    # restarts it. The first start waits at its first log step until that signal has come (tests/faults/
    # hold.py), so it is cut there on any machine; the second resumes where it stopped. The test then
    # cancels the job and lets a rerun of the sweep finish the run.
    held = tmp_path / "hold"
    for k, v in hold.environment(held).items():
        monkeypatch.setenv(k, v)
    argv = args_for(tmp_path, base_encoder, cache, "--cluster", "local", "--name", "tl", "--timeout-min", "1",
                    "--cluster-set", "signal_delay_s=30", sets=LONG)
    plan = S.build_plan(S.parse_args(argv))
    job, = S.submit(plan, plan.runs)
    run = plan.runs[0].cfg.run.dir
    try:
        hold.wait_held(held, alive=lambda: job.state == "RUNNING")
        restarted = wait_for(lambda: starts(run)[1:], "the restart after the time limit", timeout_s=180)
    finally:
        job.cancel()
        wait_for(lambda: job.state != "RUNNING", "the cancelled job to end", timeout_s=60)
    monkeypatch.delenv(hold.ENV)
    stop = restarted[0]["resume_step"]
    # the held log step; the restart resumed from its checkpoint (which the restart may since have rotated out:
    # it trains on until the cancel, so the checkpoint list depends on the machine's speed)
    assert stop == 2
    out, err = job.stdout(), job.stderr()
    assert "timed-out" in out and "Requeued job" in out  # submitit's handler ran, after the checkpoint
    assert f"stopped at step {stop} on request" in err and "(signals: SIGUSR2)" in err
    rc, out, err = run_main(capsys, args_for(tmp_path, base_encoder, cache, "--cluster", "local", "--name", "tl",
                                             "--wait", sets=LONG))  # the profile's own, long time limit
    assert rc == 0, out + err
    assert train_steps(run) == list(range(2, 41, 2))  # no step lost, none logged twice
    assert_same_weights(final_weights(run), reference)


# ---------------------------------------------------------------- SLURM (the local test cluster)

def submit_and_hold(capsys, slurm, argv: list[str], sweep_dir: Path, held: Path) -> tuple[str, str, Path]:
    """Submit the sweep of one run and wait until its first start is held at its first log step."""
    slurm.append(sweep_dir)
    rc, out, err = run_main(capsys, argv)
    assert rc == 0, out + err
    name, entry = only_run(sweep_dir)
    hold.wait_held(held, alive=lambda: in_queue(entry["job_id"]))
    return name, entry["job_id"], sweep_dir / name



@pytest.mark.slurm
def test_slurm_sweep_of_losses_x_alpha_is_one_job_array_and_each_run_trains_its_loss(slurm, tmp_path, base_encoder,
                                                                                     cache, capsys):
    d = tmp_path / "arr"
    slurm.append(d)
    rc, out, err = run_main(capsys, args_for(tmp_path, base_encoder, cache, "--cluster", "slurm", "--name", "arr",
                                             *LOSS_GRID, "--wait", sets=["optim.steps=2"]))
    assert rc == 0, out + err
    rec = read_sweep(d)
    assert rec["cluster"]["kind"] == "slurm"
    ids = sorted(e["job_id"] for e in rec["runs"].values())
    array = ids[0].split("_")[0]
    assert ids == [f"{array}_{i}" for i in range(3)] and rec["submissions"][0]["job_ids"] == ids
    wait_sacct(dict(os.environ), array, [f"{array}_{i}|COMPLETED" for i in range(3)], "JobID,State", sort=True)
    assert_each_run_trained_its_loss(d, tmp_path / "report")


@pytest.mark.slurm
def test_slurm_task_gets_the_cpus_its_profile_asks_for(slurm, tmp_path):
    import functools

    from launch.cluster import make_executor
    from launch.profiles import load_profile

    # the local cluster binds tasks to cores: without --cpus-per-task on srun, the task would get one core
    ex = make_executor("slurm", tmp_path / "submitit", load_profile("local", {"cpus_per_task": "2"}), "cpus")
    job = ex.submit(functools.partial(os.sched_getaffinity, 0))
    assert len(job.result()) == 2, job.result()


@pytest.mark.slurm
def test_slurm_interrupt_and_partition_preemption_requeue_and_the_run_ends_bit_identical(
        slurm, tmp_path, base_encoder, cache, reference, capsys, monkeypatch):
    import submitit

    # The first two starts wait at their first log step (tests/faults/hold.py): the first until submitit's
    # USR2 has come (its interrupt sends SIGTERM first, and the job must see both), the second until the
    # preemption's SIGTERM. So each signal lands while the run trains, however fast this machine is.
    held = tmp_path / "hold"
    for k, v in hold.environment(held, starts=2, until=["USR2", "stop"]).items():
        monkeypatch.setenv(k, v)
    # the run keeps the profile's 1 CPU (and so the reference's 1 thread); the high job asks for the whole node
    argv = args_for(tmp_path, base_encoder, cache, "--cluster", "slurm", "--name", "cut", "--partition", "low",
                    sets=LONG)
    name, job_id, run = submit_and_hold(capsys, slurm, argv, tmp_path / "cut", held)
    # 1. submitit's test hook (SIGTERM then USR2, as SLURM does): the run stops at a step boundary, the job
    #    requeues itself through submitit
    job = submitit.SlurmJob(folder=read_sweep(tmp_path / "cut")["cluster"]["submitit_folder"], job_id=job_id)
    job._interrupt()
    hold.wait_held(held, 1)
    # 2. partition preemption: SIGTERM only; SLURM requeues the job itself
    high = subprocess.run(["sbatch", "--parsable", "-p", "high", "--exclusive", "-o", "/dev/null", "--wrap",
                           "sleep 1"], capture_output=True, text=True, timeout=30)
    assert high.returncode == 0, high.stderr
    rc, out, err = run_main(capsys, argv + ["--wait"])  # finds the job queued, follows it to the end
    assert rc == 0 and "queued or running (skipped)" in out, out + err
    # the interrupt requeued the job, the preemption requeued it again (accounting lags the job's end)
    wait_sacct(dict(os.environ), job_id, lambda acct: acct[:1] == ["REQUEUED"] and "PREEMPTED" in acct
               and acct[-1:] == ["COMPLETED"], every_start=True)
    seen = starts(run)
    assert [s["slurm"].get("SLURM_RESTART_COUNT") for s in seen] == [None, "1", "2"], seen
    # stopped at the first held log step; preemption may SIGKILL the second start before it has checkpointed
    # the second: it then resumes from the first's checkpoint
    assert seen[1]["resume_step"] == 2 and seen[2]["resume_step"] in (2, 4), seen
    _, err = job_logs(tmp_path / "cut", job_id)
    assert "stopped at step 2 on request" in err  # at a boundary, not a periodic checkpoint
    assert train_steps(run) == list(range(2, 41, 2))  # no step lost, none logged twice
    assert_same_weights(final_weights(run), reference)


@pytest.mark.slurm
def test_slurm_time_limit_signals_the_run_which_checkpoints_requeues_and_resumes(slurm, tmp_path, base_encoder,
                                                                                cache, capsys, monkeypatch):
    # a 2-minute limit with the profile's 30 s signal delay: USR2 is due 90 s into each start, and sbatch(1)
    # says it "may be sent up to 60 seconds earlier", so it comes 30 to 90 s in, after Python set its handler
    # (with a 1-minute limit it once came at the start and killed the task). The first start waits for it at
    # its first log step (tests/faults/hold.py)
    held = tmp_path / "hold"
    for k, v in hold.environment(held).items():
        monkeypatch.setenv(k, v)
    argv = args_for(tmp_path, base_encoder, cache, "--cluster", "slurm", "--name", "limit", "--timeout-min", "2",
                    sets=LONG)
    name, job_id, run = submit_and_hold(capsys, slurm, argv, tmp_path / "limit", held)
    seen = wait_for(lambda: starts(run)[1:], "the requeued start", timeout_s=240)
    stop = seen[0]["resume_step"]
    assert stop == 2 and ckpt.load_latest(run)[0] >= stop
    out, err = job_logs(tmp_path / "limit", job_id)
    # the signal was deferred to the step boundary: the run stopped there, then submitit requeued the job
    assert f"stopped at step {stop} on request" in err and "(signals: SIGUSR2)" in err
    assert "Caught signal SIGUSR2" in out and "timed-out" in out and f"Requeued job {job_id}" in out
