"""One advft run as a submitit job: a :class:`submitit.helpers.Checkpointable` that requeues WITHOUT losing a step.
The run is a fine-tuning (:class:`FinetuneJob`) or the pretraining of a sweep's base encoder (:class:`PretrainJob`).

submitit's own handler of its requeue signal (USR2: time limit or preemption) calls ``checkpoint()``,
requeues the job and exits, right where the signal landed: in the middle of a training step, maybe in a
collective that the other ranks are still waiting in. So while the run trains, this job replaces that
handler with one that only raises a flag. The engine polls the flag at log steps (all ranks agree on the
step through one all-reduce), checkpoints at that step boundary and raises ``Interrupted``; only then
does the job call submitit's handler, which requeues it. The requeued job runs this same callable again
and ``finetune`` (or ``pretrain``) resumes from the run folder: the pickle holds the config, the folder holds the state.

SIGTERM (SLURM preemption of a partition, or scancel) raises the same flag; SLURM itself requeues a
preempted job, so the job then exits without requeueing. When SIGKILL comes before the step boundary,
the run resumes from its last periodic checkpoint instead, and still ends bit-identical.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

import submitit

from launch.stopping import StopFlag

log = logging.getLogger("advft.job")

EXIT_STOPPED = 75  # EX_TEMPFAIL, as launch/train.py: checkpoint written, the run continues when started again


class EngineJob(submitit.helpers.Checkpointable):
    """An engine loop (fine-tuning, pretraining) inside a submitit task (one task per GPU), with the
    step-boundary stop and requeue described above. Subclasses say what runs (:meth:`run`) and how to make
    the same job again (:meth:`again`); ``threads`` is the CPU threads per task (0 = torch's default)."""

    threads: int = 0

    def run(self, should_stop: StopFlag) -> Any:
        raise NotImplementedError

    def again(self) -> "EngineJob":
        raise NotImplementedError

    def __call__(self) -> Any:
        import torch

        from advft.engine import Interrupted

        env = setup_distributed()
        logging.basicConfig(level=logging.INFO if env.global_rank == 0 else logging.WARNING,
                            format=f"[%(asctime)s r{env.global_rank}] %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
        if self.threads:
            torch.set_num_threads(self.threads)
        flag = StopFlag()
        requeue_sig = submitit.JobEnvironment._usr_sig()
        deferred = flag.install([requeue_sig, signal.SIGTERM])
        try:
            return self.run(flag)
        except Interrupted as e:
            log.warning("%s (signals: %s)", e, ", ".join(signal.Signals(s).name for s in flag.received))
            if requeue_sig in flag.received and callable(deferred[requeue_sig]):
                # submitit's handler: checkpoint() + requeue + exit on rank 0 (or UncompletedJobError once
                # the job has timed out max_num_timeout times); on the other ranks it returns
                deferred[requeue_sig](requeue_sig, None)
            if env.cluster == "debug":  # in-process: the caller gets the exception, its process lives on
                raise
            # SIGTERM only (preemption, scancel), or a rank other than 0: SLURM requeues or ends the job.
            # SystemExit, not an exception: submitit then writes no result, so the job is not "done".
            sys.exit(EXIT_STOPPED)
        finally:
            for s, h in deferred.items():
                signal.signal(s, h)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """The requeued job runs the same callable; the run folder holds the state (called by submitit)."""
        return submitit.helpers.DelayedSubmission(self.again())


class FinetuneJob(EngineJob):
    """Runs ``advft.fare.finetune`` on a resolved config.

    ``config`` is ``Config.to_dict()`` (plain data, so the pickle does not depend on advft's classes),
    ``group`` the sweep name (the wandb group), ``threads`` the CPU threads per task (0 = torch's default).
    """

    def __init__(self, config: dict[str, Any], group: str | None = None, threads: int = 0) -> None:
        self.config = config
        self.group = group
        self.threads = threads

    def run(self, should_stop: StopFlag) -> dict[str, Any]:
        from advft import config as C
        from advft.fare import finetune

        return finetune(C.from_dict(self.config), should_stop=should_stop, group=self.group)

    def again(self) -> "FinetuneJob":
        return FinetuneJob(self.config, self.group, self.threads)


class PretrainJob(EngineJob):
    """Runs ``advft.simclr.pretrain`` (SimCLR) on a resolved pretraining config (``PretrainConfig.to_dict()``);
    returns the path of the encoder it wrote. A finished pretraining returns at once."""

    def __init__(self, config: dict[str, Any], threads: int = 0) -> None:
        self.config = config
        self.threads = threads

    def run(self, should_stop: StopFlag) -> str:
        from advft import config as C
        from advft.simclr import PretrainConfig, pretrain

        return str(pretrain(C.from_dict(self.config, cls=PretrainConfig), should_stop=should_stop))

    def again(self) -> "PretrainJob":
        return PretrainJob(self.config, self.threads)


def setup_distributed() -> submitit.JobEnvironment:
    """RANK, WORLD_SIZE, MASTER_ADDR, ... from the submitit task (one task per GPU, several nodes).

    CUDA_VISIBLE_DEVICES is left as SLURM set it: accelerate picks ``cuda:LOCAL_RANK`` among the node's
    GPUs, which breaks if each task is narrowed to one GPU. On CPU, gloo ranks need ACCELERATE_USE_CPU.
    """
    import torch

    env = submitit.JobEnvironment()
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    if env.cluster == "slurm":  # submitit names the head by its node name, which need not resolve
        os.environ["MASTER_ADDR"] = slurm_node_address(os.environ["MASTER_ADDR"])
    if not torch.cuda.is_available():
        os.environ["ACCELERATE_USE_CPU"] = "1"
    return env


def slurm_node_address(node: str) -> str:
    """The address SLURM itself uses to reach ``node`` (its NodeAddr); the name where scontrol cannot say."""
    import subprocess

    try:
        out = subprocess.run(["scontrol", "-o", "show", "node", node], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return node
    addr = next((f.split("=", 1)[1] for f in out.split() if f.startswith("NodeAddr=")), "")
    return addr or node
