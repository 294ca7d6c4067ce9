#!/usr/bin/env python
"""Data-parallel scaling of advft's FARE step: images/s per rank and efficiency against one rank.

    python benchmarks/scaling.py --ranks 1,2 --arch resnet18 --stem cifar --res 32 --batch 8 --out s.json
    python benchmarks/scaling.py --estimate --step-ms 12.2 --arch resnet50 --stem imagenet --world 16

The first form starts ``torchrun --nproc_per_node N`` for every N in ``--ranks`` (gloo on CPU, with
ACCELERATE_USE_CPU=1 and ``--threads-per-rank`` threads each; NCCL on GPUs) and times advft's own
``fare_step`` through DDP, built as ``advft.fare.finetune`` builds it, at a FIXED per-rank batch
(``--batch``): weak scaling, as when a sweep adds GPUs to keep the per-GPU batch. Every rank draws its own
batch. A timed repeat starts after a barrier and lasts as long as the slowest rank (the gradient
all-reduce makes every step wait for it); efficiency(N) = images/s per rank at N / images/s at 1 rank.
The gradient all-reduce is also timed alone (a flat fp32 tensor of the model's parameter count).

On a 2-core CPU, N ranks of 1 thread each compete for the same memory bandwidth and caches, so the CPU
numbers bound the code's overhead (DDP hooks, the all-reduce over gloo) rather than predict a cluster.

The second form is arithmetic, no processes: the estimate for ``--world`` GPUs from a per-GPU step time
and the all-reduce volume (see :func:`estimate`; every bandwidth and latency is an assumption, printed).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import common  # noqa: E402


def param_count(arch: str, stem: str) -> int:
    """Trainable parameters of the encoder (what DDP all-reduces every step; BN buffers are broadcast)."""
    return sum(p.numel() for p in common.fresh_encoder(arch, stem).parameters())


def estimate(*, step_s: float, params: int, world: int, per_node: int, intra_GBps: float, nic_GBps: float,
             nics_per_node: int, latency_s: float, grad_bytes: int = 4, bucket_bytes: int = 25 * 2**20,
             overlap_s: float = 0.0) -> dict[str, float]:
    """Predicted data-parallel efficiency from the compute time of one step and the all-reduce volume.

    step_s: compute time of one step on one GPU at the per-GPU batch (no communication). The volume is
    params x grad_bytes. A ring all-reduce moves 2 (N-1)/N of it through every GPU at the bus bandwidth:
    the NVLink one within a node; across nodes NCCL runs one ring per NIC, so the bus is the smaller of
    NVLink and nics_per_node x nic_GBps. Plus a latency term: DDP's buckets (25 MiB) each take 2 (N-1) ring
    steps of latency_s. overlap_s: time of the backward pass in which DDP's bucketed all-reduce can hide.
    """
    volume = params * grad_bytes
    bus = intra_GBps if world <= per_node else min(intra_GBps, nics_per_node * nic_GBps)
    buckets = -(-volume // bucket_bytes)
    bandwidth_s = 2 * (world - 1) / world * volume / (bus * 1e9)
    latency = buckets * 2 * (world - 1) * latency_s
    comm = bandwidth_s + latency
    exposed = max(comm - overlap_s, 0.0)
    return {"volume_bytes": volume, "bus_GBps": bus, "bandwidth_s": bandwidth_s, "latency_s": latency,
            "allreduce_s": comm, "exposed_s": exposed, "efficiency": step_s / (step_s + exposed)}


# ------------------------------------------------------------------------------------------------- worker


def worker(args: argparse.Namespace) -> None:
    """One rank: DDP over the (optionally compiled) encoder, timed fare_step calls; rank 0 writes JSON."""
    import torch.distributed as dist

    from advft import config as C
    from advft.distributed import make_accelerator
    from advft.fare.step import FareSpec, fare_step

    acc = make_accelerator(args.device)
    device, rank, world = acc.device, acc.process_index, acc.num_processes
    torch.set_num_threads(args.threads_per_rank)
    precision = args.precision if args.precision != "auto" else ("bf16" if common.native_bf16(device) else "fp32")
    cfg = common.bench_config(arch=args.arch, stem=args.stem, res=args.res, batch=args.batch * world,
                              attack_steps=args.attack_steps, alpha=args.alpha, precision=precision,
                              compile=args.compile == "on", channels_last=args.channels_last == "on",
                              fused=True, device=device)
    C.validate(cfg, world_size=world, check_paths=False)
    models, opt = common.advft_models(common.fresh_encoder(args.arch, args.stem), cfg, device)
    if world > 1:  # compile, then DDP, as the trainer does; the attack keeps the unwrapped phi_fn
        models.phi_ddp = acc.prepare_model(models.phi_fn)
    g = torch.Generator(device).manual_seed(1000 + rank)
    x = torch.rand(args.batch, 3, args.res, args.res, device=device, generator=g)
    y = torch.zeros(args.batch, dtype=torch.long, device=device)
    step, spec = 0, FareSpec.of(cfg)

    def run(n: int) -> None:
        nonlocal step
        for _ in range(n):
            fare_step(models, opt, x, y, step, spec, rank=rank, world=world)
            step += 1

    run(args.warmup)
    rates = []
    for _ in range(args.repeats):
        if world > 1:
            dist.barrier()
        t = torch.tensor([common.timed(lambda: run(args.steps), device)], device=device)
        if world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        rates.append(args.steps * args.batch / t.item())

    n_params = sum(p.numel() for p in models.phi.parameters())
    comm = []
    if world > 1:
        flat = torch.zeros(n_params, device=device)
        dist.all_reduce(flat)
        for _ in range(5):
            dist.barrier()
            comm.append(common.timed(lambda: dist.all_reduce(flat), device))
    if rank == 0:
        out = {"world": world, "per_rank_batch": args.batch, "precision": precision,
               "img_per_s_per_rank": common.summary(rates), "params": n_params,
               "allreduce_s": common.summary(comm) if comm else None, "env": common.environment(device)}
        Path(args.result).write_text(json.dumps(out))
    acc.wait_for_everyone()


# ------------------------------------------------------------------------------------------------- driver


def launch(args: argparse.Namespace, n: int, port: int) -> dict[str, Any]:
    """Run the worker under torchrun with n ranks; its rank 0's JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "r.json"
        passthrough = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                       if k in ("device", "arch", "stem", "res", "batch", "steps", "repeats", "warmup",
                                "attack_steps", "alpha", "precision", "compile", "channels_last",
                                "threads_per_rank")]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port",
               str(port), str(Path(__file__).resolve()), "--worker", f"--result={result}", *passthrough]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_rank)}
        if args.device != "cuda" and not torch.cuda.is_available():
            env["ACCELERATE_USE_CPU"] = "1"
        print(f"$ {' '.join(cmd[2:])}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not result.is_file():
            raise SystemExit(f"{n} rank(s) failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(result.read_text())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/scaling.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="1,2", help="comma list of rank counts (1 is added: it is the reference)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--arch", default="resnet18", choices=("resnet50", "resnet18", "tiny"))
    p.add_argument("--stem", default="cifar", choices=("imagenet", "cifar"))
    p.add_argument("--res", type=int, default=32)
    p.add_argument("--batch", type=int, default=8, help="PER-RANK batch (fixed as ranks are added)")
    p.add_argument("--steps", type=int, default=2, help="timed FARE steps per repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--attack-steps", type=int, default=10)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--compile", default="off", choices=("on", "off"))
    p.add_argument("--channels-last", default="on", choices=("on", "off"))
    p.add_argument("--threads-per-rank", type=int, default=1)
    p.add_argument("--port", type=int, default=29631)
    p.add_argument("--out", type=Path)
    p.add_argument("--estimate", action="store_true", help="print the all-reduce estimate and exit")
    p.add_argument("--step-ms", type=float, help="--estimate: per-GPU compute time of one step, ms")
    p.add_argument("--world", type=int, default=16, help="--estimate: GPUs in all")
    p.add_argument("--per-node", type=int, default=8, help="--estimate: GPUs per node")
    p.add_argument("--intra-gbps", type=float, default=360.0,
                   help="--estimate: NVLink all-reduce bus bandwidth within a node, GB/s (H100 NVLink 4: 450 GB/s "
                        "per direction; ~360 is what NCCL typically reaches; an assumption)")
    p.add_argument("--nic-gbps", type=float, default=45.0,
                   help="--estimate: achieved bandwidth of one inter-node NIC, GB/s (400 Gb/s NDR InfiniBand = "
                        "50 GB/s; an assumption)")
    p.add_argument("--nics-per-node", type=int, default=8, help="--estimate: NICs per node (DGX H100: one per GPU)")
    p.add_argument("--latency-us", type=float, default=5.0, help="--estimate: latency of one ring step, us")
    p.add_argument("--grad-bytes", type=int, default=4, help="--estimate: bytes per gradient element (fp32: 4)")
    p.add_argument("--overlap-ms", type=float, default=0.0,
                   help="--estimate: backward time the all-reduce can hide in (0 = none, the pessimistic case)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    if args.estimate:
        if args.step_ms is None:
            raise SystemExit("--estimate needs --step-ms (the per-GPU compute time of one step)")
        params = param_count(args.arch, args.stem)
        e = estimate(step_s=args.step_ms / 1e3, params=params, world=args.world, per_node=args.per_node,
                     intra_GBps=args.intra_gbps, nic_GBps=args.nic_gbps, nics_per_node=args.nics_per_node,
                     latency_s=args.latency_us / 1e6, grad_bytes=args.grad_bytes, overlap_s=args.overlap_ms / 1e3)
        print(f"{args.arch}: {params / 1e6:.2f} M parameters x {args.grad_bytes} B = {e['volume_bytes'] / 1e6:.1f} MB "
              f"per all-reduce; {args.world} GPUs, {args.per_node} per node; bus {e['bus_GBps']:.0f} GB/s")
        print(f"  ring all-reduce: 2({args.world}-1)/{args.world} x volume / bus = {e['bandwidth_s'] * 1e3:.2f} ms "
              f"+ latency {e['latency_s'] * 1e3:.2f} ms = {e['allreduce_s'] * 1e3:.2f} ms; exposed after "
              f"{args.overlap_ms:.2f} ms of overlap: {e['exposed_s'] * 1e3:.2f} ms")
        print(f"  step {args.step_ms:.2f} ms -> efficiency {100 * e['efficiency']:.1f} %")
        return e
    counts = sorted({1, *(int(n) for n in args.ranks.split(",") if n)})
    runs = {n: launch(args, n, args.port + i) for i, n in enumerate(counts)}
    ref = runs[1]["img_per_s_per_rank"]["median"]
    print(f"\n{args.arch} ({args.stem} stem) {args.res}px, per-rank batch {args.batch}, "
          f"{args.threads_per_rank} thread(s) per rank, {runs[1]['precision']}; "
          f"images/s per rank: median [min, max], n")
    for n, r in runs.items():
        s = r["img_per_s_per_rank"]
        r["efficiency"] = s["median"] / ref
        comm = r["allreduce_s"]
        comm_txt = f", gradient all-reduce alone {comm['median'] * 1e3:.1f} ms (n={comm['n']})" if comm else ""
        print(f"  {n} rank(s): {s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}] n={s['n']}, "
              f"total {n * s['median']:.3f} img/s, efficiency {100 * r['efficiency']:.1f} %{comm_txt}")
    result = {"command": " ".join([sys.executable, *sys.argv]), "runs": runs}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
