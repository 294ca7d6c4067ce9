"""Security: checkpoints are read only through ``torch.load(weights_only=True)``; a malicious pickle is refused
without running, wherever it is given (base encoder, head, a run's own checkpoint, a sweep); no secret from
the environment reaches run folders, manifests, wandb files or logs; run and sweep names cannot leave the
runs folder. Each check is recorded for RELIABILITY.md (tests/faults/record.py).
"""
from __future__ import annotations

import ast
import hashlib
import os
import pickle
import re
import uuid
from pathlib import Path

import pytest
import torch

from advft import checkpoint as ckpt
from advft import config as C
from advft.engine import Interrupted
from advft.fare import finetune
from faults import helpers as H
from faults.record import record
from launch.sweeper import grid as G

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("advft", "launch", "data_prep", "benchmarks", "scripts", "slurm")  # everything but the tests


# ---------------------------------------------------------------- weights_only everywhere

def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _scan(files: list[Path]) -> tuple[list[str], list[str], int]:
    """(checked torch.load calls, problems, grep hits). AST: every torch.load call has the literal keyword
    weights_only=True; grep: every textual ``torch.load(`` is one of those calls (or, in a comment or
    docstring, shows weights_only=True too); no unrestricted pickle loads."""
    calls, bad, grepped = [], [], 0
    for path in files:
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        text = path.read_text()
        checked_lines = set()
        for node in ast.walk(ast.parse(text)):
            where = f"{rel}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization", "pickle") \
                    and any(a.name in ("load", "loads") for a in node.names):
                bad.append(f"{where} imports {node.module}.load under another name: the scan could miss its calls")
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            if name in ("torch.load", "torch.serialization.load"):
                flag = kw.get("weights_only")
                calls.append(where)
                checked_lines.add(node.lineno)
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    bad.append(f"{where} {name} without weights_only=True")
            elif name in ("pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "dill.load"):
                bad.append(f"{where} {name}: unrestricted unpickling")
            elif name.endswith(("np.load", "numpy.load")) and "allow_pickle" in kw:
                flag = kw["allow_pickle"]
                if not (isinstance(flag, ast.Constant) and flag.value is False):
                    bad.append(f"{where} np.load with allow_pickle")
        for i, line in enumerate(text.splitlines(), 1):
            if re.search(r"\btorch\.load\(", line):
                grepped += 1
                if i not in checked_lines and "weights_only=True" not in line:
                    bad.append(f"{rel}:{i} 'torch.load(' the AST scan did not see as a checked call")
    return calls, bad, grepped


def test_every_torch_load_in_the_code_base_passes_weights_only_true(tmp_path):
    files = sorted(p for d in SHIPPED for p in (ROOT / d).rglob("*.py"))
    calls, bad, grepped = _scan(files)
    # the scanner catches what it is for (else this test could not fail)
    probe = tmp_path / "probe.py"
    probe.write_text("import torch, pickle\nx = torch.load('a', map_location='cpu')\n"
                     "y = torch.load('b', weights_only=False)\nz = pickle.loads(b'')\n"
                     "w = getattr(torch, 'load')  # torch.load(hidden)\n")
    caught = _scan([probe])[1]
    ok = not bad and len(calls) >= 2 and len(caught) == 4
    record("security", "torch.load calls in the shipped code",
           f"{len(calls)} torch.load call(s) in {len(files)} files ({grepped} grep hits), all weights_only=True; "
           f"no pickle.load(s)", ok, "; ".join(calls) if ok else "; ".join(bad))
    assert len(caught) == 4, caught
    assert not bad, bad
    assert len(calls) >= 2, calls  # the scan found the loaders it exists to check


# ---------------------------------------------------------------- malicious pickles

class _Payload:
    """Unpickling runs ``fn(*args)``: the stand-in for a checkpoint that executes code."""

    def __init__(self, fn, *args) -> None:
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _evil_files(d: Path) -> dict[str, tuple[Path, Path]]:
    """name -> (malicious file, the marker its payload would create)."""
    out = {}
    m = d / "marker-system"
    torch.save({"state_dict": {"convnet.conv1.weight": _Payload(os.system, f"mkdir {m}")}}, d / "system.pt")
    out["os.system in a torch zip"] = (d / "system.pt", m)
    m = d / "marker-legacy"
    torch.save({"model": _Payload(os.mkdir, str(m))}, d / "legacy.pt", _use_new_zipfile_serialization=False)
    out["os.mkdir in a legacy torch file"] = (d / "legacy.pt", m)
    m = d / "marker-pickle"
    (d / "plain.pkl").write_bytes(pickle.dumps(_Payload(exec, f"import os; os.mkdir({str(m)!r})"), protocol=4))
    out["exec in a plain pickle"] = (d / "plain.pkl", m)
    return out


@pytest.fixture(scope="module")
def evil(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    return _evil_files(tmp_path_factory.mktemp("evil"))


def _is_live(path: Path, marker: Path) -> bool:
    """The file really runs code when unpickled without weights_only (so the refusals are not vacuous)."""
    for unsafe_load in (lambda: torch.load(path, weights_only=False), lambda: pickle.loads(path.read_bytes())):
        try:
            unsafe_load()
        except Exception:  # noqa: BLE001 - the payload runs before the file's other content fails to load
            pass
        if marker.exists():
            break
    live = marker.exists()
    if live:
        marker.rmdir()
    return live


@pytest.mark.parametrize("variant", ["os.system in a torch zip", "os.mkdir in a legacy torch file",
                                     "exec in a plain pickle"])
def test_malicious_base_encoder_is_refused_without_running(variant, evil, tmp_path, base_encoder):
    path, marker = evil[variant]
    runs = tmp_path / "runs"
    sets = H.fault_sets(base_encoder, tmp_path / "cache", runs, "evil", f"model.checkpoint={path}")
    r = H.run_cli(["launch/train.py", *H.train_argv(sets)])
    line = H.one_error_line(r.stderr)
    ran = marker.exists()
    live = _is_live(path, marker)
    ok = r.returncode == 2 and bool(line) and not ran and not runs.exists() and live
    record("security", f"malicious base encoder: {variant}",
           f"launch/train.py exit {r.returncode}, payload not run, nothing written: '{line}'", ok,
           "the same file runs its payload under an unsafe load" if live else "payload inert: test vacuous")
    assert not ran, "the payload ran"
    assert r.returncode == 2 and line and str(path) in line, r.stderr[-2000:]
    assert not runs.exists()
    assert live


def test_malicious_head_and_sweep_checkpoint_are_refused(evil, tmp_path, base_encoder):
    path, marker = evil["os.system in a torch zip"]
    runs = tmp_path / "runs"
    sets = H.fault_sets(base_encoder, tmp_path / "cache", runs, "evil", f"model.head={path}")
    head = H.run_cli(["launch/train.py", *H.train_argv(sets)])
    sweep_sets = [s for s in H.fault_sets(base_encoder, tmp_path / "cache", runs, "x", f"model.checkpoint={path}")
                  if not s.startswith("run.name=")]
    sweep = H.run_cli(["launch/sweep.py", "--job", str(H.JOB), *(x for s in sweep_sets for x in ("--set", s)),
                       "--cluster", "local", "--grid", "alpha=0,0.1"])
    lines = [H.one_error_line(head.stderr), H.one_error_line(sweep.stderr)]
    ran = marker.exists()
    ok = [head.returncode, sweep.returncode] == [2, 2] and all(lines) and not ran and not runs.exists()
    record("security", "malicious head file and a sweep's base encoder",
           f"launch/train.py exit {head.returncode}, launch/sweep.py exit {sweep.returncode} (nothing submitted), "
           f"payload not run", ok, " | ".join(map(str, lines)))
    assert not ran
    assert [head.returncode, sweep.returncode] == [2, 2] and all(lines), (head.stderr[-2000:], sweep.stderr[-2000:])
    assert str(path) in lines[0] and "refused without running it" in lines[0]
    assert "model.checkpoint" in lines[1] and "refused without running it" in lines[1]
    assert not runs.exists()


def test_malicious_file_planted_as_the_newest_checkpoint_is_skipped_not_run(evil, tmp_path, base_encoder, caplog):
    path, marker = evil["os.system in a torch zip"]
    cfg = H.load_cfg(H.fault_sets(base_encoder, tmp_path / "cache", tmp_path / "runs", "planted"))
    polls = {"n": 0}

    def stop() -> bool:
        polls["n"] += 1
        return polls["n"] == 6

    with H.threads(), pytest.raises(Interrupted):
        finetune(cfg, should_stop=stop)
    planted = ckpt.ckpt_dir(cfg.run.dir) / "step_00000009.pt"
    planted.write_bytes(path.read_bytes())  # with a matching checksum: only weights_only stands in the way
    planted.with_name(planted.name + ".sha256").write_text(hashlib.sha256(planted.read_bytes()).hexdigest() + "\n")
    with H.threads():
        res = finetune(cfg)
    warned = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    ran = marker.exists()
    resumed = H.starts(cfg.run.dir)[-1]
    ok = not ran and res["status"] == "finished" and resumed == 6 and len(warned) == 1 and "step_00000009" in warned[0]
    record("security", "malicious file as a run's newest checkpoint (checksum matching)",
           f"skipped with a warning, payload not run; resumed from step {resumed} and finished", ok,
           warned[0] if warned else "no warning")
    assert not ran
    assert len(warned) == 1 and "Weights only load failed" in warned[0], warned
    assert resumed == 6 and res["status"] == "finished"


# ---------------------------------------------------------------- secrets

def _secrets() -> dict[str, str]:
    tag = uuid.uuid4().hex
    return {"WANDB_API_KEY": f"advft-test-secret-wandb-{tag}", "AWS_SECRET_ACCESS_KEY": f"advft-test-secret-aws-{tag}",
            "HF_TOKEN": f"advft-test-secret-hf-{tag}", "GITHUB_TOKEN": f"advft-test-secret-gh-{tag}"}


def _leaks(folder: Path, texts: list[str], secrets: dict[str, str]) -> list[str]:
    found = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            found += [f"{p.relative_to(folder)} holds {k}" for k, v in secrets.items() if v.encode() in data]
    for i, t in enumerate(texts):
        found += [f"output {i} holds {k}" for k, v in secrets.items() if v in t]
    return found


def test_no_secret_reaches_the_run_folder_or_the_logs(tmp_path, base_encoder):
    secrets = _secrets()
    env = H.child_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "elsewhere"), **secrets)
    sets = H.fault_sets(base_encoder, tmp_path / "cache", tmp_path / "runs", "secret", "optim.steps=3",
                        "optim.warmup_steps=1", "run.wandb=auto")
    r = H.run_cli(["launch/train.py", *H.train_argv(sets)], env=env)
    run_dir = tmp_path / "runs" / "secret"
    leaks = _leaks(run_dir, [r.stdout, r.stderr], secrets)
    wandb_files = [p for p in (run_dir / "wandb").rglob("*") if p.is_file()] if (run_dir / "wandb").is_dir() else []
    n = sum(1 for p in run_dir.rglob("*") if p.is_file())
    ok = r.returncode == 0 and not leaks and len(wandb_files) > 0 and (run_dir / "manifest.json").is_file()
    record("security", "planted WANDB_API_KEY + 3 other secrets, launch/train.py, wandb offline",
           f"{n} files of the run folder (manifest, metrics, {len(wandb_files)} wandb files, checkpoints) and "
           f"stdout/stderr grepped: no secret", ok, "; ".join(leaks) or f"exit {r.returncode}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert wandb_files, "wandb wrote nothing: the check would be vacuous"
    assert not leaks, leaks


def test_no_secret_reaches_a_sweep_folder_its_jobs_or_logs(tmp_path, base_encoder):
    secrets = _secrets()
    env = H.child_env(WANDB_MODE="offline", **secrets)
    root = tmp_path / "runs"
    sets = [s for s in H.fault_sets(base_encoder, tmp_path / "cache", root, "x", "optim.steps=2",
                                    "optim.warmup_steps=1", "run.wandb=auto") if not s.startswith("run.name=")]
    r = H.run_cli(["launch/sweep.py", "--job", str(H.JOB), *(x for s in sets for x in ("--set", s)),
                   "--cluster", "local", "--name", "secret", "--wait"], env=env)
    leaks = _leaks(root, [r.stdout, r.stderr], secrets)
    submitit = list((root / "secret" / ".submitit").rglob("*"))
    ok = r.returncode == 0 and not leaks and bool(submitit)
    record("security", "planted secrets, a local sweep (sweep.json, submitit pickles and logs, run folder)",
           f"{sum(1 for p in root.rglob('*') if p.is_file())} files and the sweep's output grepped: no secret", ok,
           "; ".join(leaks) or f"exit {r.returncode}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert not leaks, leaks


# ---------------------------------------------------------------- names

HOSTILE = ["..", ".", "../x", "x/..", "a/b", "/abs", "~", "x/../../y", "", "a\nb", "a b", "a\\b", "caf\u00e9",
           "..hidden", "x..y"]


def test_hostile_run_and_sweep_names_are_refused_and_grid_values_stay_inside_the_root(tmp_path):
    refused = []
    for name in HOSTILE:
        with pytest.raises(C.ConfigError, match="is not a valid name"):
            C.check_name(name, "run.name")
        refused.append(name)
    root = tmp_path / "runs"
    axes = G.parse_grid(["data.path=../../etc,/abs/path,a/../../b,..,~/x"])
    inside = []
    for point in G.expand(axes):
        cfg = C.load(H.JOB, point)
        name = G.run_name(cfg, axes)
        target = (root / "sweep" / name).resolve()
        inside.append(target.parent == (root / "sweep").resolve() and "/" not in name and ".." not in name)
    ok = len(refused) == len(HOSTILE) and all(inside)
    record("security", "hostile run/sweep names and grid values",
           f"{len(refused)} hostile names refused (.., /, absolute, empty, newline, ...); {len(inside)} hostile grid "
           f"values made into run names that stay inside the sweep folder", ok, ", ".join(map(repr, HOSTILE)))
    assert all(inside)
