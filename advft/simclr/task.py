"""SimCLR pretraining as an engine task: ``pretrain(cfg)`` runs (or resumes) one run and writes ``encoder.pt``.

This is how a base encoder phi_org for fine-tuning is made when none is downloaded. One step, per rank
(B = per-device batch, G = global batch):

    x  in [0,1]                         from the same loader as fine-tuning (its evaluation view, no crop)
    v1, v2 = simclr_views(x)            two augmentations ON THE DEVICE, batched, drawn for the GLOBAL batch
    p  = head(encoder([v1; v2]))        ONE forward of both views (BatchNorm sees 2B images), DDP-wrapped
    p1, p2 gathered from all ranks      with autograd, so every image has all 2G - 2 negatives
    L  = nt_xent(p1, p2, temperature)   AdamW or SGD+momentum, lr = peak * lr_factor(step)

Apart from the initial weights (drawn from run.seed) nothing reads the global RNG, and the data order is a
function of (seed, epoch), so a resumed run continues bit-identically. BatchNorm statistics are per rank
unless ``model.sync_bn`` (GPU, several ranks): SimCLR's "global BN", without which a rank could tell
positives apart by their shared batch statistics.

Outputs besides the engine's record: ``encoder.pt`` (advft-encoder format, read by
:func:`advft.models.load_encoder`); a checkpoint is itself readable by load_encoder too.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advft import config as C
from advft.distributed import autocast
from advft.engine import RunDir, Task, run
from advft.models import encoder_state_dict
from advft.schedule import lr_factor
from advft.simclr.augment import simclr_views
from advft.simclr.config import PretrainConfig, load_config, validate
from advft.simclr.loss import gather_views, nt_xent_logits
from advft.simclr.model import build_optimizer, build_simclr, save_encoder

ENCODER_FILE = RunDir.ENCODER
log = logging.getLogger(__name__)


def probe_accuracy(encoder: nn.Module, probe_data: Callable, test_data: Callable, *, device: torch.device,
                   precision: str, epochs: int, check: Callable[[], None] | None = None) -> dict[str, Any]:
    """Accuracy (%) on the held-out batches of a linear probe fitted on the frozen encoder's features.
    Called on every rank: the features are extracted split over ranks (:mod:`advft.evaluate`)."""
    from advft.evaluate import broadcast_head, extract_features, fit_probe

    encoder.eval()
    f, y = extract_features(encoder, probe_data(), device, precision, check)
    ft, yt = extract_features(encoder, test_data(), device, precision, check)
    n_classes = int(torch.cat([y, yt]).max()) + 1
    head = broadcast_head(fit_probe(f, y, n_classes, epochs=epochs))
    with torch.no_grad():
        train_acc = 100.0 * (head(f).argmax(1) == y).float().mean().item()
        test_acc = 100.0 * (head(ft).argmax(1) == yt).float().mean().item()
    return {"probe_acc": test_acc, "probe_train_acc": train_acc, "probe_n": int(y.numel()), "n_test": int(yt.numel()),
            "chance_acc": 100.0 / n_classes}


class SimCLRTask(Task):
    """The net is built in a fixed order (sync BN, compile, DDP); ``self.net`` stays the plain module for
    saving and evaluation."""

    name = "pretrain"
    wandb_group = "pretrain"
    progress_keys = ("loss", "pos_acc")

    def validate(self, world_size: int) -> None:
        validate(self.cfg, world_size=world_size)

    def load_config(self, path: Path) -> PretrainConfig:
        return load_config(path)

    def to_toml(self) -> str:
        return C.to_toml(self.cfg)

    def build(self, device: torch.device, precision: str) -> None:
        cfg = self.cfg
        self.device, self.precision = device, precision
        with torch.random.fork_rng(devices=[]):  # initial weights from the run seed, the caller's RNG untouched
            torch.manual_seed(cfg.run.seed)
            net = build_simclr(cfg.model).to(device)
        self.mf = torch.channels_last if cfg.run.channels_last else torch.preserve_format
        self.net = net.to(memory_format=self.mf)
        self.opt = build_optimizer(self.net, cfg.optim, device)

    def outputs_present(self, run: RunDir) -> bool:
        """encoder.pt is there and loads (a truncated or damaged file is made again from the last checkpoint)."""
        if not run.encoder.is_file():
            return False
        try:
            torch.load(run.encoder, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError... for a damaged file
            log.warning("%s is unreadable (%s: %s); making it again from the run's last checkpoint", run.encoder,
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            return False
        return True

    def artifacts(self, run: RunDir) -> list[tuple[str, str, Path]]:
        return [(f"{run.path.name}-encoder", "model", run.encoder)]

    def load_state(self, state: dict[str, Any]) -> None:
        self.net.encoder.net.load_state_dict(state["model"])
        self.net.head.load_state_dict(state["head"])
        self.opt.load_state_dict(state["optimizer"])

    def state(self) -> dict[str, Any]:
        m = self.cfg.model
        # 'format': 'advft' with the trunk under 'model': a checkpoint is itself readable by load_encoder.
        return {"format": "advft", "kind": "simclr", "arch": m.arch, "stem": m.stem, "normalize": m.normalize,
                "model": {k: v.detach().cpu() for k, v in encoder_state_dict(self.net.encoder).items()},
                "head": {k: v.detach().cpu() for k, v in self.net.head.state_dict().items()},
                "optimizer": self.opt.state_dict()}

    def prepare(self, acc: Any) -> None:
        from advft.data import eval_data

        self.rank, self.world = acc.process_index, acc.num_processes
        if self.world > 1 and self.device.type == "cuda" and self.cfg.model.sync_bn:
            self.net = nn.SyncBatchNorm.convert_sync_batchnorm(self.net)  # swaps the BN children in place
        net_fn: nn.Module = torch.compile(self.net) if self.cfg.run.compile else self.net
        self.net_ddp = acc.prepare_model(net_fn) if self.world > 1 else net_fn
        self.probe_data, self.test_data = eval_data(self.cfg, self.device)
        self.net.train()

    def evaluate(self, step: int, final: bool, check: Callable[[], None]) -> list[tuple[str, dict[str, Any]]]:
        res = probe_accuracy(self.net.encoder, self.probe_data, self.test_data, device=self.device,
                             precision=self.precision, epochs=self.cfg.eval.probe_epochs, check=check)
        self.net.train()
        return [("eval", res)]

    def step(self, x: Tensor, y: Tensor, step: int) -> dict[str, Tensor]:
        cfg = self.cfg
        for g in self.opt.param_groups:
            g["lr"] = cfg.optim.lr * lr_factor(step, cfg.optim.warmup_steps, cfg.optim.steps, cfg.optim.min_lr_ratio)
        v1, v2 = simclr_views(x, cfg.simclr, seed=cfg.run.seed, step=step, rank=self.rank, world_size=self.world)
        with autocast(self.device, self.precision):
            z = self.net_ddp(torch.cat([v1, v2]).contiguous(memory_format=self.mf))
        z1, z2 = gather_views(*z.float().chunk(2))  # the global batch: the loss is the same on every rank
        logits, targets = nt_xent_logits(z1, z2, cfg.simclr.temperature)
        loss = F.cross_entropy(logits, targets)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), cfg.optim.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # how often the positive is the most similar of the 2G - 1 candidates
            pos_acc = (logits.argmax(1) == targets).float().mean() * 100
        return {"loss": loss.detach(), "pos_acc": pos_acc}

    def finish(self, run: RunDir, final: dict[str, Any] | None, is_main: bool) -> dict[str, Any]:
        if is_main:
            save_encoder(self.net.encoder, run.encoder)
        return {"probe_acc": (final or {}).get("probe_acc"), "encoder": str(run.encoder)}


def pretrain(cfg: PretrainConfig, *, should_stop: Callable[[], bool] | None = None, accelerator: Any = None) -> Path:
    """Run (or resume, or return the output of a finished) SimCLR pretraining. Returns the path of encoder.pt.

    See :func:`advft.engine.run` for ``should_stop``, stop requests and non-finite losses.
    """
    run(SimCLRTask(cfg), should_stop=should_stop, accelerator=accelerator)
    return RunDir(cfg.run.dir).encoder
