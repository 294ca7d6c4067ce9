"""launch/sweep.py with a base encoder that does not exist yet: ``model.pretrain`` names the pretraining job
that makes ``model.checkpoint``, and the sweep runs it first, once (locally: it waits for it, then submits
the array; on SLURM: the array depends on it with afterok), and never again once it has finished.

The pretraining is demo_pretrain cut to a few steps with tiny evaluations, written into the test's folder;
the fine-tuning is the tiny job with test_sweep.py's lean evaluations, cut to 4 steps. Tests marked ``slurm`` use the
cluster of ``slurm/local-cluster.sh up`` (skipped without one, failed under ADVFT_REQUIRE_SLURM=1).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from advft import config as C
from conftest import TINY_JOB, wait_for
from faults import hold
from slurm_util import wait_sacct
from launch import base_encoder
from launch import sweep as S
from launch.sweeper import cli as sweep_cli
from launch.sweeper.record import read_sweep

ROOT = Path(__file__).resolve().parent.parent
JOB = TINY_JOB
LEAN = ["eval.final_targets=0", "eval.probe_epochs=5", "eval.final_attack_steps=2", "eval.attack_steps=2",
        "eval.probe_train_size=64", "eval.test_size=32", "eval.every=0", "optim.steps=4"]

PRETRAIN_TOML = """# demo_pretrain cut to a few steps (written by tests/test_sweep_pretrain.py)
[data]
format = "synthetic"
path = "{cache}"
resolution = 32
batch_size = 16
num_workers = 0
synthetic_size = 256

[model]
arch = "tiny"
stem = "cifar"
normalize = "none"
proj_dim = 32

[optim]
lr = {lr}
warmup_steps = 1
steps = {steps}

[simclr]
temperature = 0.2
crop_scale_min = 0.35

[eval]
every = 0
probe_train_size = 64
test_size = 32
batch_size = 64
probe_epochs = 5

[run]
root = "{root}"
name = "tiny_pretrain"
precision = "fp32"
channels_last = false
log_every = 2
ckpt_every = 2
wandb = "auto"
progress = false
"""


# ---------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic-cache")  # shared: the synthetic set is generated once


DIVERGE = "1e38"  # a learning rate whose first update overflows the weights: the loss of step 1 is not finite


def write_pretrain_job(folder: Path, cache: Path, *, steps: int = 4, lr: str = "2e-3",
                       root: Path | None = None) -> tuple[Path, Path]:
    """The tiny pretraining job file in ``folder`` and the encoder it makes (``<folder>/base/...``)."""
    root = folder / "base" if root is None else root
    folder.mkdir(parents=True, exist_ok=True)
    job = folder / "tiny_pretrain.toml"
    job.write_text(PRETRAIN_TOML.format(cache=cache, root=root, steps=steps, lr=lr))
    return job, root / "tiny_pretrain" / "encoder.pt"


def sweep_args(root: Path, pretrain: Path, encoder: Path, cache: Path, *extra: str,
               sets: tuple[str, ...] = ()) -> list[str]:
    sets = (f"model.checkpoint={encoder}", f"model.pretrain={pretrain}", f"data.path={cache}", f"run.root={root}",
            *LEAN, *sets)
    return ["--job", str(JOB), *(x for s in sets for x in ("--set", s)), *extra]


def run_main(capsys, argv: list[str]) -> tuple[int, str, str]:
    rc = S.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def starts(run_dir: Path) -> list[dict]:
    path = run_dir / "manifest.json"
    return json.loads(path.read_text())["starts"] if path.is_file() else []


def status(run_dir: Path) -> str | None:
    path = run_dir / "results.json"
    return json.loads(path.read_text()).get("status") if path.is_file() else None




# ---------------------------------------------------------------- config: the key, its checks, the hash

def test_model_pretrain_is_not_in_the_config_hash_and_the_demo_job_is_consistent(tmp_path, monkeypatch):
    base = C.load(JOB)
    assert base.hash() == C.load(JOB, ["model.pretrain=jobs/demo_pretrain.toml"]).hash()
    assert base.hash() != C.load(JOB, ["model.checkpoint=elsewhere.pt"]).hash()
    monkeypatch.chdir(tmp_path)  # another directory: the job's relative paths still fit together
    demo = C.load(ROOT / "jobs" / "demo.toml")
    job, pcfg = base_encoder.pretrain_job(demo)
    assert job == ROOT / "jobs" / "demo_pretrain.toml"  # resolved like a job file: found in the checkout
    assert (pcfg.run.dir / "encoder.pt").resolve() == Path(demo.model.checkpoint).resolve()


def test_train_without_the_encoder_names_the_command_that_makes_it(tmp_path, cache, capsys):
    from launch import train

    pretrain, encoder = write_pretrain_job(tmp_path, cache)
    rc = train.main([str(JOB), "--set", f"model.checkpoint={encoder}", "--set", f"model.pretrain={pretrain}",
                     "--set", f"run.root={tmp_path / 'runs'}", "--set", f"data.path={cache}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert f"model.checkpoint: {encoder} does not exist yet" in err[0]
    assert f"launch/pretrain.py {pretrain}" in err[0] and "launch/sweep.py" in err[0]
    assert not (tmp_path / "runs").exists() and not encoder.parent.exists()


# ---------------------------------------------------------------- bad input, dry run

def _other_arch(tmp: Path, cache: Path) -> tuple[Path, Path]:
    job, enc = write_pretrain_job(tmp, cache)
    job.write_text(job.read_text().replace('arch = "tiny"', 'arch = "resnet18"'))
    return job, enc


def _bad_key(tmp: Path, cache: Path) -> tuple[Path, Path]:
    job, enc = write_pretrain_job(tmp, cache)
    job.write_text(job.read_text().replace("temperature = 0.2", "temprature = 0.2"))
    return job, enc


def _odd_batch(tmp: Path, cache: Path) -> tuple[Path, Path]:
    job, enc = write_pretrain_job(tmp, cache)
    job.write_text(job.read_text().replace("batch_size = 16", "batch_size = 1", 1))
    return job, enc


BAD = {
    # the pretraining makes another file than model.checkpoint
    "output is not model.checkpoint": (lambda t, c: (write_pretrain_job(t, c)[0], t / "elsewhere" / "encoder.pt"),
                                       ["model.pretrain = {job} makes {made}", "model.checkpoint = {enc}"]),
    "pretraining job missing": (lambda t, c: (t / "nosuch.toml", t / "base" / "tiny_pretrain" / "encoder.pt"),
                                ["model.pretrain = {job}: job file not found"]),
    "unknown key in the pretraining job": (_bad_key, ["model.pretrain = {job}: unknown config key 'simclr.temprature'",
                                                      "did you mean 'simclr.temperature'"]),
    "invalid pretraining value": (_odd_batch, ["model.pretrain = {job}: data.batch_size = 1 must be >= 2"]),
    "pretraining of another arch": (_other_arch, ["makes an encoder with model.arch = 'resnet18'",
                                                  "this job has model.arch = 'tiny'"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_pretraining_is_one_line_exit_2_and_nothing_written(case, tmp_path, cache, capsys):
    make, expected = BAD[case]
    job, enc = make(tmp_path / "jobs", cache)
    made = tmp_path / "jobs" / "base" / "tiny_pretrain" / "encoder.pt"
    root = tmp_path / "runs"
    rc, out, err = run_main(capsys, sweep_args(root, job, enc, cache, "--cluster", "local"))
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text.format(job=job, made=made, enc=enc) in lines[0], (text, lines[0])
    assert not root.exists() and not (tmp_path / "jobs" / "base").exists()


def test_a_pretraining_folder_of_another_config_is_bad_input(tmp_path, cache, capsys):
    job, enc = write_pretrain_job(tmp_path / "jobs", cache)
    enc.parent.mkdir(parents=True)
    (enc.parent / "config.toml").write_text(job.read_text().replace("lr = 2e-3", "lr = 1e-3"))
    rc, out, err = run_main(capsys, sweep_args(tmp_path / "runs", job, enc, cache, "--cluster", "local"))
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and f"its run folder {enc.parent} holds a pretraining of another" in err
    assert not (tmp_path / "runs").exists() and sorted(p.name for p in enc.parent.iterdir()) == ["config.toml"]


def test_dry_run_shows_the_pretraining_and_the_dependency_and_writes_nothing(tmp_path, cache, capsys):
    job, enc = write_pretrain_job(tmp_path / "jobs", cache)
    root = tmp_path / "runs"
    rc, out, err = run_main(capsys, sweep_args(root, job, enc, cache, "--cluster", "slurm", "--dry-run",
                                               "--grid", "alpha=0,0.1", "--name", "dry"))
    assert rc == 0, err
    assert f"pretraining {job} -> {enc}: the base encoder of 2 run(s)" in out
    assert re.search(r"^pretraining tiny_pretrain +- +would submit$", out, re.M), out
    assert out.count("would submit after the pretraining") == 2
    # two sbatch scripts: the pretraining (one job) and the array that waits for it
    pre, array = out.split("# the sbatch script of the job array")
    assert "#SBATCH --job-name=advft-dry-pretrain" in pre and "--array" not in pre
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --dependency=afterok:PRETRAINING_JOB_ID",
                 "#SBATCH --kill-on-invalid-dep=yes"):
        assert line in array, line
    assert "nothing submitted, nothing written" in out
    assert not root.exists() and not (tmp_path / "jobs" / "base").exists()


# ---------------------------------------------------------------- local sweeps

@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, cache):
    """Two runs whose base encoder a pretraining makes: one local sweep with --wait, wandb offline."""
    tmp = tmp_path_factory.mktemp("local")
    job, enc = write_pretrain_job(tmp / "jobs", cache)
    argv = sweep_args(tmp / "runs", job, enc, cache, "--cluster", "local", "--grid", "alpha=0,0.1", "--name", "sw",
                      sets=("run.wandb=auto",))
    from contextlib import redirect_stderr, redirect_stdout
    from io import StringIO

    out, err = StringIO(), StringIO()
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    try:
        with redirect_stdout(out), redirect_stderr(err):
            rc = S.main([*argv, "--wait"])
    finally:
        mp.undo()
    return {"dir": tmp / "runs" / "sw", "job": job, "enc": enc, "argv": argv, "rc": rc, "out": out.getvalue(),
            "err": err.getvalue()}


def test_local_sweep_pretrains_once_then_runs_the_grid(local_sweep):
    d, out, enc = local_sweep["dir"], local_sweep["out"], local_sweep["enc"]
    assert local_sweep["rc"] == 0, out + local_sweep["err"]
    rec = read_sweep(d)
    (key, pre), = rec["pretraining"].items()
    assert key == str(enc.parent) and pre["dir"] == str(enc.parent) and pre["cluster"] == "local"
    assert pre["job_id"] and pre["encoder"] == str(enc) and pre["job"] == str(local_sweep["job"])
    assert sorted(pre["runs"]) == sorted(rec["runs"]) and pre["last_decision"] == "submit"
    # first the pretraining job, then (after it finished) the array of the two runs
    first, second = rec["submissions"]
    assert first["job_ids"] == [pre["job_id"]] and first["pretraining"] == [key] and "runs" not in first
    assert sorted(second["runs"]) == sorted(rec["runs"]) and pre["job_id"] not in second["job_ids"]
    assert status(enc.parent) == "finished" and enc.is_file() and len(starts(enc.parent)) == 1
    for name, entry in rec["runs"].items():
        assert status(d / name) == "finished" and entry["job_id"] in second["job_ids"]
        assert starts(d / name)[0]["time"] >= time.strftime("%Y-%m-%dT%H:%M:%S%z",
                                                            time.localtime(int(enc.stat().st_mtime)))
    # what the user saw: the plan with the runs waiting, the pretraining's progress, then the runs
    assert out.count("waits for the pretraining") == 2
    assert f"pretraining tiny_pretrain (job {pre['job_id']}): finished" in out
    assert out.index(": finished") < out.rindex("submitted")
    # pretraining -> fine-tuning -> report, end to end: the sweep ends with the report of both runs
    assert out.rstrip().splitlines()[-1] == f"report: {d / 'REPORT.md'}"
    report = (d / "REPORT.md").read_text()
    assert all(f"`{name}`" in report for name in rec["runs"]) and "- runs: 2: 2 finished" in report


def test_the_pretraining_and_the_runs_mirror_to_wandb_with_their_job_types(local_sweep):
    from wandb_log import segment

    enc = local_sweep["enc"]
    kinds = {}
    for folder in [enc.parent, *(p for p in local_sweep["dir"].iterdir() if (p / "config.toml").is_file())]:
        seg, = (folder / "wandb").glob("offline-run-*")
        run = segment(seg)["run"]
        assert run.run_id == (folder / "wandb_id").read_text().strip()
        kinds[folder.name] = run.job_type
    assert kinds.pop("tiny_pretrain") == "pretrain" and sorted(kinds.values()) == ["finetune", "finetune"]


def test_a_second_sweep_submits_nothing_and_does_not_pretrain_again(local_sweep, capsys):
    d, enc = local_sweep["dir"], local_sweep["enc"]
    before = read_sweep(d)
    encoder_mtime = enc.stat().st_mtime_ns
    rc, out, err = run_main(capsys, local_sweep["argv"])
    assert rc == 0, out + err
    assert "nothing to submit" in out and out.count("finished (skipped)") == 2
    assert re.search(r"^pretraining tiny_pretrain +\d+ +finished \(cached\)$", out, re.M), out
    rec = read_sweep(d)
    assert rec["submissions"] == before["submissions"]
    assert next(iter(rec["pretraining"].values()))["last_decision"] == "finished"
    assert len(starts(enc.parent)) == 1 and enc.stat().st_mtime_ns == encoder_mtime
    # a new grid point needs no waiting: the encoder is there (dry run: what would happen)
    rc, out, _ = run_main(capsys, local_sweep["argv"][:-4] + ["--grid", "alpha=0,0.1,1", "--name", "sw",
                                                             "--dry-run"])
    assert rc == 0 and out.count("finished (skipped)") == 2 and "after the pretraining" not in out
    assert re.search(r"^alpha=1-\w+ +- +would submit$", out, re.M), out


def test_debug_sweep_pretrains_in_this_process_then_runs(tmp_path, cache, capsys):
    import torch

    job, enc = write_pretrain_job(tmp_path / "jobs", cache)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the local jobs (cpus_per_task = 1): 2 threads on a busy machine run 4x slower
    try:
        rc, out, err = run_main(capsys, sweep_args(tmp_path / "runs", job, enc, cache, "--cluster", "debug",
                                                   "--name", "dbg"))
    finally:
        torch.set_num_threads(threads)
    assert rc == 0, out + err
    assert "pretraining tiny_pretrain: running in this process" in out
    rec = read_sweep(tmp_path / "runs" / "dbg")
    assert status(enc.parent) == "finished" and [status(Path(e["dir"])) for e in rec["runs"].values()] == ["finished"]
    assert [len(s["job_ids"]) for s in rec["submissions"]] == [1, 1]


def test_a_failing_pretraining_exits_1_naming_its_log_and_submits_no_run(tmp_path, cache, capsys):
    # a diverging lr: valid input, it fails (non-finite loss) only once the job runs
    job, enc = write_pretrain_job(tmp_path / "jobs", cache, lr=DIVERGE)
    root = tmp_path / "runs"
    rc, out, err = run_main(capsys, sweep_args(root, job, enc, cache, "--cluster", "local", "--grid",
                                               "alpha=0,0.1", "--name", "bad", "--wait"))
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, err
    log = Path(lines[0].rsplit("log: ", 1)[1])
    assert lines[0].startswith(f"error: the pretraining {enc.parent} failed") and "no run was submitted" in lines[0]
    assert log.is_file() and "NonFiniteLossError" in log.read_text()
    rec = read_sweep(root / "bad")
    assert [s.get("pretraining") for s in rec["submissions"]] == [[str(enc.parent)]]
    assert not any(e.get("job_id") for e in rec["runs"].values())
    assert not any((root / "bad" / n).exists() for n in rec["runs"]) and not enc.exists()


def test_a_sweep_started_while_the_pretraining_runs_reuses_its_job(tmp_path, cache, capsys, monkeypatch):
    job, enc = write_pretrain_job(tmp_path / "jobs", cache)
    argv = sweep_args(tmp_path / "runs", job, enc, cache, "--cluster", "local", "--name", "twice",
                      sets=("optim.steps=2",))
    # the pretraining waits at its first log step until the second sweep has decided (tests/faults/hold.py):
    # it is running when that sweep looks, however fast this machine is
    held = tmp_path / "hold"
    env = {**os.environ, "WANDB_MODE": "disabled", **hold.environment(held, until="release")}
    first = subprocess.Popen([sys.executable, "launch/sweep.py", *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    wait = sweep_cli.wait_pretraining  # where the sweep's passes call it

    def release_then_wait(*args, **kwargs):  # the second sweep has decided: let the pretraining go on
        hold.release(held)
        return wait(*args, **kwargs)

    monkeypatch.setattr(sweep_cli, "wait_pretraining", release_then_wait)
    try:
        hold.wait_held(held, alive=lambda: first.poll() is None)
        (pre,) = read_sweep(tmp_path / "runs" / "twice")["pretraining"].values()
        rc, out, err = run_main(capsys, argv)
        out1, err1 = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0 and rc == 0, out1 + err1 + out + err
    assert re.search(rf"^pretraining tiny_pretrain +{pre['job_id']} +queued or running \(reused\)$", out, re.M), out
    rec = read_sweep(tmp_path / "runs" / "twice")
    (run,) = [Path(e["dir"]) for e in rec["runs"].values()]
    wait_for(lambda: status(run) in ("finished", "failed"), "the run to end")  # neither sweep waits for it
    kinds = sorted("pretraining" if "pretraining" in s else "runs" for s in rec["submissions"])
    assert kinds == ["pretraining", "runs"]  # one pretraining, one array: each submitted once
    assert len(starts(enc.parent)) == 1 and status(enc.parent) == "finished"
    assert [status(Path(e["dir"])) for e in rec["runs"].values()] == ["finished"]


# ---------------------------------------------------------------- SLURM (the local test cluster)

def dependency(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    return re.search(r"Dependency=(\S+)", out).group(1)


@pytest.mark.slurm
def test_slurm_array_depends_afterok_on_the_pretraining_and_all_complete(slurm, tmp_path, cache, capsys,
                                                                         monkeypatch):
    job, enc = write_pretrain_job(tmp_path / "jobs", cache)
    d = tmp_path / "runs" / "dep"
    slurm.append(d)
    # the pretraining cannot end before the test releases it (tests/faults/hold.py): what the sweep and
    # SLURM show meanwhile does not depend on how fast this machine is
    held = tmp_path / "hold"
    for k, v in hold.environment(held, until="release").items():
        monkeypatch.setenv(k, v)
    rc, out, err = run_main(capsys, sweep_args(tmp_path / "runs", job, enc, cache, "--cluster", "slurm",
                                               "--grid", "alpha=0,0.1", "--name", "dep"))
    assert rc == 0, out + err
    assert status(enc.parent) != "finished"  # returned before the pretraining ended: SLURM holds the array
    rec = read_sweep(d)
    (pre,) = rec["pretraining"].values()
    pid = pre["job_id"]
    ids = sorted(e["job_id"] for e in rec["runs"].values())
    array = ids[0].split("_")[0]
    assert ids == [f"{array}_0", f"{array}_1"] and pre["cluster"] == "slurm"
    assert out.count("submitted, starts after the pretraining") == 2
    # the held pretraining has not completed: the array is still held by its dependency
    assert dependency(array) == f"afterok:{pid}(unfulfilled)", dependency(array)
    states = subprocess.run(["squeue", "-h", "-r", "-j", array, "-o", "%T"], capture_output=True, text=True,
                            timeout=30).stdout.split()
    assert states == ["PENDING", "PENDING"], states
    # a rerun meanwhile submits nothing and reuses the pretraining job
    rc, out, err = run_main(capsys, sweep_args(tmp_path / "runs", job, enc, cache, "--cluster", "slurm",
                                               "--grid", "alpha=0,0.1", "--name", "dep"))
    assert rc == 0 and "nothing to submit" in out, out + err
    assert len(read_sweep(d)["submissions"]) == 2
    hold.release(held)
    wait_for(lambda: all(status(Path(e["dir"])) in ("finished", "failed") for e in rec["runs"].values()),
             "the runs to end", timeout_s=400, poll_s=1.0)
    assert status(enc.parent) == "finished" and len(starts(enc.parent)) == 1
    assert all(status(Path(e["dir"])) == "finished" for e in rec["runs"].values())
    env = dict(os.environ)
    wait_sacct(env, pid, ["COMPLETED"])
    wait_sacct(env, array, [f"{array}_0|COMPLETED", f"{array}_1|COMPLETED"], "JobID,State", sort=True)
    # the runs started only after the pretraining had ended
    end = subprocess.run(["sacct", "-n", "-X", "-P", "-j", pid, "-o", "End"], capture_output=True, text=True,
                         timeout=30).stdout.split()[0]
    starts_ = subprocess.run(["sacct", "-n", "-X", "-P", "-j", array, "-o", "Start"], capture_output=True,
                             text=True, timeout=30).stdout.split()
    assert starts_ and all(s >= end for s in starts_), (end, starts_)


@pytest.mark.slurm
def test_slurm_a_failing_pretraining_cancels_the_array_that_waits_for_it(slurm, tmp_path, cache, capsys):
    job, enc = write_pretrain_job(tmp_path / "jobs", cache, lr=DIVERGE)
    d = tmp_path / "runs" / "cancel"
    slurm.append(d)
    rc, out, err = run_main(capsys, sweep_args(tmp_path / "runs", job, enc, cache, "--cluster", "slurm",
                                               "--name", "cancel", "--wait"))
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1, out + err
    assert lines[0].startswith(f"error: the pretraining {enc.parent} failed") and "SLURM cancels the runs" in lines[0]
    assert "NonFiniteLossError" in Path(lines[0].rsplit("log: ", 1)[1]).read_text()
    rec = read_sweep(d)
    (pre,) = rec["pretraining"].values()
    ((name, entry),) = rec["runs"].items()
    array = entry["job_id"].split("_")[0]
    env = dict(os.environ)
    wait_sacct(env, pre["job_id"], ["FAILED"])
    wait_sacct(env, array, ["CANCELLED"])  # --kill-on-invalid-dep: never left pending forever
    assert not (d / name).exists() and not enc.exists()
