"""Process setup: one Accelerator per process, from whatever launched us (python, torchrun, accelerate
launch, srun via submitit). Model code knows nothing of this module."""
from __future__ import annotations

import datetime
import os

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
            InitProcessGroupKwargs(timeout=datetime.timedelta(hours=2)),  # rank-0 evaluation can be long
            # rank 0's BN buffers are broadcast at each DDP forward, so every rank attacks the same model
            DistributedDataParallelKwargs(broadcast_buffers=True),
        ],
    )
    torch.set_num_threads(threads)
    if acc.num_processes != world:
        raise RuntimeError(f"the launcher announced WORLD_SIZE={world} but accelerate started "
                           f"{acc.num_processes} process(es); on CPU set ACCELERATE_USE_CPU=1")
    return acc


def autocast(device: torch.device, precision: str):
    """bf16 autocast context for the device type, or a no-op for fp32."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
