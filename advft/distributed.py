"""Process setup: one Accelerator per process, from whatever launched us (python, torchrun, accelerate
launch, srun via submitit). Model code knows nothing of this module."""
from __future__ import annotations

import datetime
import os
import sys

import torch


def env_world_size() -> int:
    """World size announced by the launcher (torchrun/accelerate set WORLD_SIZE), 1 when absent."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def use_cuda(device: str) -> bool:
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device = 'cuda' but no CUDA device is visible; use run.device = 'auto' or 'cpu'")
    return device != "cpu" and torch.cuda.is_available()


def make_accelerator(device: str = "auto"):
    """An Accelerator with DDP over gloo (CPU) or NCCL (GPU); we manage autocast and compile ourselves.

    On a CPU machine ``Accelerator()`` under torchrun silently runs every rank alone; ``cpu=True`` makes it
    initialise gloo. We check that the process count matches WORLD_SIZE so that never passes unnoticed.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    cuda = use_cuda(device)
    world = env_world_size()
    if not cuda and world > 1:
        os.environ.setdefault("ACCELERATE_USE_CPU", "1")
    # With gloo and OMP_NUM_THREADS unset, accelerate resets torch's thread count to cores / local ranks,
    # overriding what the caller chose (a submitit job sets cpus_per_task threads). Float reductions, and
    # so a requeued run's bit-identity with an uninterrupted one, depend on the thread count: keep ours.
    threads = torch.get_num_threads()
    acc = Accelerator(
        cpu=not cuda,
        mixed_precision="no",  # autocast is applied explicitly around the forwards that want it
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=datetime.timedelta(hours=2)),  # a checkpoint write or a probe fit can be long
            # rank 0's BN buffers are broadcast at each DDP forward, so every rank attacks the same model
            DistributedDataParallelKwargs(broadcast_buffers=True),
        ],
    )
    torch.set_num_threads(threads)
    if acc.num_processes != world:
        raise RuntimeError(f"the launcher announced WORLD_SIZE={world} but accelerate started "
                           f"{acc.num_processes} process(es); on CPU set ACCELERATE_USE_CPU=1")
    return acc


# x86 CPU flags (Linux /proc/cpuinfo names) that mean bf16 matrix work runs in hardware.
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_bf16(cpuinfo: str) -> bool:
    """Whether every ``flags`` line of a /proc/cpuinfo text names amx_bf16 or avx512_bf16 (False if none)."""
    lines = [ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines()
             if ln.startswith("flags") and ":" in ln]
    return bool(lines) and all(any(f in flags for f in CPU_BF16_FLAGS) for flags in lines)


def _read_cpuinfo() -> str:
    if not sys.platform.startswith("linux"):
        return ""  # no /proc/cpuinfo to read: treated as a CPU without bf16 hardware
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def resolve_precision(precision: str, device: torch.device, *, cpuinfo: str | None = None) -> str:
    """``run.precision`` as the run applies it: "fp32" and "bf16" unchanged, "auto" -> the fast one here.

    Why: bf16 autocast is only fast where bf16 matrix work runs in hardware. Without it (AMD EPYC Zen 3,
    Intel Xeons without AMX/AVX512-BF16) oneDNN emulates bf16: the FARE step ran 21x SLOWER than fp32 on the
    EPYC, and an AVX512 Xeon without BF16 was still 1.7-3x slower (BENCHMARKS.md, "bf16 on this CPU"); with
    AMX it is ~3x faster (the performance issue), and on Ampere+ GPUs bf16 is the fast path. So "auto" is
    "bf16" on a CUDA device with native bf16 (``torch.cuda.is_bf16_supported`` without emulation: a V100
    emulates bf16 and gets fp32), or on a Linux CPU whose /proc/cpuinfo flags show amx_bf16 or avx512_bf16;
    "fp32" everywhere else (other OSes, other devices). Call it once per run, on
    the device the run uses. ``cpuinfo``: the /proc/cpuinfo text to judge (tests), read from the file when None.
    """
    if precision in ("fp32", "bf16"):
        return precision
    if precision != "auto":
        raise ValueError(f"run.precision = {precision!r} is not valid; choose one of: fp32, bf16, auto")
    if device.type == "cuda":
        try:  # newer torch counts emulated bf16 (pre-Ampere) unless told not to; older torch never did
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:
            native = torch.cuda.is_bf16_supported()
        return "bf16" if native else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_bf16(_read_cpuinfo() if cpuinfo is None else cpuinfo) else "fp32"
    return "fp32"


def run_precision(precision: str, device: torch.device) -> str:
    """:func:`resolve_precision` for this rank, agreed over all ranks: "auto" gives bf16 only when every rank
    resolved bf16 (nodes of a job may differ), so all ranks run the same numerics. Called once per run."""
    import torch.distributed as dist

    resolved = resolve_precision(precision, device)
    if precision == "auto" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([1.0 if resolved == "bf16" else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        resolved = "bf16" if flag.item() > 0 else "fp32"
    return resolved


def precision_label(requested: str, resolved: str) -> str:
    """How a run records its precision: "bf16", or "fp32 (auto)" when it was chosen by "auto"."""
    return f"{resolved} (auto)" if requested == "auto" else resolved


def autocast(device: torch.device, precision: str):
    """bf16 autocast context for the device type, or a no-op for fp32 (a resolved precision: see
    :func:`resolve_precision`; "auto" here is a bug, it would silently mean fp32)."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"autocast needs a resolved precision (fp32 | bf16), got {precision!r}; "
                         f"resolve run.precision once per run with advft.distributed.resolve_precision")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
