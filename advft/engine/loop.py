"""The run loop every task shares: ``run(task)`` runs (or resumes, or returns the results of a finished) run.

The engine owns what is the same for every kind of training: the run folder, resume from the newest valid
checkpoint, manifest / metrics / wandb, the log, evaluation and checkpoint cadence, stop requests, the
non-finite guard and the final save. A :class:`Task` supplies only its models, its step, its evaluation and
its checkpoint state.

No host synchronisation happens between log steps: metrics are summed as device tensors and a non-finite
loss is remembered by a device-side flag, read only at log and checkpoint steps.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from advft import checkpoint as ckpt
from advft.distributed import make_accelerator, precision_label, run_precision
from advft.engine.record import MetricsLog, finish_wandb, start_wandb, update_manifest
from advft.engine.errors import Interrupted, NonFiniteLossError
from advft.engine.progress import Progress, eval_line
from advft.engine.rundir import RunDir
from advft.engine.stop import StopPoll, StopRequested

log = logging.getLogger(__name__)


class Task:
    """What one kind of training plugs into the engine. ``cfg`` must have ``run`` (advft.config.RunConfig),
    ``optim.steps``, ``eval.every``, ``data.batch_size`` (global), ``hash()`` and ``to_dict()``.

    Call order: validate, build (before the run folder exists: bad input writes nothing), load_state on
    resume, prepare, then evaluate / step / state as the loop needs them, finish at the end.
    """

    name = "task"  # progress-bar label and wandb job_type
    wandb_group: str | None = None
    progress_keys: tuple[str, ...] = ("loss",)  # train metrics shown on the progress bar
    opt: torch.optim.Optimizer  # set by build(); its first group's lr is logged

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def validate(self, world_size: int) -> None:
        raise NotImplementedError

    def load_config(self, path: Path) -> Any:
        """Read a config.toml of this task (to compare an existing run folder's config with ours)."""
        raise NotImplementedError

    def to_toml(self) -> str:
        raise NotImplementedError

    def build(self, device: torch.device, precision: str) -> None:
        raise NotImplementedError

    def outputs_present(self, run: RunDir) -> bool:
        """Whether a run whose results.json says finished also has its outputs (else it runs again)."""
        return True

    def artifacts(self, run: RunDir) -> list[tuple[str, str, Path]]:
        """(name, type, path) of the files logged to wandb when ``run.wandb_artifacts`` is on."""
        return []

    def load_state(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """The task's part of a checkpoint (the engine adds step, rng and config)."""
        raise NotImplementedError

    def prepare(self, acc: Any) -> None:
        """After resume: compile, wrap for DDP, build the evaluation data."""
        raise NotImplementedError

    def evaluate(self, step: int, final: bool, check: Callable[[], None]) -> list[tuple[str, dict[str, Any]]]:
        """(kind, result) records of the evaluations at ``step``, on every rank (split the work over ranks; all
        return the same records); ``final`` at step 0 and at the end. The last record's result is what
        results.json keeps as initial / final. Call ``check()`` between chunks of work (the same number of
        times on every rank): it raises when a stop was requested, abandoning the evaluation."""
        raise NotImplementedError

    def step(self, x: Tensor, y: Tensor, step: int) -> dict[str, Tensor]:
        """One optimisation step for global step ``step``: detached device metrics, ``loss`` among them."""
        raise NotImplementedError

    def finish(self, run: RunDir, final: dict[str, Any] | None, is_main: bool) -> dict[str, Any]:
        """After the final evaluation, on every rank: checks and outputs; returns extra results.json fields."""
        return {}


def run(task: Task, *, should_stop: Callable[[], bool] | None = None, accelerator: Any = None) -> dict[str, Any]:
    """Run ``task`` to its last step in its run folder; returns results.json's dict.

    ``should_stop`` is polled at log steps, and at start-up and between evaluation chunks when it is a flag
    (:class:`advft.engine.stop.StopPoll`); when any rank says True all ranks checkpoint at the same step
    boundary (an evaluation in progress is abandoned, and repeated on resume) and :class:`Interrupted` is
    raised (rerunning resumes from that checkpoint). A non-finite loss
    marks results.json failed and raises :class:`NonFiniteLossError`; the last good checkpoint stays.
    """
    from advft.data import build_train_loader

    cfg = task.cfg
    acc = accelerator or make_accelerator(cfg.run.device)
    task.validate(acc.num_processes)
    device, rank, world, is_main = acc.device, acc.process_index, acc.num_processes, acc.is_main_process
    # run.precision as applied on this device ("auto" -> fp32 | bf16), once per run; config.toml keeps the request
    precision = run_precision(cfg.run.precision, device)
    task.build(device, precision)
    rd = RunDir(cfg.run.dir)
    rd.claim(cfg, task.load_config, task.to_toml(), is_main)
    acc.wait_for_everyone()
    results = rd.read_results()
    if results.get("status") == "finished" and task.outputs_present(rd):
        log.info("run %s already finished; nothing to do", rd.path)
        return results

    start = 0
    found = ckpt.load_latest(rd.path)
    if found is not None:
        start, state = found
        task.load_state(state)
        ckpt.set_rng_state(state["rng"])
        log.info("resumed %s from step %d", rd.path, start)
    steps = cfg.optim.steps
    if is_main:
        label = precision_label(cfg.run.precision, precision)  # e.g. "fp32 (auto)"
        log.info("precision: %s on %s", label, device)
        update_manifest(rd.path, world, start, {"precision": label})
    metrics = MetricsLog(rd.path, start, steps=steps, initial_done="initial" in results, enabled=is_main)
    if is_main:
        metrics.wandb_run = start_wandb(rd, task.wandb_group, task.name, cfg.to_dict(), cfg.run.wandb)
    task.prepare(acc)
    loop = _Loop(task, acc, rd, metrics, StopPoll(should_stop, device))
    try:
        if loop.stop("start"):  # a signal during start-up: nothing new to save
            raise Interrupted(start)
        if start == 0 and "initial" not in results:
            r0 = loop.evaluate(0, final=True)
            if is_main:
                results = {"status": "running", "initial": r0}
                rd.write_results(results)
        elif found is not None and found[1].get("eval_pending"):  # abandoned at `start` before the requeue
            loop.evaluate(start, final=False)
            loop.save(start)  # no longer pending: a second requeue must not log it twice
        loader = build_train_loader(cfg, rank=rank, world_size=world, start_step=start, device=device)
        loop.train(loader, start)
        final = loop.evaluate(steps, final=True)
    except NonFiniteLossError as e:
        if is_main:  # the sweep reads this to mark the run failed; a rerun resumes from the last good checkpoint
            results.update({"status": "failed", "error": str(e), "failed_step": e.step})
            rd.write_results(results)
        metrics.close()
        raise
    except BaseException:  # a stop request or a crash: end the wandb run too, so a resume can start it again
        metrics.close()
        raise
    extra = task.finish(rd, final, is_main)
    if is_main:
        results.update({"status": "finished", "final": final, "steps": steps, "config_hash": cfg.hash(), **extra})
        rd.write_results(results)
        if metrics.wandb_run is not None:
            finish_wandb(metrics.wandb_run, results, task.artifacts(rd) if cfg.run.wandb_artifacts else [])
            metrics.wandb_run = None
    metrics.close()
    acc.wait_for_everyone()
    return results


class _Loop:
    """The step loop of one run: cadence of logs, evaluations, checkpoints and stop polls."""

    def __init__(self, task: Task, acc: Any, rd: RunDir, metrics: MetricsLog,
                 stop: StopPoll) -> None:
        self.task, self.acc, self.rd, self.metrics, self.stop = task, acc, rd, metrics, stop
        self.run = task.cfg.run
        self.device = acc.device
        self.bad = torch.zeros((), dtype=torch.bool, device=self.device)  # device-side: no sync per step
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.device)

    def evaluate(self, step: int, final: bool) -> dict[str, Any] | None:
        """Every rank evaluates, rank 0 logs. Returns the last record's result. A stop request abandons the
        evaluation (nothing of it is logged): at step 0 and at the end nothing needs saving (the run resumes
        before it), mid-run the checkpoint of ``step`` is written marked ``eval_pending`` for the resume."""
        chunks, t0 = [0], time.perf_counter()

        def check() -> None:
            chunks[0] += 1
            self.stop.check()

        try:
            records = self.task.evaluate(step, final, check)
        except StopRequested:
            if 0 < step < self.task.cfg.optim.steps:
                self.save(step, eval_pending=True)
            raise Interrupted(step) from None
        took = time.perf_counter() - t0
        # what slurm/README.md sizes the requeue signal's lead time from (the longest chunk between two polls)
        log.info("evaluation at step %d: %.1f s in %d chunks (about %.1f s each)", step, took, chunks[0],
                 took / max(chunks[0], 1))
        for kind, res in records:
            self.metrics.log({"step": step, "kind": kind, **res})
            if self.acc.is_main_process and self.run.progress:
                log.info(eval_line(f"{self.task.name} {self.run.name}", step, kind, res))
        self.acc.wait_for_everyone()
        return records[-1][1] if records else None

    def check_finite(self) -> None:
        if bool(self.bad):  # host sync, only at log/checkpoint steps
            raise NonFiniteLossError(int(self.first_bad), self.last_saved)

    def save(self, step: int, eval_pending: bool = False) -> None:
        self.check_finite()  # never checkpoint weights that saw a non-finite loss
        t0 = time.perf_counter()
        if self.acc.is_main_process:
            state = {**self.task.state(), "step": step, "rng": ckpt.rng_state(), "config": self.task.cfg.to_dict(),
                     "eval_pending": eval_pending}
            ckpt.save(self.rd.path, step, state, keep_last=self.run.keep_last)
        self.acc.wait_for_everyone()
        self.last_saved = step
        if self.acc.is_main_process:  # slurm/README.md sizes the requeue signal's lead time from this line
            log.info("checkpoint of step %d written in %.1f s", step, time.perf_counter() - t0)

    def train(self, loader: Any, start: int) -> None:
        cfg, run, task, acc = self.task.cfg, self.run, self.task, self.acc
        steps, world = cfg.optim.steps, acc.num_processes
        self.last_saved: int | None = start or None  # a resumed run starts from its checkpoint at `start`
        sums: dict[str, Tensor] = {}
        n_sum, t_last = 0, time.perf_counter()
        shown = Progress(f"{task.name} {run.name}", task.progress_keys, steps, start, cfg.data.batch_size,
                         enabled=acc.is_main_process and run.progress)
        try:
            for step in range(start, steps):
                x, y = next(loader)
                out = task.step(x, y, step)
                nonfinite = ~torch.isfinite(out["loss"])
                # full_like is a device-side fill; torch.tensor(step, device=...) would be a blocking copy
                self.first_bad = torch.where(nonfinite & ~self.bad, torch.full_like(self.first_bad, step),
                                             self.first_bad)
                self.bad = self.bad | nonfinite
                for k, v in out.items():
                    sums[k] = sums.get(k, 0) + v.detach().float()
                n_sum += 1
                done = step + 1
                shown.update()
                if done % run.log_every == 0 or done == steps:
                    self.check_finite()
                    if world > 1:  # mean of the logged metrics over ranks (one small all-reduce per log step)
                        sums = {k: acc.reduce(v, reduction="mean") for k, v in sums.items()}
                    rec = {"step": done, "kind": "train", "lr": task.opt.param_groups[0]["lr"],
                           "img_per_s": n_sum * cfg.data.batch_size / max(time.perf_counter() - t_last, 1e-9),
                           **{k: float(v) / n_sum for k, v in sums.items()}}
                    self.metrics.log(rec)
                    shown.logged(rec)
                    sums, n_sum, t_last = {}, 0, time.perf_counter()
                # order matters for exact resume: records of a step are written before its checkpoint
                if cfg.eval.every and done % cfg.eval.every == 0 and done != steps:
                    self.evaluate(done, final=False)
                    t_last = time.perf_counter()  # img_per_s measures training, not evaluation
                if done % run.ckpt_every == 0 and done != steps:
                    self.save(done)
                # the last step goes on to the final save; the final evaluation polls between its chunks
                if done % run.log_every == 0 and done != steps and self.stop("step"):
                    if done % run.ckpt_every != 0:
                        self.save(done)
                    raise Interrupted(done)
            self.save(steps)
        finally:
            shown.close()
