"""FARE fine-tuning of a pretrained encoder: ``finetune(cfg)`` runs (or resumes) one run in its folder.

One step, per rank (B = per-device batch):

    x  in [0,1]                                        from the loader, never normalised
    t  = phi_org(x)                                    frozen copy: eval mode, no grad, never DDP-wrapped
    z  = apgd(phi, x, ||phi(.) - t||^2)                phi UNWRAPPED, eval mode, parameters frozen for the
                                                       attack: autograd computes input gradients only, no
                                                       DDP hook fires, BN statistics never see the iterates
    L  = ||phi(z) - t||^2 + alpha ||phi(x) - t||^2     DDP-wrapped phi, ONE forward of [z; x] (x skipped at alpha 0)
    AdamW step with lr = schedule(step)

Everything random in a step derives from (seed, step): the attack's start noise is drawn for the GLOBAL
batch and sliced per rank, and the data order is a function of (seed, epoch). A resumed run therefore
continues bit-identically, and N ranks compute what one process computes with the same global batch.
No host synchronisation happens between log steps; non-finite losses are caught by a device-side flag.
"""
from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from advft import checkpoint as ckpt
from advft import config as C
from advft import tracking
from advft.distributed import make_accelerator, precision_label, run_precision
from advft.models import Encoder, encoder_state_dict, load_encoder, load_head
from advft.step import StepModels, fare_step

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the run stops and its last good checkpoint stays."""

    def __init__(self, step: int):
        super().__init__(f"non-finite loss at step {step}; stopped without saving; the last good checkpoint "
                         f"is kept and a rerun resumes from it")
        self.step = step


class Interrupted(RuntimeError):
    """The run checkpointed at a step boundary because a stop was requested (requeue signal)."""

    def __init__(self, step: int):
        super().__init__(f"stopped at step {step} on request; checkpoint written, resume by rerunning")
        self.step = step


def build_optimizer(params, cfg: C.OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    fused = cfg.fused and device.type in ("cuda", "cpu")
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused)
    except (RuntimeError, TypeError):  # fused kernel unavailable for this device/dtype
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def prepare_run_dir(cfg: C.Config, is_main: bool) -> Path:
    """Create the run folder and write config.toml; refuse a folder that holds a different config."""
    run_dir = cfg.run.dir
    existing = run_dir / "config.toml"
    if existing.is_file():
        old = C.load(existing)
        if old.hash() != cfg.hash():
            raise C.ConfigError(f"run folder {run_dir} already holds a run with a different config "
                                f"(hash {old.hash()} vs {cfg.hash()}); choose another run.name")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        C.write(cfg, existing)
    return run_dir


def _state(phi: Encoder, opt: torch.optim.Optimizer, step: int, cfg: C.Config) -> dict[str, Any]:
    return {"format": "advft", "arch": cfg.model.arch, "stem": cfg.model.stem,
            "model": {k: v.detach().cpu() for k, v in encoder_state_dict(phi).items()},
            "optimizer": opt.state_dict(), "step": step, "rng": ckpt.rng_state(),
            "config": cfg.to_dict()}


def finetune(cfg: C.Config, *, should_stop: Callable[[], bool] | None = None, group: str | None = None,
             accelerator=None) -> dict[str, Any]:
    """Run (or resume, or return the results of a finished) fine-tuning run. Returns results.json's dict.

    ``should_stop`` is polled at log steps; when any rank says True all ranks checkpoint at the same step
    boundary and :class:`Interrupted` is raised (the requeued job resumes from that checkpoint).
    """
    from advft.data import build_train_loader, eval_data
    from advft.evaluate import evaluate

    acc = accelerator or make_accelerator(cfg.run.device)
    C.validate(cfg, world_size=acc.num_processes)
    device, rank, world, is_main = acc.device, acc.process_index, acc.num_processes, acc.is_main_process
    # run.precision as applied on this device ("auto" -> fp32 | bf16), once per run; config.toml keeps the request
    precision = run_precision(cfg.run.precision, device)
    # ---- models: phi_org frozen and never wrapped; phi trainable. Read before the run folder is created:
    # a base encoder or head that cannot be used is bad input, and bad input writes nothing ----
    phi_org = load_encoder(cfg.model.checkpoint, arch=cfg.model.arch, stem=cfg.model.stem,
                           normalize=cfg.model.normalize).to(device)
    head = load_head(cfg.model.head, phi_org.feature_dim).to(device).requires_grad_(False) if cfg.model.head else None
    run_dir = prepare_run_dir(cfg, is_main)
    acc.wait_for_everyone()
    results_path = run_dir / "results.json"
    if results_path.is_file():
        res = json.loads(results_path.read_text())
        if res.get("status") == "finished":
            log.info("run %s already finished; nothing to do", run_dir)
            return res

    phi_org.eval().requires_grad_(False)
    if cfg.run.channels_last:
        phi_org = phi_org.to(memory_format=torch.channels_last)
    phi = copy.deepcopy(phi_org).requires_grad_(True)
    org_ref = {k: v.clone() for k, v in phi_org.state_dict().items()}  # checked unchanged at the end
    opt = build_optimizer(phi.parameters(), cfg.optim, device)

    start = 0
    found = ckpt.load_latest(run_dir)
    if found is not None:
        start, state = found
        phi.net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        ckpt.set_rng_state(state["rng"])
        log.info("resumed %s from step %d", run_dir, start)

    if is_main:
        label = precision_label(cfg.run.precision, precision)  # e.g. "fp32 (auto)"
        log.info("precision: %s on %s", label, device)
        tracking.update_manifest(run_dir, world, start, {"precision": label})
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    metrics = tracking.MetricsLog(run_dir, start, steps=cfg.optim.steps, initial_done="initial" in results,
                                  enabled=is_main)
    if is_main:
        metrics.wandb_run = tracking.start_wandb(run_dir, cfg.run.name + "-" + cfg.hash(), group,
                                                 cfg.to_dict(), cfg.run.wandb)

    # ---- compile, then DDP (the plain `phi` is kept for saving, the attack uses the unwrapped callable) ----
    phi_fn: nn.Module = torch.compile(phi) if cfg.run.compile else phi
    phi_ddp = acc.prepare_model(phi_fn) if world > 1 else phi_fn
    models = StepModels(phi=phi, phi_fn=phi_fn, phi_ddp=phi_ddp, phi_org=phi_org, head=head)

    # ---- evaluation helper (rank 0; the others wait) ----
    probe_data, test_data = eval_data(cfg, device)

    def run_eval(step: int, strong: bool) -> dict[str, Any] | None:
        res = None
        if is_main:
            was_training = phi.training
            phi.eval()
            res = evaluate(phi, probe_data, test_data, cfg=cfg, device=device,
                           n_iter=cfg.eval.final_attack_steps if strong else cfg.eval.attack_steps,
                           n_targets=cfg.eval.final_targets if strong else 0, head=head, seed=cfg.run.seed,
                           precision=precision)
            phi.train(was_training)
            metrics.log({"step": step, "kind": "eval_final" if strong else "eval", **res})
        acc.wait_for_everyone()
        return res

    bn_train = cfg.model.bn == "train"
    phi.train(bn_train)
    if start == 0 and "initial" not in results:
        run_eval(0, strong=False)
        r0 = run_eval(0, strong=True)
        if is_main:
            results = {"status": "running", "initial": r0}
            tracking.write_json(results_path, results)

    loader = build_train_loader(cfg, rank=rank, world_size=world, start_step=start, device=device)
    bad = torch.zeros((), dtype=torch.bool, device=device)  # device-side: no sync per step
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    sums: dict[str, Tensor] = {}
    n_sum, t_last, steps = 0, time.perf_counter(), cfg.optim.steps
    pbar = None
    if is_main and cfg.run.progress:
        from tqdm import tqdm

        pbar = tqdm(total=steps, initial=start, desc=f"finetune {cfg.run.name}", dynamic_ncols=True)

    def check_finite() -> None:
        if bool(bad):  # host sync, only at log/checkpoint steps
            raise NonFiniteLossError(int(first_bad))

    def save(step: int) -> None:
        check_finite()  # never checkpoint weights that saw a non-finite loss
        if is_main:
            ckpt.save(run_dir, step, _state(phi, opt, step, cfg), keep_last=cfg.run.keep_last)
        acc.wait_for_everyone()

    try:
        for step in range(start, steps):
            x, y = next(loader)
            out = fare_step(models, opt, x, y, step, cfg, rank=rank, world=world, precision=precision)
            nonfinite = ~torch.isfinite(out["loss"])
            # full_like is a device-side fill; torch.tensor(step, device=...) would be a blocking copy (a sync)
            first_bad = torch.where(nonfinite & ~bad, torch.full_like(first_bad, step), first_bad)
            bad = bad | nonfinite
            for k, v in out.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            n_sum += 1
            done = step + 1
            if pbar is not None:
                pbar.update(1)

            if done % cfg.run.log_every == 0 or done == steps:
                check_finite()
                if world > 1:  # mean of the logged metrics over ranks (one small all-reduce per log step)
                    sums = {k: acc.reduce(v, reduction="mean") for k, v in sums.items()}
                now = time.perf_counter()
                rec = {"step": done, "kind": "train", "lr": opt.param_groups[0]["lr"],
                       "img_per_s": n_sum * cfg.data.batch_size / max(now - t_last, 1e-9),
                       **{k: float(v) / n_sum for k, v in sums.items()}}
                if is_main:
                    metrics.log(rec)
                    if pbar is not None:
                        pbar.set_postfix(loss=f"{rec['loss']:.4g}", adv=f"{rec['adv_loss']:.4g}")
                sums, n_sum, t_last = {}, 0, time.perf_counter()
            # order matters for exact resume: records of a step are written before its checkpoint
            if cfg.eval.every and done % cfg.eval.every == 0 and done != steps:
                run_eval(done, strong=False)
            if done % cfg.run.ckpt_every == 0 and done != steps:
                save(done)
            if (should_stop is not None and done % cfg.run.log_every == 0 and done != steps
                    and _any_rank(should_stop(), device)):  # the last step goes on to the final save
                if done % cfg.run.ckpt_every != 0:
                    save(done)
                raise Interrupted(done)
        # ---- end: final checkpoint, evaluations, invariants ----
        save(steps)
    except NonFiniteLossError as e:
        if is_main:  # the sweep reads this to mark the run failed; a rerun resumes from the last good checkpoint
            results.update({"status": "failed", "error": str(e), "failed_step": e.step})
            tracking.write_json(results_path, results)
        raise
    finally:
        if pbar is not None:
            pbar.close()
    for k, v in phi_org.state_dict().items():
        if not torch.equal(v, org_ref[k]):
            raise RuntimeError(f"the frozen reference changed during training ({k}); this is a bug")
    run_eval(steps, strong=False)
    final = run_eval(steps, strong=True)
    if is_main:
        results.update({"status": "finished", "final": final, "steps": steps, "config_hash": cfg.hash(),
                        "alpha": cfg.loss.alpha, "lr": cfg.optim.lr})
        tracking.write_json(results_path, results)
        if metrics.wandb_run is not None:
            metrics.wandb_run.summary.update({f"final/{k}": v for k, v in (final or {}).items()})
            metrics.wandb_run.finish()
    metrics.close()
    acc.wait_for_everyone()
    return results


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on any rank (ranks must agree on the step they stop at)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


