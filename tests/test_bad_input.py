"""Malformed input through the real command lines (``launch/train.py``, ``launch/sweep.py``, ``python -m
data_prep``), each in its own process: exit 2, ONE line on stderr naming the key, path or value and what is
valid, no traceback, and nothing written or submitted (the runs folder and the output folder are untouched).

Each case is recorded for RELIABILITY.md (tests/faults/record.py).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_JOB
from faults.record import record

ROOT = Path(__file__).resolve().parent.parent
JOB = TINY_JOB


def train(*sets: str, job: str = "{job}", flags: tuple[str, ...] = ()) -> list[str]:
    base = ["model.checkpoint={enc}", "data.path={cache}", "run.root={runs}"]
    return ["launch/train.py", job, *(x for s in (*base, *sets) for x in ("--set", s)), *flags]


def sweep(*extra: str, sets: tuple[str, ...] = (), job: str = "{job}") -> list[str]:
    base = ["model.checkpoint={enc}", "data.path={cache}", "run.root={runs}"]
    return ["launch/sweep.py", "--job", job, *(x for s in (*base, *sets) for x in ("--set", s)), *extra]


def prep(*args: str) -> list[str]:
    return ["-m", "data_prep", *args]


LOCAL = ("--cluster", "local")  # a real submission if the input got through (none may)
DRY = ("--dry-run",)
Case = tuple[list[str], list[str], dict[str, str]]


def c(argv: list[str], *expected: str, env: dict[str, str] | None = None) -> Case:
    """A case: the command line, the substrings its one error line must hold, extra environment."""
    return argv, list(expected), env or {}


CASES: dict[str, Case] = {
    # ---- launch/train.py: keys, types, ranges
    "train unknown key": c(train("optim.lrr=1"), "unknown config key 'optim.lrr'", "did you mean 'optim.lr'"),
    "train unknown section in job file": c(train(job="{files}/unknown_section.toml"),
                                           "unknown config section 'optimizer'", "sections: data, model"),
    "train unknown key in job file": c(train(job="{files}/unknown_key.toml"),
                                       "unknown config key 'optim.learning_rate'"),
    "train wrong type (--set)": c(train("optim.steps=ten"), "optim.steps: expected an integer", "'ten'"),
    "train wrong type (job file)": c(train(job="{files}/wrong_type.toml"), "optim.lr: expected a number", "'fast'"),
    "train not a boolean": c(train("run.compile=maybe"), "run.compile: expected true or false"),
    "train section not a table": c(train(job="{files}/not_a_table.toml"), "[data] must be a table"),
    "train alpha < 0": c(train("alpha=-1"), "loss.alpha = -1.0 must be >= 0"),
    "train eps = 0": c(train("attack.eps=0"), "attack.eps = 0.0 must be in (0, 255]", "8 means 8/255"),
    "train eps > 255": c(train("attack.eps=300"), "attack.eps = 300.0 must be in (0, 255]"),
    "train betas not a pair": c(train("optim.betas=0.9"), "optim.betas: expected 2 numbers"),
    "train unknown arch": c(train("model.arch=vgg"), "model.arch = 'vgg' is not valid", "resnet50, resnet18, tiny"),
    "train warmup > steps": c(train("optim.warmup_steps=100"),
                              "optim.warmup_steps = 100 must be between 0 and optim.steps = 8"),
    "train keep_last = 0": c(train("run.keep_last=0"), "run.keep_last = 0 must be >= 1"),
    "train batch not divisible by ranks": c(train(), "data.batch_size = 16 is not divisible by the world size 3",
                                            env={"WORLD_SIZE": "3"}),
    "train --set without '='": c(train("alpha"), "--set expects KEY=VALUE", "'alpha'"),
    "train unknown flag": c(train(flags=("--resume", "x")), "unrecognized arguments: --resume"),
    "train uncatchable stop signal": c(train(flags=("--stop-signals", "KILL")),
                                       "--stop-signals", "'KILL' is not a signal that can be caught"),
    "train ce_head without a head": c(train("attack.objective=ce_head"),
                                      "attack.objective = 'ce_head' needs model.head"),
    # "needs the ffcv package" where it is not installed, else the missing .beton: either names ffcv
    "train ffcv format, no ffcv or no data": c(train("data.format=ffcv", "data.path={files}/no-such-ffcv.beton"),
                                               "ffcv"),
    # ---- launch/train.py: paths and files
    "train missing data path": c(train("data.format=folder", "data.path={files}/no-such-dataset"),
                                 "data.path: ", "no-such-dataset does not exist"),
    "train missing checkpoint": c(train("model.checkpoint={files}/no-such.pt"),
                                  "model.checkpoint: ", "no-such.pt does not exist"),
    "train empty checkpoint key": c(train("model.checkpoint="), "model.checkpoint is empty"),
    "train checkpoint is a directory": c(train("model.checkpoint={files}"), "model.checkpoint: ", "is a directory"),
    "train missing head": c(train("model.head={files}/no-head.pt"), "model.head: ", "no-head.pt does not exist"),
    "train checkpoint of another arch": c(train("model.checkpoint={files}/resnet18.pt"),
                                          "resnet18.pt", "declares arch='resnet18' but arch='tiny' was requested"),
    "train bare state dict of another arch": c(train("model.checkpoint={files}/resnet18_bare.pt"),
                                               "resnet18_bare.pt", "do not fit a tiny encoder"),
    "train checkpoint of another stem": c(train("model.checkpoint={files}/tiny_imagenet.pt"),
                                          "tiny_imagenet.pt", "stem='imagenet'"),
    "train garbage checkpoint": c(train("model.checkpoint={files}/garbage.pt"),
                                  "garbage.pt", "damaged or not a torch checkpoint"),
    "train truncated checkpoint": c(train("model.checkpoint={files}/truncated.pt"),
                                    "truncated.pt", "damaged or not a torch checkpoint"),
    "train head of the wrong width": c(train("model.head={files}/head64.pt"),
                                       "head64.pt", "head expects 64-d features, the encoder gives 128-d"),
    # ---- launch/train.py: unreadable job files, names that leave the runs folder
    "train job file is a directory": c(train(job="{files}/job-dir"), "job-dir is a directory"),
    "train job file not UTF-8": c(train(job="{files}/latin1.toml"), "latin1.toml is not UTF-8 text"),
    "train job file not TOML": c(train(job="{files}/broken.toml"), "broken.toml is not valid TOML", "line 1"),
    "train job file missing": c(train(job="{files}/no-such-job.toml"), "job file not found", "no-such-job.toml"),
    "train run name with ..": c(train("run.name=../escape"), "run.name = '../escape' is not a valid name"),
    "train run name with /": c(train("run.name=a/b"), "run.name = 'a/b' is not a valid name"),
    "train absolute run name": c(train("run.name=/tmp/x"), "run.name = '/tmp/x' is not a valid name"),
    "train empty run name": c(train("run.name="), "run.name = '' is not a valid name"),
    # ---- launch/sweep.py: grids
    "sweep grid without '='": c(sweep("--grid", "alpha", *DRY), "--grid expects KEY=v1,v2", "'alpha'"),
    "sweep empty grid": c(sweep("--grid", "alpha=", *LOCAL), "--grid alpha: empty value"),
    "sweep empty grid value": c(sweep("--grid", "alpha=0,,1", *LOCAL), "--grid alpha: empty value in '0,,1'"),
    "sweep grid without a key": c(sweep("--grid", "=1", *DRY), "--grid expects KEY=v1,v2", "'=1'"),
    "sweep duplicate grid key": c(sweep("--grid", "alpha=0", "--grid", "loss.alpha=1", *LOCAL),
                                  "the key loss.alpha is given twice"),
    "sweep unknown grid key": c(sweep("--grid", "alpah=0,1", *DRY), "unknown config key 'alpah'", "'alpha'"),
    "sweep grid and --set on one key": c(sweep("--grid", "alpha=0,1", *LOCAL, sets=("alpha=0",)),
                                         "loss.alpha is also given with --set"),
    "sweep grid over run.root": c(sweep("--grid", "run.root=a,b", *DRY), "sets run.name and run.root itself"),
    "sweep wrong type in grid": c(sweep("--grid", "lr=fast,1e-3", *LOCAL), "optim.lr: expected a number", "'fast'"),
    "sweep out-of-range grid value": c(sweep("--grid", "alpha=0,-1", *LOCAL), "loss.alpha = -1.0 must be >= 0"),
    "sweep unbalanced brackets": c(sweep("--grid", "optim.betas=(0.9,0.95", *DRY), "unbalanced brackets", "(0.9,0.95"),
    "sweep two values, one config": c(sweep("--grid", "alpha=0.1,1e-1", *LOCAL), "give the same config"),
    # ---- launch/sweep.py: names, files, cluster
    "sweep name with ..": c(sweep("--name", "../escape", *LOCAL), "--name = '../escape' is not a valid name"),
    "sweep name with /": c(sweep("--name", "a/b", *LOCAL), "--name = 'a/b' is not a valid name"),
    "sweep name ..": c(sweep("--name", "..", *LOCAL), "--name = '..' is not a valid name"),
    "sweep run.name set": c(sweep(*LOCAL, sets=("run.name=x",)), "the sweep names its runs"),
    "sweep job file is a directory": c(sweep(*DRY, job="{files}/job-dir"), "job-dir is a directory"),
    "sweep job file not TOML": c(sweep(*LOCAL, job="{files}/broken.toml"), "broken.toml is not valid TOML"),
    "sweep missing checkpoint": c(sweep(*LOCAL, sets=("model.checkpoint={files}/no-such.pt",)),
                                  "model.checkpoint: ", "no-such.pt does not exist"),
    "sweep checkpoint of another arch": c(sweep("--grid", "alpha=0,1", *LOCAL,
                                                sets=("model.checkpoint={files}/resnet18.pt",)),
                                          "model.checkpoint: ", "declares arch='resnet18'"),
    "sweep garbage checkpoint": c(sweep(*DRY, sets=("model.checkpoint={files}/garbage.pt",)),
                                  "model.checkpoint: ", "garbage.pt", "damaged or not a torch checkpoint"),
    "sweep unknown cluster": c(sweep("--cluster", "aws"), "--cluster 'aws' is not valid", "auto, slurm, local, debug"),
    "sweep unknown profile": c(sweep("--profile", "nosuch", *LOCAL), "cluster profile 'nosuch' not found"),
    "sweep time limit 0": c(sweep("--timeout-min", "0", *LOCAL), "timeout_min = 0 must be >= 1"),
    "sweep nodes not a number": c(sweep("--nodes", "two", *LOCAL), "nodes must be an integer"),
    # ---- python -m data_prep
    "prep missing source": c(prep("dali", "{files}/no-such-data", "{out}"), "source ", "no-such-data does not exist"),
    "prep source is a file": c(prep("dali", "{files}/garbage.pt", "{out}"), "garbage.pt is not a folder"),
    "prep unknown split": c(prep("dali", "{img}", "{out}", "--split", "nope"), "expected ", "/nope/<class>/<image>"),
    "prep output is a file": c(prep("dali", "{img}", "{files}/garbage.pt"), "garbage.pt exists and is not a folder"),
    "prep output under /proc": c(prep("dali", "{img}", "/proc/advft-prep-out"),
                                 "cannot write to the output folder /proc/advft-prep-out"),
    "prep output's parent is a file": c(prep("dali", "{img}", "{files}/garbage.pt/out"),
                                        "garbage.pt is a file, not a folder"),
    "prep .beton is an existing folder": c(prep("ffcv", "{img}", "{files}/folder.beton"),
                                           "folder.beton is an existing folder"),
    "prep DALI list is an existing folder": c(prep("dali", "{img}", "{files}/dali-out"),
                                              "train.txt is an existing folder"),
    "prep negative workers": c(prep("dali", "{img}", "{out}", "--workers", "-3"), "--workers must be >= 0"),
    "prep workers not a number": c(prep("ffcv", "{img}", "{out}", "--workers", "x"),
                                   "--workers: invalid int value: 'x'"),
    "prep bad shard range": c(prep("dali", "{img}", "{out}", "--shard-range", "a:b"), "expected START:END", "'a:b'"),
    "prep shard range outside shards": c(prep("dali", "{img}", "{out}", "--shards", "2", "--shard-range", "5:1"),
                                         "--shard-range 5:1 must satisfy"),
    "prep negative shards": c(prep("dali", "{img}", "{out}", "--shards", "-1"), "--shards must be >= 0"),
    "prep probability > 1": c(prep("ffcv", "{img}", "{out}", "--compress-prob", "2"),
                              "--compress-prob must be in [0, 1]"),
    "prep jpeg quality 500": c(prep("ffcv", "{img}", "{out}", "--jpeg-quality", "500"),
                               "--jpeg-quality must be in [1, 100]"),
    "prep unknown write mode": c(prep("ffcv", "{img}", "{out}", "--write-mode", "zip"), "invalid choice: 'zip'"),
    "prep unknown subcommand": c(prep("tfrecord", "{img}", "{out}"), "invalid choice: 'tfrecord'", "'ffcv', 'dali'"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory, base_encoder) -> dict[str, str]:
    """Malformed job files and checkpoints, a valid image folder, and the paths the commands may not touch."""
    from advft.models import build_encoder, encoder_state_dict

    d = tmp_path_factory.mktemp("bad-input")
    f = d / "files"
    f.mkdir()
    (f / "job-dir").mkdir()
    (f / "folder.beton").mkdir()
    (f / "dali-out" / "train.txt").mkdir(parents=True)
    (f / "latin1.toml").write_bytes("[run]\nname = 'caf\u00e9'\n".encode("latin-1"))
    (f / "broken.toml").write_text("[run\nname = 1\n")
    (f / "unknown_section.toml").write_text("[optimizer]\nlr = 1e-3\n")
    (f / "unknown_key.toml").write_text("[optim]\nlearning_rate = 1e-3\n")
    (f / "wrong_type.toml").write_text("[optim]\nlr = \"fast\"\n")
    (f / "not_a_table.toml").write_text("data = 3\n")
    torch.manual_seed(0)
    r18 = encoder_state_dict(build_encoder("resnet18", "cifar"))
    torch.save({"format": "advft-encoder", "model": r18, "arch": "resnet18", "stem": "cifar", "normalize": "none"},
               f / "resnet18.pt")
    torch.save(r18, f / "resnet18_bare.pt")
    torch.save({"format": "advft-encoder", "model": encoder_state_dict(build_encoder("tiny", "imagenet")),
                "arch": "tiny", "stem": "imagenet", "normalize": "none"}, f / "tiny_imagenet.pt")
    (f / "garbage.pt").write_bytes(b"this is not a checkpoint\n" * 10)
    data = base_encoder.read_bytes()
    (f / "truncated.pt").write_bytes(data[: len(data) // 2])
    torch.save({"weight": torch.zeros(10, 64), "bias": torch.zeros(10)}, f / "head64.pt")
    from PIL import Image

    for c in ("cat", "dog"):
        (d / "img" / "train" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(d / "img" / "train" / c / f"{i}.png")
    runs = d / "runs"
    (runs / "existing").mkdir(parents=True)
    (runs / "existing" / "keep.txt").write_text("a run folder that bad input must not touch\n")
    return {"job": str(JOB), "enc": str(base_encoder), "cache": str(d / "cache"), "runs": str(runs),
            "files": str(f), "img": str(d / "img"), "out": str(d / "prep-out")}


def shown(args: list[str], files: dict[str, str]) -> str:
    """The command as the report shows it: the settings every train/sweep case shares as $COMMON."""
    text = " ".join(["python", *args])
    common = " ".join(f"--set {s}" for s in ("model.checkpoint={enc}", "data.path={cache}", "run.root={runs}"))
    return (text.replace(common.format(**files), "$COMMON").replace(files["files"], "$BAD")
            .replace(files["runs"], "$RUNS").replace(str(ROOT) + "/", ""))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line_and_writes_nothing(case, files):
    template, expected, extra_env = CASES[case]
    args = [a.format(**files) for a in template]
    runs, out = Path(files["runs"]), Path(files["out"])
    before = snapshot(runs)
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **extra_env}
    env.pop("WORLD_SIZE", None) if "WORLD_SIZE" not in extra_env else None
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    line = lines[0] if len(lines) == 1 else ""
    named = all(s.format(**files) in line for s in expected)
    untouched = snapshot(runs) == before and not out.exists()
    ok = r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr and named and untouched
    program = "python -m data_prep" if args[0] == "-m" else args[0]
    record(f"bad input: {program}", case, f"exit {r.returncode}: {line or r.stderr.strip()[-300:]}", ok,
           "runs folder and output untouched" if untouched else "SOMETHING WAS WRITTEN",
           command=shown(args, files))
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.returncode == 2 and len(lines) == 1, (r.returncode, r.stderr[-3000:])
    assert named, (line, expected)
    assert untouched, "bad input wrote into the runs or output folder"
