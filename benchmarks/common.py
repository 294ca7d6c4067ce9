"""Pieces the benchmarks share: the machine's description, timing and its statistics, the models and the
advft config of one benchmark, a measured matmul peak and FLOP counts.

Timings are wall-clock seconds around work that has finished: on a GPU every timed region ends with
``torch.cuda.synchronize()`` (otherwise we would time kernel launches); a CPU runs synchronously.
"""
from __future__ import annotations

import copy
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from advft import config as C
from advft.distributed import resolve_precision
from advft.models import Encoder, build_encoder
from advft.fare import StepModels, build_optimizer


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when visible, else cpu; 'cuda' without a GPU is an error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but no CUDA device is visible")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix work runs in hardware here (GPU with bf16, or a CPU with AVX512-BF16/AMX): what
    ``run.precision = "auto"`` decides (:func:`advft.distributed.resolve_precision`), so ``--precision auto``
    means the same here as in a run.

    On a CPU without it oneDNN emulates bf16 and autocast is many times SLOWER than fp32. oneDNN's own
    ``_is_mkldnn_bf16_supported()`` is not the test: it is True on any AVX512 CPU, emulation included.
    """
    return resolve_precision("auto", device) == "bf16"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds for fn() to finish on the device."""
    return timed_wall_cpu(fn, device)[0]


def timed_wall_cpu(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process) for fn() to finish on the device.

    CPU time is the steadier measure of work on a shared CPU: time spent waiting for a core that another
    process holds (or that the hypervisor steals) counts in wall time but not here. It measures throughput
    only with one torch thread (several threads add their CPU times up), and means nothing on a GPU.
    """
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def summary(values: list[float]) -> dict[str, Any]:
    """Median, min, max and inter-quartile range of repeated measurements (n stated)."""
    v = sorted(values)
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"n": len(v), "median": statistics.median(v), "min": v[0], "max": v[-1], "q1": q[0], "q3": q[2],
            "values": values}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    """What a reader needs to judge a number: hardware, threads, versions, load."""
    env: dict[str, Any] = {
        "device": str(device), "cpu": cpu_model(), "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": native_bf16(device),
    }
    try:
        env["load_avg_1_5_15"] = list(os.getloadavg())
    except OSError:
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    return env


def bench_config(*, arch: str, stem: str, res: int, batch: int, attack_steps: int, alpha: float, precision: str,
                 compile: bool, channels_last: bool, fused: bool, device: torch.device) -> C.Config:
    """The advft config of a benchmark: the defaults (APGD, eps 8/255, AdamW) with the benchmark's shape and
    switches. The lr schedule is parked in its warmup; it does not change the cost of a step."""
    return C.from_dict({}, {
        "model.arch": arch, "model.stem": stem, "data.resolution": res, "data.batch_size": batch,
        "attack.steps": attack_steps, "loss.alpha": alpha, "run.precision": precision, "run.compile": compile,
        "run.channels_last": channels_last, "optim.fused": fused, "run.device": device.type,
        "optim.warmup_steps": 10_000, "optim.steps": 10_000,
    })


def fresh_encoder(arch: str, stem: str, seed: int = 0) -> Encoder:
    """The same randomly initialised encoder every time (a stand-in for a pretrained one: cost is the same)."""
    torch.manual_seed(seed)
    return build_encoder(arch, stem, "none")


def advft_models(base: Encoder, cfg: C.Config, device: torch.device) -> tuple[StepModels, torch.optim.Optimizer]:
    """phi_org, phi, the compiled view and the optimizer, built as ``advft.fare.finetune`` builds them
    (one process: phi_ddp is phi_fn)."""
    phi_org = copy.deepcopy(base).to(device).eval().requires_grad_(False)
    if cfg.run.channels_last:
        phi_org = phi_org.to(memory_format=torch.channels_last)
    phi = copy.deepcopy(phi_org).requires_grad_(True)
    phi_fn: nn.Module = torch.compile(phi) if cfg.run.compile else phi
    opt = build_optimizer(phi.parameters(), cfg.optim, device)
    return StepModels(phi=phi, phi_fn=phi_fn, phi_ddp=phi_fn, phi_org=phi_org), opt


def baseline_models(base: Encoder, cfg: C.Config, device: torch.device) -> tuple[nn.Module, nn.Module,
                                                                                  torch.optim.Optimizer]:
    """(phi, phi_org, plain AdamW) for the report-style baseline: fp32, eager, NCHW, parameters never frozen."""
    phi_org = copy.deepcopy(base).to(device).eval().requires_grad_(False)
    phi = copy.deepcopy(phi_org).requires_grad_(True)
    o = cfg.optim
    opt = torch.optim.AdamW(phi.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    return phi, phi_org, opt


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 2.0) -> dict[str, Any]:
    """Best achieved FLOP/s of a square matmul in ``dtype`` (the ceiling the step's FLOP/s is compared with).

    n = 8192 on a GPU, 2048 on a CPU; the best of a few timed batches of matmuls, after one warm-up. With
    one CPU thread per CPU second of this process (see :func:`timed_wall_cpu`), like the rates it is compared
    with; otherwise per wall-clock second.
    """
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    pick = 1 if device.type == "cpu" and torch.get_num_threads() == 1 else 0  # CPU time: see timed_wall_cpu
    per = timed_wall_cpu(lambda: a @ b, device)[pick]
    reps = max(1, min(50, int(seconds / 4 / max(per, 1e-6))))
    best = 0.0
    for _ in range(4):
        def run() -> None:
            for _ in range(reps):
                a @ b
        best = max(best, 2 * n**3 * reps / timed_wall_cpu(run, device)[pick])
    return {"flop_per_s": best, "dtype": str(dtype).replace("torch.", ""), "n": n, "reps": reps,
            "clock": "cpu" if pick else "wall"}


def count_flops(fn: Callable[[], Any]) -> int:
    """Matmul/convolution FLOPs (forward and backward) of one call of fn.

    The formulas are torch's own (``torch.utils.flop_counter.flop_registry``, what FlopCounterMode applies);
    a minimal dispatch mode applies them because FlopCounterMode's module tracker raises under
    ``torch.autograd.grad`` of a leaf (torch 2.14), which is how the attack takes input gradients.
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func.overloadpacket)
            if formula is not None:
                self.total += int(formula(*args, **kwargs, out_val=out))
            return out

    counter = Count()
    with counter:
        fn()
    return counter.total
