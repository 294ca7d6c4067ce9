"""How advft is installed and where its jobs go: ``--cluster auto`` only picks a SLURM that answers, the private
submitit names launch/ relies on still exist as used, and ``requires-python`` tells the truth."""
from __future__ import annotations

import ast
import inspect
import os
import signal
import stat
import sys
import tomllib
from pathlib import Path

import pytest

import launch.cluster as K

ROOT = Path(__file__).resolve().parent.parent


def fake_slurm(bin_dir: Path, sinfo_rc: int, sinfo_err: str = "") -> None:
    """sbatch/srun that must never be called, and an sinfo answering with ``sinfo_rc``."""
    bin_dir.mkdir()
    for name, body in {"sbatch": "echo called >&2; exit 99", "srun": "exit 99",
                       "sinfo": f"echo '{sinfo_err}' >&2; [ {sinfo_rc} = 0 ] && echo debug; exit {sinfo_rc}"}.items():
        p = bin_dir / name
        p.write_text(f"#!/bin/sh\n{body}\n")
        p.chmod(p.stat().st_mode | stat.S_IXUSR)


def test_auto_is_local_when_the_slurm_client_is_installed_but_no_controller_answers(tmp_path, monkeypatch, capsys):
    fake_slurm(tmp_path / "bin", 1, "sinfo: fatal: Could not establish a configuration source")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    kind, note = K.choose_kind("auto")
    assert kind == "local" and "local processes" in note and "Could not establish" in note
    assert K.choose_kind("local") == ("local", "")  # asked for, not a fallback: nothing to explain


def test_auto_is_slurm_when_the_controller_answers(tmp_path, monkeypatch, capsys):
    fake_slurm(tmp_path / "bin", 0)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert K.choose_kind("auto") == ("slurm", "")


def _pinned(name: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec, = [d for d in deps if d.split(">")[0].split("<")[0].split("=")[0].strip() == name]
    return spec


def test_the_private_submitit_names_launch_uses_are_there_as_used():
    """launch/cluster.py renders --dry-run's script with ``_make_sbatch_string``, launch/job.py asks
    ``JobEnvironment._usr_sig()`` which signal requeues; both are private, so the version is pinned and this
    test fails when a release changes them."""
    import submitit
    from submitit.slurm.slurm import _make_sbatch_string

    from launch.profiles import load_profile, slurm_parameters

    low, high = (part.split("=")[-1].strip() for part in _pinned("submitit").split(">=")[1].split(",<"))
    version = tuple(int(x) for x in submitit.__version__.split(".")[:2])
    assert tuple(int(x) for x in low.split(".")[:2]) <= version < tuple(int(x) for x in high.split(".")[:2])
    params = set(inspect.signature(_make_sbatch_string).parameters)
    used = {"command", "folder", "map_count", "job_name", "dependency", "additional_parameters",
            *slurm_parameters(load_profile("local"), ["true"])}
    assert used <= params, used - params
    assert submitit.JobEnvironment._usr_sig() == getattr(signal, "SIG" + os.environ.get(
        "SUBMITIT_PREEMPT_SIGNAL", "USR2"))


def test_requires_python_is_the_oldest_python_the_code_runs_on():
    """The sources parse as the declared minimum's grammar, and this interpreter satisfies the minimum (CI runs
    the declared minimum: its grammar and standard library, tomllib included, are what the code uses)."""
    req = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert req.startswith(">=")
    minimum = tuple(int(x) for x in req[2:].split("."))
    assert sys.version_info[:2] >= minimum
    for folder in ("advft", "launch", "data_prep"):
        for path in (ROOT / folder).rglob("*.py"):
            ast.parse(path.read_text(), str(path), feature_version=minimum)


COMMANDS = {"advft-train": "launch/train.py", "advft-pretrain": "launch/pretrain.py", "advft-sweep": "launch/sweep.py",
            "advft-report": "launch/report.py", "advft-prep": None}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_the_installed_commands_and_the_scripts_run_from_anywhere_without_pythonpath(command, tmp_path):
    """``pip install -e .`` gives the console commands; ``python launch/X.py`` works from another folder with no
    PYTHONPATH, because launch/ is an installed package (no sys.path edits in the scripts)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    exe = Path(sys.executable).parent / command
    assert exe.is_file(), f"{command} is not installed next to {sys.executable}: run bash scripts/setup.sh"
    runs = [[str(exe), "--help"]]
    if COMMANDS[command]:
        runs.append([sys.executable, str(ROOT / COMMANDS[command]), "--help"])
    for argv in runs:
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "usage" in done.stdout.lower(), (argv, done.stderr[-2000:])


def test_no_script_edits_sys_path():
    for path in (ROOT / "launch").rglob("*.py"):
        assert "sys.path" not in path.read_text(), f"{path} edits sys.path; launch/ is an installed package"
