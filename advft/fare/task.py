"""FARE fine-tuning of a pretrained encoder as an engine task: ``finetune(cfg)`` runs (or resumes) one run.

One step, per rank (B = per-device batch):

    x  in [0,1]                                        from the loader, never normalised
    t  = phi_org(x)                                    frozen copy: eval mode, no grad, never DDP-wrapped
    z  = apgd(phi, x, ||phi(.) - t||^2)                phi UNWRAPPED, eval mode, parameters frozen for the
                                                       attack: autograd computes input gradients only, no
                                                       DDP hook fires, BN statistics never see the iterates
    L  = LOSSES[loss.name](phi(z), phi(x), t)           DDP-wrapped phi (advft.losses; FARE: ||phi(z) - t||^2 +
                                                       alpha ||phi(x) - t||^2, x skipped at alpha 0); phi(z) and
                                                       phi(x) separate forwards with train-mode BN (SyncBN on
                                                       several ranks), one forward of [z; x] with eval-mode BN
    AdamW step with lr = schedule(step)

Everything random in a step derives from (seed, step): the attack's start noise is drawn for the GLOBAL
batch and sliced per rank, and the data order is a function of (seed, epoch). A resumed run therefore
continues bit-identically, and N ranks compute what one process computes with the same global batch.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from advft import config as C
from advft.engine import RunDir, Task, run
from advft.engine.optim import adamw
from advft.fare.step import FareSpec, StepModels, fare_step
from advft.models import encoder_state_dict, load_encoder, load_head
from advft.sync_bn import convert_sync_bn


def build_optimizer(params, cfg: C.OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    return adamw(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=cfg.fused, device=device)


class FareTask(Task):
    """phi_org frozen and never wrapped; phi trainable: the attack uses phi compiled and unwrapped, the training
    forward the DDP-wrapped phi, compiled as a whole; the plain ``phi`` is kept for saving."""

    name = "finetune"
    progress_keys = ("loss", "adv_loss")

    def __init__(self, cfg: C.Config, group: str | None = None) -> None:
        super().__init__(cfg)
        self.wandb_group = group

    def validate(self, world_size: int) -> None:
        C.validate(self.cfg, world_size=world_size)

    def load_config(self, path: Path) -> C.Config:
        return C.load(path)

    def to_toml(self) -> str:
        return C.to_toml(self.cfg)

    def build(self, device: torch.device, precision: str) -> None:
        m, run_cfg = self.cfg.model, self.cfg.run
        self.device, self.spec = device, FareSpec.of(self.cfg, precision)
        phi_org = load_encoder(m.checkpoint, arch=m.arch, stem=m.stem, normalize=m.normalize).to(device)
        self.head = load_head(m.head, phi_org.feature_dim).to(device).requires_grad_(False) if m.head else None
        phi_org.eval().requires_grad_(False)
        if run_cfg.channels_last:
            phi_org = phi_org.to(memory_format=torch.channels_last)
        self.phi_org, self.phi = phi_org, copy.deepcopy(phi_org).requires_grad_(True)
        self.org_ref = {k: v.clone() for k, v in phi_org.state_dict().items()}  # checked unchanged at the end
        self.opt = build_optimizer(self.phi.parameters(), self.cfg.optim, device)

    def artifacts(self, run: RunDir) -> list[tuple[str, str, Path]]:
        final = run.checkpoints / f"step_{self.cfg.optim.steps:08d}.pt"
        return [("base-encoder", "model", Path(self.cfg.model.checkpoint)), (f"{run.path.name}-final", "model", final)]

    def load_state(self, state: dict[str, Any]) -> None:
        self.phi.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])

    def state(self) -> dict[str, Any]:
        return {"format": "advft", "arch": self.cfg.model.arch, "stem": self.cfg.model.stem,
                "model": {k: v.detach().cpu() for k, v in encoder_state_dict(self.phi).items()},
                "optimizer": self.opt.state_dict()}

    def prepare(self, acc: Any) -> None:
        from advft.data import eval_data

        if acc.num_processes > 1 and self.spec.bn_train and self.cfg.model.sync_bn:
            # the same Parameters and state-dict keys: optimiser, checkpoints and plain-BN encoders see no change;
            # in eval mode (attack, evaluation) the layers use running statistics and never synchronise
            self.phi = convert_sync_bn(self.phi, self.device.type)
        compile_ = self.cfg.run.compile
        phi_fn: nn.Module = torch.compile(self.phi) if compile_ else self.phi
        phi_ddp = phi_fn
        if acc.num_processes > 1:  # compile the DDP module: DDPOptimizer splits the graph at bucket boundaries
            ddp = acc.prepare_model(self.phi)  # so the all-reduces overlap the backward (DDP over a compiled
            phi_ddp = torch.compile(ddp) if compile_ else ddp  # module would all-reduce after the whole backward)
        self.models = StepModels(phi=self.phi, phi_fn=phi_fn, phi_ddp=phi_ddp, phi_org=self.phi_org, head=self.head)
        self.rank, self.world = acc.process_index, acc.num_processes
        self.probe_data, self.test_data = eval_data(self.cfg, self.device)
        self.phi.train(self.spec.bn_train)

    def evaluate(self, step: int, final: bool, check: Callable[[], None]) -> list[tuple[str, dict[str, Any]]]:
        out = [("eval", self._eval(strong=False, check=check))]
        if final:
            out.append(("eval_final", self._eval(strong=True, check=check)))
        return out

    def _eval(self, strong: bool, check: Callable[[], None]) -> dict[str, Any]:
        """The strong evaluation (step 0 and the end: results.json's numbers) is a measurement and runs in
        fp32 on every device; the periodic ones keep the run's precision (a training curve, cheaper)."""
        from advft.evaluate import evaluate

        ev = self.cfg.eval
        was_training = self.phi.training
        self.phi.eval()
        res = evaluate(self.phi, self.probe_data, self.test_data, cfg=self.cfg, device=self.device,
                       n_iter=ev.final_attack_steps if strong else ev.attack_steps,
                       n_targets=ev.final_targets if strong else 0,
                       head=self.head if ev.head == "fixed" else None, seed=self.cfg.run.seed,
                       precision="fp32" if strong else self.spec.precision, final=strong,
                       eps_extra=ev.final_eps_extra if strong else 0.0, check=check)
        self.phi.train(was_training)
        return res

    def step(self, x: Tensor, y: Tensor, step: int) -> dict[str, Tensor]:
        return fare_step(self.models, self.opt, x, y, step, self.spec, rank=self.rank, world=self.world)

    def finish(self, run: RunDir, final: dict[str, Any] | None, is_main: bool) -> dict[str, Any]:
        for k, v in self.phi_org.state_dict().items():
            if not torch.equal(v, self.org_ref[k]):
                raise RuntimeError(f"the frozen reference changed during training ({k}); this is a bug")
        return {"loss": self.cfg.loss.name, "alpha": self.cfg.loss.alpha, "beta": self.cfg.loss.beta,
                "lr": self.cfg.optim.lr}


def finetune(cfg: C.Config, *, should_stop: Callable[[], bool] | None = None, group: str | None = None,
             accelerator: Any = None) -> dict[str, Any]:
    """Run (or resume, or return the results of a finished) fine-tuning run. Returns results.json's dict.

    ``group``: the wandb group (the sweep name). See :func:`advft.engine.run` for ``should_stop``.
    """
    return run(FareTask(cfg, group), should_stop=should_stop, accelerator=accelerator)
