"""Evaluation split over ranks gives exactly the numbers of one process (issue 13 item 5); ``eval.head`` and
the fp32 final evaluation (issue 12 items 4 and 6); the FARE task's compile / DDP order (issue 13 item 6)."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from advft.evaluate import evaluate, extract_features
from advft.models import load_encoder

# batch counts that do not divide by 2 ranks, and a short last batch: rank 1 has fewer rows to gather
PROBE_BATCHES, TEST_BATCHES, B = (16, 16, 16, 8), (16, 16, 10), 16


def _batches(sizes: tuple[int, ...], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g)) for n in sizes]


def _numbers(cfg, encoder_path: str) -> dict:
    """Features of the probe set and the evaluation's result, in this process (one rank or one of several)."""
    torch.set_num_threads(1)  # float results depend on the thread count: the same in every process
    enc = load_encoder(encoder_path, arch="tiny", stem="cifar").eval()
    probe, test = _batches(PROBE_BATCHES, 1), _batches(TEST_BATCHES, 2)
    rows: list[int] = []
    hook = enc.register_forward_hook(lambda m, i, o: rows.append(int(i[0].shape[0])))
    feats, labels = extract_features(enc, probe, torch.device("cpu"))
    hook.remove()
    res = evaluate(enc, lambda: probe, lambda: test, cfg=cfg, device=torch.device("cpu"), n_iter=3, n_targets=2,
                   seed=5, precision="fp32")
    return {"feats": feats, "labels": labels, "res": res, "rows": sum(rows)}


def _rank(rank: int, world: int, port: int, cfg, encoder_path: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        got = _numbers(cfg, encoder_path)
        torch.save(got, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_two_gloo_ranks_evaluate_exactly_what_one_process_does(tiny_cfg, base_encoder, tmp_path):
    cfg = tiny_cfg("eval.probe_epochs=20")
    threads = torch.get_num_threads()
    try:
        one = _numbers(cfg, str(base_encoder))
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_rank, args=(2, _free_port(), cfg, str(base_encoder), str(tmp_path)), nprocs=2)
    for r in (0, 1):
        two = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        # the probe sees the same features in the same order, so it is fitted on identical input
        assert torch.equal(two["feats"], one["feats"]) and torch.equal(two["labels"], one["labels"])
        assert two["res"] == one["res"], (r, json.dumps(two["res"]), json.dumps(one["res"]))
    assert one["res"]["n_test"] == sum(TEST_BATCHES) and 0 < one["res"]["n_clean_correct"]
    # each rank ran the encoder on its share only: batches 0 and 2 on rank 0, 1 and 3 on rank 1
    rows = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["rows"] for r in (0, 1)]
    assert one["rows"] == sum(PROBE_BATCHES) and rows == [16 + 16, 16 + 8]


def _fare_task(cfg):
    from advft.distributed import run_precision
    from advft.fare import FareTask

    task = FareTask(cfg)
    task.build(torch.device("cpu"), run_precision(cfg.run.precision, torch.device("cpu")))
    task.prepare(SimpleNamespace(num_processes=1, process_index=0))
    return task


@pytest.fixture
def head_file(tmp_path) -> Path:
    path = tmp_path / "head.pt"
    torch.save({"weight": torch.randn(10, 128), "bias": torch.zeros(10)}, path)
    return path


@pytest.mark.parametrize("which", ["probe", "fixed"])
def test_eval_head_chooses_between_the_probe_and_the_fixed_head(which, tiny_cfg, head_file):
    task = _fare_task(tiny_cfg(f"model.head={head_file}", f"eval.head={which}"))
    assert task.head is not None  # model.head is loaded either way (the ce_head attack objective may use it)
    res = task._eval(strong=False, check=lambda: None)
    assert ("probe_n" in res) == (which == "probe"), res


def test_the_final_evaluation_runs_in_fp32_under_a_bf16_run(tiny_cfg, monkeypatch):
    task = _fare_task(tiny_cfg("run.precision=bf16", "eval.probe_epochs=2", "eval.test_size=16"))
    seen: list[bool] = []
    task.phi.register_forward_hook(lambda m, i, o: seen.append(torch.is_autocast_enabled("cpu")))
    strong = task._eval(strong=True, check=lambda: None)
    assert seen and not any(seen) and strong["precision"] == "fp32"  # features, probe input, attack: fp32
    seen.clear()
    weak = task._eval(strong=False, check=lambda: None)
    assert seen and all(seen) and weak["precision"] == "bf16"  # a periodic evaluation keeps the run's precision


def test_the_ddp_module_is_compiled_and_the_attack_keeps_the_compiled_plain_encoder(tiny_cfg):
    from advft.fare import FareTask

    wrapped = []

    def prepare_model(m: nn.Module) -> nn.Module:  # stands in for accelerate's DDP wrapping
        wrapped.append(m)
        return nn.Sequential(m)

    task = FareTask(tiny_cfg("run.compile=true"))
    task.build(torch.device("cpu"), "fp32")
    task.prepare(SimpleNamespace(num_processes=2, process_index=0, prepare_model=prepare_model))
    m = task.models
    assert wrapped == [task.phi]  # DDP wraps the plain encoder, not a compiled one
    assert isinstance(m.phi_fn, torch._dynamo.eval_frame.OptimizedModule) and m.phi_fn._orig_mod is task.phi
    assert isinstance(m.phi_ddp, torch._dynamo.eval_frame.OptimizedModule)
    assert isinstance(m.phi_ddp._orig_mod, nn.Sequential) and m.phi_ddp._orig_mod[0] is task.phi


@pytest.mark.dist
def test_compiled_ddp_on_two_gloo_ranks_equals_eager(tiny_cfg, tmp_path):
    """Two FARE steps on 2 gloo ranks through launch/train.py, run.compile true vs false, same everything else.

    Tolerance: inductor fuses and reorders float32 reductions, so compiled and eager differ in the last bits.
    The first step's loss (before any update) agrees to rtol 1e-4. The weights: AdamW's first updates are
    about lr * sign(g) whatever the gradient's size, so a near-zero gradient element that rounding puts on the
    other side of zero moves its weight by up to 2 lr per step the other way. Compile alone (one process, no
    DDP) flips a few % of the weights so; a rank training alone on its half of the batch (the failure this
    guards against: a missed all-reduce) moves most of them. So: at most 20 % of the weights beyond rtol
    1e-4 / atol 1e-5, none by more than 2 lr per step. Two steps (more would let APGD's sign steps amplify
    the bits), BN in eval mode."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    cfg = tiny_cfg()
    sets = [f"model.checkpoint={cfg.model.checkpoint}", f"run.root={tmp_path}", f"data.path={cfg.data.path}",
            "model.bn=eval", "optim.steps=2", "optim.warmup_steps=1", "eval.every=0", "run.ckpt_every=1",
            "run.log_every=1", "eval.test_size=8", "eval.probe_train_size=32", "eval.final_targets=0"]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    job = next(p for p in (root / "jobs" / "test_tiny.toml", root / "tests" / "assets" / "test_tiny.toml") if p.is_file())
    from advft import checkpoint as ckpt

    weights = {}
    for name, compiled in (("eager", "false"), ("compiled", "true")):
        flags = [x for s in [*sets, f"run.compile={compiled}", f"run.name={name}"] for x in ("--set", s)]
        p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            str(_free_port()), "launch/train.py", str(job), *flags],
                           cwd=root, env=env, capture_output=True, text=True, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        assert '"world_size": 2' in (tmp_path / name / "manifest.json").read_text()
        weights[name] = ckpt.load_latest(tmp_path / name)[1]["model"]
    base = load_encoder(cfg.model.checkpoint, arch="tiny", stem="cifar").net.state_dict()
    a, b = weights["eager"], weights["compiled"]
    assert max((a[k].float() - base[k].float()).abs().max().item() for k in a) > 1e-3  # training moved phi
    losses = [[r["loss"] for r in map(json.loads, (tmp_path / n / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "train"] for n in ("eager", "compiled")]
    assert len(losses[0]) == 2 and losses[1][0] == pytest.approx(losses[0][0], rel=1e-4)
    keys = [k for k in a if a[k].is_floating_point()]
    diff = torch.cat([(b[k].float() - a[k].float()).abs().flatten() for k in keys])
    ref = torch.cat([a[k].float().abs().flatten() for k in keys])
    off = (diff > 1e-5 + 1e-4 * ref).float().mean().item()
    lr = cfg.optim.lr
    assert off <= 0.2 and diff.max().item() <= 2 * lr * 2 + 1e-5, (off, diff.max().item())
