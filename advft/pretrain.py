"""SimCLR pretraining of an encoder: ``pretrain(cfg)`` runs (or resumes) one run and writes ``encoder.pt``.

This is how a base encoder phi_org for fine-tuning is made when none is downloaded. One step, per rank
(B = per-device batch, G = global batch):

    x  in [0,1]                         from the same loader as fine-tuning (its evaluation view, no crop)
    v1, v2 = simclr_views(x)            two augmentations ON THE DEVICE, batched; every random number comes
                                        from a generator seeded by (seed, step) and is drawn for the GLOBAL
                                        batch, this rank taking its rows
    p  = head(encoder([v1; v2]))        ONE forward of both views (BatchNorm sees 2B images), DDP-wrapped
    p1, p2 gathered from all ranks      with autograd, so every image has all 2G - 2 negatives
    L  = nt_xent(p1, p2, temperature)   AdamW or SGD+momentum, lr = peak * lr_factor(step)

The loss is computed on the gathered global batch by every rank: the gather's backward sums the
gradients of all ranks and DDP averages, which together give exactly the gradient of the global loss.
Apart from the initial weights (drawn from run.seed) nothing reads the global RNG, and the data order is a
function of (seed, epoch), so a resumed run continues bit-identically. BatchNorm statistics are per rank unless ``model.sync_bn`` (GPU, several ranks):
SimCLR's "global BN", without which a rank could tell positives apart by their shared batch statistics.

Outputs in ``<run.root>/<run.name>/``: config.toml, manifest.json, metrics.jsonl (train: loss, pos_acc, lr,
img_per_s; eval: linear-probe accuracy on held-out data), checkpoints/, ``encoder.pt`` (advft-encoder
format, read by :func:`advft.models.load_encoder`) and results.json.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from advft import checkpoint as ckpt
from advft import config as C
from advft import tracking
from advft.distributed import autocast, make_accelerator, precision_label, run_precision
from advft.models import ARCHS, NORMALIZE, STEMS, Encoder, build_encoder, encoder_state_dict
from advft.schedule import lr_factor
from advft.step import step_generator
from advft.train import Interrupted, NonFiniteLossError, _any_rank

log = logging.getLogger(__name__)

AUGMENT_STREAM = 1  # step_generator stream of the augmentations (fine-tuning's attack noise uses 0)


# ======================================================================================================
# Configuration
# ======================================================================================================

@dataclass(frozen=True)
class PretrainModelConfig:
    arch: str = "resnet50"  # resnet50 | resnet18 | tiny
    stem: str = "cifar"  # cifar (3x3 s1 conv1, no max-pool) | imagenet
    normalize: str = "none"  # none | imagenet | cifar10: mean/std inside the encoder's forward
    proj_dim: int = 128  # output of the projection head (where the loss is computed)
    proj_hidden: int = 0  # hidden width of the head; 0 = the encoder's feature_dim (as SimCLR)
    proj_bn: bool = True  # BatchNorm after the head's hidden layer
    sync_bn: bool = True  # synchronise BatchNorm over ranks (GPU with several ranks only; gloo has none)


@dataclass(frozen=True)
class PretrainOptimConfig:
    optimizer: str = "adamw"  # adamw | sgd (with momentum); LARS is not provided
    lr: float = 1e-3  # PEAK lr, used as given (no automatic batch-size scaling)
    weight_decay: float = 1e-4  # not applied to biases and BatchNorm parameters
    momentum: float = 0.9  # sgd only
    betas: tuple[float, float] = (0.9, 0.999)  # adamw only
    warmup_steps: int = 500
    steps: int = 10000
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    fused: bool = True  # fused AdamW kernel where the device supports it
    grad_clip: float = 0.0  # 0 = off


@dataclass(frozen=True)
class SimCLRConfig:
    temperature: float = 0.5  # of the NT-Xent softmax (the paper's choice for CIFAR-10)
    crop_scale_min: float = 0.08  # random resized crop keeps an area fraction in [crop_scale_min, 1]
    flip_p: float = 0.5  # horizontal flip
    jitter_p: float = 0.8  # colour jitter is applied with this probability
    jitter_strength: float = 0.5  # s: brightness/contrast/saturation 0.8 s, hue 0.2 s (0.5 -> 0.4,0.4,0.4,0.1)
    grayscale_p: float = 0.2
    blur_p: float = 0.0  # Gaussian blur (sigma in [0.1, 2], kernel 10 % of the side); SimCLR uses 0.5 at 224 px


@dataclass(frozen=True)
class PretrainEvalConfig:
    every: int = 0  # steps between linear-probe evaluations (0 = only at step 0 and at the end)
    probe_train_size: int = 10000  # images of the training split the probe is fitted on
    test_size: int = 1000  # images of the held-out split the accuracy is measured on
    batch_size: int = 256
    probe_epochs: int = 100  # full-batch Adam epochs of the probe fit


@dataclass(frozen=True)
class PretrainConfig:
    data: C.DataConfig = field(default_factory=C.DataConfig)
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    optim: PretrainOptimConfig = field(default_factory=PretrainOptimConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    eval: PretrainEvalConfig = field(default_factory=PretrainEvalConfig)
    run: C.RunConfig = field(default_factory=C.RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = dataclasses.asdict(self)
        for sec in out.values():
            for k, v in sec.items():
                if isinstance(v, tuple):
                    sec[k] = list(v)
        return out

    def hash(self) -> str:
        """Short hash of everything that changes the result (run name, root, progress bar, wandb excluded)."""
        d = self.to_dict()
        d["run"] = {k: v for k, v in d["run"].items() if k not in ("name", "root", "progress", "wandb")}
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]


SECTIONS: dict[str, type] = {
    "data": C.DataConfig, "model": PretrainModelConfig, "optim": PretrainOptimConfig,
    "simclr": SimCLRConfig, "eval": PretrainEvalConfig, "run": C.RunConfig,
}

CHOICES: dict[str, tuple[str, ...]] = {
    "data.format": C.CHOICES["data.format"],
    "model.arch": ARCHS,
    "model.stem": STEMS,
    "model.normalize": tuple(NORMALIZE),
    "optim.optimizer": ("adamw", "sgd"),
    "run.device": C.CHOICES["run.device"],
    "run.precision": C.CHOICES["run.precision"],
    "run.wandb": C.CHOICES["run.wandb"],
}


def load_config(path: str | os.PathLike | None,
                overrides: list[str] | Mapping[str, Any] | None = None) -> PretrainConfig:
    """A pretraining job file (or the defaults when path is None) plus ``--set`` overrides; types checked.

    Ranges and paths are checked by :func:`validate`. Raises ConfigError with one line naming the key.
    """
    raw: dict[str, Any] = C.read_toml(path) if path is not None else {}
    if isinstance(overrides, (list, tuple)):
        for item in overrides:
            _check_key(item.split("=", 1)[0].strip())
        overrides = C.parse_set(list(overrides), SECTIONS)
    for sec, body in raw.items():
        if sec in SECTIONS and isinstance(body, Mapping):  # other shapes get the generic section errors
            for name in body:
                _check_key(f"{sec}.{name}")
    return PretrainConfig(**C.build_sections(SECTIONS, raw, overrides))


def _check_key(key: str) -> None:
    """ConfigError with the closest valid key for a misspelt one (the generic checks cannot suggest ours)."""
    keys = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
    if key in keys or "." not in key:
        return  # valid, or malformed: the generic parser gives the message
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f" (sections: {', '.join(SECTIONS)})"
    raise C.ConfigError(f"unknown config key '{key}'{hint}")


def validate(cfg: PretrainConfig, world_size: int = 1, check_paths: bool = True) -> PretrainConfig:
    """Check choices, ranges and paths; raise ConfigError with one line naming the key. Returns cfg."""
    d = cfg.to_dict()
    for key, allowed in CHOICES.items():
        s, n = key.split(".")
        if d[s][n] not in allowed:
            raise C.ConfigError(f"{key} = {d[s][n]!r} is not valid; choose one of: {', '.join(allowed)}")

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise C.ConfigError(msg)

    data, model, optim, sim, ev, run = cfg.data, cfg.model, cfg.optim, cfg.simclr, cfg.eval, cfg.run
    need(data.train_transform == "none",
         f"data.train_transform = {data.train_transform!r}: pretraining crops and flips on the device "
         f"(simclr.crop_scale_min, simclr.flip_p); use 'none' so images are not cropped twice")
    need(data.resolution >= 8, f"data.resolution = {data.resolution} must be >= 8")
    need(data.batch_size >= 2, f"data.batch_size = {data.batch_size} must be >= 2 (NT-Xent needs negatives)")
    need(data.batch_size % world_size == 0,
         f"data.batch_size = {data.batch_size} is not divisible by the world size {world_size}; "
         f"use a multiple of {world_size}")
    need(data.num_workers >= 0, f"data.num_workers = {data.num_workers} must be >= 0")
    need(data.synthetic_size >= data.batch_size or data.format != "synthetic",
         f"data.synthetic_size = {data.synthetic_size} must be >= data.batch_size = {data.batch_size}")
    need(model.proj_dim >= 1, f"model.proj_dim = {model.proj_dim} must be >= 1")
    need(model.proj_hidden >= 0, f"model.proj_hidden = {model.proj_hidden} must be >= 0 (0 = feature_dim)")
    need(optim.lr > 0, f"optim.lr = {optim.lr} must be > 0")
    need(optim.weight_decay >= 0, f"optim.weight_decay = {optim.weight_decay} must be >= 0")
    need(0 <= optim.momentum < 1, f"optim.momentum = {optim.momentum} must be in [0, 1)")
    need(all(0 <= b < 1 for b in optim.betas), f"optim.betas = {optim.betas} must lie in [0, 1)")
    need(optim.steps >= 1, f"optim.steps = {optim.steps} must be >= 1")
    need(0 <= optim.warmup_steps <= optim.steps,
         f"optim.warmup_steps = {optim.warmup_steps} must be between 0 and optim.steps = {optim.steps}")
    need(0 <= optim.min_lr_ratio <= 1, f"optim.min_lr_ratio = {optim.min_lr_ratio} must be in [0, 1]")
    need(optim.grad_clip >= 0, f"optim.grad_clip = {optim.grad_clip} must be >= 0")
    # Below ~0.01 the logits exceed 100 and fp32 softmax gradients become one-hot; above 10 all pairs look alike.
    need(0.01 <= sim.temperature <= 10, f"simclr.temperature = {sim.temperature} must be in [0.01, 10] "
         f"(SimCLR uses 0.1-1; 0.5 for CIFAR-10)")
    need(0 < sim.crop_scale_min <= 1, f"simclr.crop_scale_min = {sim.crop_scale_min} must be in (0, 1]")
    need(0 <= sim.jitter_strength <= 2.5,
         f"simclr.jitter_strength = {sim.jitter_strength} must be in [0, 2.5] (the hue shift 0.2 s is at most 0.5)")
    for k in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
        need(0 <= getattr(sim, k) <= 1, f"simclr.{k} = {getattr(sim, k)} must be a probability in [0, 1]")
    need(ev.every >= 0, f"eval.every = {ev.every} must be >= 0 (0 = only at the start and the end)")
    for k in ("probe_train_size", "test_size", "batch_size", "probe_epochs"):
        need(getattr(ev, k) >= 1, f"eval.{k} = {getattr(ev, k)} must be >= 1")
    need(run.log_every >= 1, f"run.log_every = {run.log_every} must be >= 1")
    need(run.ckpt_every >= 1, f"run.ckpt_every = {run.ckpt_every} must be >= 1")
    need(run.keep_last >= 1, f"run.keep_last = {run.keep_last} must be >= 1")
    C.check_name(run.name, "run.name")
    if data.format in ("ffcv", "dali"):
        C._check_extra(data.format)
    if check_paths and data.format != "synthetic":
        need(bool(data.path), f"data.path is empty; data.format = '{data.format}' needs a dataset path "
                              f"(e.g. --set data.path=/data/{data.format})")
        need(Path(data.path).exists() or (data.format == "cifar10" and data.download),
             f"data.path: {data.path} does not exist")
        if data.val_path:
            need(Path(data.val_path).exists(), f"data.val_path: {data.val_path} does not exist")
    return cfg


# ======================================================================================================
# Loss
# ======================================================================================================

def _nt_xent_logits(z1: Tensor, z2: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(2N, 2N) cosine-similarity logits with the diagonal at -inf, and each row's positive column."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = (z @ z.t()) / temperature
    # An anchor is never its own negative: -inf drops it from the softmax denominator.
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    idx = torch.arange(n, device=z.device)
    return logits, torch.cat([idx + n, idx])


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """NT-Xent (normalized temperature-scaled cross entropy) of two views of N images, a scalar.

    ``z1``, ``z2``: (N, D); row i of each is one view of image i, so (z1[i], z2[i]) is a positive pair.
    Rows are L2-normalised here. Each of the 2N rows is an anchor a with similarity s(a, b) = cos / T to
    every other row; its positive is its pair, its 2N - 2 negatives are all other rows (never itself):
    loss_a = -log( exp s(a, pos) / sum_{b != a} exp s(a, b) ). Returned: the mean over the 2N anchors,
    computed in fp32 whatever the input dtype.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent expects two (N, D) tensors of equal shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    logits, targets = _nt_xent_logits(z1, z2, temperature)
    return F.cross_entropy(logits, targets)


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 (rank order) whose backward sums every rank's gradient of this rank's rows.

    Written here rather than taken from torch.distributed.nn (deprecated) or _functional_collectives (private,
    renamed between releases); the backward is an all-reduce then a slice, tiny for (2B, proj_dim) tensors.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # sum: each rank's loss depends on every rank's rows
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_views(z1: Tensor, z2: Tensor) -> tuple[Tensor, Tensor]:
    """The projections of all ranks in rank order (the global batch), differentiable; identity on one process.

    The backward sums every rank's gradient for this rank's rows, so a loss computed identically on every
    rank, followed by DDP's gradient averaging, gives exactly the gradient of that one global loss.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z1, z2
    both = _GatherRows.apply(torch.stack([z1, z2], dim=1))  # one collective for both views: (G, 2, D)
    return both[:, 0], both[:, 1]


# ======================================================================================================
# Augmentations: batched on the device, every random number from an explicit generator
# ======================================================================================================

_CROP_TRIES = 10  # random-resized-crop draws per image before falling back to the central crop
_CROP_RATIO = (3 / 4, 4 / 3)  # aspect-ratio range of the crops (log-uniform)
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, as the usual grayscale conversion


def draw_augment_params(n: int, height: int, width: int, aug: SimCLRConfig,
                        generator: torch.Generator) -> dict[str, Tensor]:
    """Random parameters of ``n`` SimCLR augmentations, on the generator's device.

    The same number of values is drawn whatever the settings, so changing one probability does not
    reshuffle the others. Keys: ``box`` (n, 4) crop (top, left, height, width) in pixels, ``flip``,
    ``jitter``, ``gray``, ``blur`` (n,) bool, ``factors`` (n, 4) brightness/contrast/saturation factors
    and hue shift, ``order`` (n, 4) the order of the four jitter operations, ``sigma`` (n,) blur std in pixels.
    """
    dev = generator.device

    def u(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, device=dev)

    # Random resized crop as torchvision samples it: up to ten (area, log-aspect) draws, the first that
    # fits the image wins, otherwise the largest central crop with an aspect inside the range.
    area = height * width * (aug.crop_scale_min + (1 - aug.crop_scale_min) * u(n, _CROP_TRIES))
    lo, hi = math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1])
    aspect = torch.exp(lo + (hi - lo) * u(n, _CROP_TRIES))
    cw = torch.round(torch.sqrt(area * aspect))
    ch = torch.round(torch.sqrt(area / aspect))
    fits = (cw >= 1) & (cw <= width) & (ch >= 1) & (ch <= height)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # argmax returns the first maximum
    any_fit = fits.any(1)
    r = min(max(width / height, _CROP_RATIO[0]), _CROP_RATIO[1])
    fb_w, fb_h = (round(height * r), height) if width / height > r else (width, round(width / r))
    cw = torch.where(any_fit, cw.gather(1, first).squeeze(1), torch.full_like(any_fit, fb_w, dtype=cw.dtype))
    ch = torch.where(any_fit, ch.gather(1, first).squeeze(1), torch.full_like(any_fit, fb_h, dtype=ch.dtype))
    pos = u(n, 2)
    top = torch.where(any_fit, torch.floor(pos[:, 0] * (height - ch + 1)), torch.floor((height - ch) / 2))
    left = torch.where(any_fit, torch.floor(pos[:, 1] * (width - cw + 1)), torch.floor((width - cw) / 2))

    flip = u(n) < aug.flip_p
    jitter = u(n) < aug.jitter_p
    s = aug.jitter_strength
    f = 2 * u(n, 4) - 1  # uniform in [-1, 1]
    factors = torch.stack([(1 + 0.8 * s * f[:, 0]).clamp_min(0), (1 + 0.8 * s * f[:, 1]).clamp_min(0),
                           (1 + 0.8 * s * f[:, 2]).clamp_min(0), 0.2 * s * f[:, 3]], dim=1)
    order = u(n, 4).argsort(dim=1)  # torchvision's ColorJitter also applies its four operations in random order
    gray = u(n) < aug.grayscale_p
    blur = u(n) < aug.blur_p
    sigma = 0.1 + 1.9 * u(n)
    return {"box": torch.stack([top, left, ch, cw], dim=1), "flip": flip, "jitter": jitter, "factors": factors,
            "order": order, "gray": gray, "blur": blur, "sigma": sigma}


def _gray(x: Tensor) -> Tensor:
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(a: Tensor, b: Tensor, f: Tensor) -> Tensor:
    """f * a + (1 - f) * b, clamped to [0,1]; exactly ``a`` when f = 1 (the identity of every jitter op)."""
    return (f * a + (1 - f) * b).clamp_(0, 1)


def _shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of RGB images in [0,1] by ``shift`` (n,) turns, keeping HSV saturation and value."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    c = v - x.amin(1)  # chroma; where it is 0 all channels are equal, the differences below are 0 and so is h
    inv = 1 / c.clamp_min(1e-12)
    # hue in sixths of a turn, piecewise by which channel is the maximum
    h = torch.where(v == r, (g - b) * inv, torch.where(v == g, (b - r) * inv + 2, (r - g) * inv + 4))
    h = h + 6 * shift.view(-1, 1, 1)
    h = h - 6 * torch.floor(h / 6)  # into [0, 6)
    # back to RGB: channel n is V - C * clamp(min(k, 4 - k), 0, 1) with k = (n + h) mod 6, n = 5, 3, 1
    out = torch.empty_like(x)
    for i, offset in enumerate((5.0, 3.0, 1.0)):
        k = h + offset
        k = torch.where(k >= 6, k - 6, k)
        torch.sub(v, c * torch.minimum(k, 4 - k).clamp_(0, 1), out=out[:, i])
    return out.clamp_(0, 1)


def _gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with one std per image (reflect padding), kernel about 10 % of the side."""
    n, ch, hgt, wid = x.shape
    k = max(3, (hgt // 10) // 2 * 2 + 1)
    t = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    w = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None].to(x.dtype) ** 2))
    w = (w / w.sum(1, keepdim=True)).repeat_interleave(ch, 0)  # (n * ch, k): one filter per image channel
    y = F.pad(x.reshape(1, n * ch, hgt, wid), (k // 2,) * 4, mode="reflect")
    y = F.conv2d(y, w.view(n * ch, 1, 1, k), groups=n * ch)
    y = F.conv2d(y, w.view(n * ch, 1, k, 1), groups=n * ch)
    return y.view(n, ch, hgt, wid)


def apply_augment(x: Tensor, params: Mapping[str, Tensor], aug: SimCLRConfig) -> Tensor:
    """One SimCLR view of a batch: crop + resize, flip, colour jitter, grayscale, blur, in that order.

    ``x``: (n, 3, H, W), uint8 in [0, 255] or float in [0, 1]; ``params`` from :func:`draw_augment_params`.
    Returns float32 in [0, 1], (n, 3, H, W), never normalised. No host synchronisation: every per-image
    choice is a ``torch.where``, so the cost does not depend on the draws.
    """
    x = x.float().div(255) if x.dtype == torch.uint8 else x.float()
    n, _, hgt, wid = x.shape
    top, left, ch, cw = params["box"].to(x.dtype).unbind(1)
    # Crop + bilinear resize as one affine resampling. With align_corners=False the normalised coordinate
    # -1/+1 is the outer edge of the border pixels, so the box [left, left + cw) maps onto the whole
    # output; a crop is never larger than the image, so this only ever upsamples (no aliasing).
    sx = cw / wid * torch.where(params["flip"], -1.0, 1.0).to(x.dtype)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = (2 * left + cw) / wid - 1
    theta[:, 1, 1] = ch / hgt
    theta[:, 1, 2] = (2 * top + ch) / hgt - 1
    grid = F.affine_grid(theta, [n, 3, hgt, wid], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    fac = params["factors"].to(x.dtype)
    ops = torch.arange(4, device=x.device)
    for slot in range(4):
        now = (params["order"][:, slot, None] == ops) & params["jitter"][:, None]  # (n, 4): the op of this slot
        f = torch.where(now, fac, torch.ones_like(fac)).view(n, 4, 1, 1)  # 1 is the identity of the blends
        x = _blend(x, torch.zeros_like(x[:, :1]), f[:, 0:1])  # brightness
        x = _blend(x, _gray(x).mean((2, 3), keepdim=True), f[:, 1:2])  # contrast
        x = _blend(x, _gray(x), f[:, 2:3])  # saturation
        # A zero hue shift is not an exact identity in float (RGB->HSV->RGB), hence where() for hue.
        x = torch.where(now[:, 3].view(n, 1, 1, 1), _shift_hue(x, fac[:, 3]), x)
    x = torch.where(params["gray"].view(n, 1, 1, 1), _gray(x).expand_as(x), x)
    if aug.blur_p > 0:  # a config constant, not a per-image draw: no sync
        x = torch.where(params["blur"].view(n, 1, 1, 1), _gaussian_blur(x, params["sigma"]), x)
    return x.clamp_(0, 1)


def simclr_views(x: Tensor, aug: SimCLRConfig, *, seed: int, step: int, rank: int = 0,
                 world_size: int = 1) -> tuple[Tensor, Tensor]:
    """Two augmented views of this rank's batch ``x`` (B, 3, H, W), float32 in [0, 1].

    Parameters are drawn for the global batch (B * world_size images) from a generator seeded by
    (seed, step) on x's device, and this rank takes its contiguous rows: the views are the same for any
    number of ranks and for a resumed run.
    """
    b, _, hgt, wid = x.shape
    g = step_generator(seed, step, x.device, stream=AUGMENT_STREAM)
    views = []
    for _ in range(2):
        p = draw_augment_params(b * world_size, hgt, wid, aug, g)
        views.append(apply_augment(x, {k: v[rank * b:(rank + 1) * b] for k, v in p.items()}, aug))
    return views[0], views[1]


# ======================================================================================================
# Model: encoder + projection head
# ======================================================================================================

class ProjectionHead(nn.Sequential):
    """SimCLR's 2-layer MLP: Linear(in, hidden) [-> BatchNorm1d] -> ReLU -> Linear(hidden, out)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, bn: bool = True) -> None:
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden, bias=not bn)]  # BN's shift makes a bias redundant
        if bn:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)]
        super().__init__(*layers)


class SimCLRNet(nn.Module):
    """[0,1] images -> projections: ``head(encoder(x))``. The one module compiled and DDP-wrapped."""

    def __init__(self, encoder: Encoder, head: ProjectionHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


def build_simclr(cfg: PretrainModelConfig) -> SimCLRNet:
    """A freshly initialised encoder (global torch RNG, seed it first) with its projection head."""
    enc = build_encoder(cfg.arch, cfg.stem, cfg.normalize)
    head = ProjectionHead(enc.feature_dim, cfg.proj_hidden or enc.feature_dim, cfg.proj_dim, cfg.proj_bn)
    return SimCLRNet(enc, head)


def build_optimizer(model: nn.Module, cfg: PretrainOptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW or SGD+momentum; biases and BatchNorm weights (the 1-d tensors) get no weight decay."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    fused = cfg.fused and device.type in ("cuda", "cpu")
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)
    except (RuntimeError, TypeError):  # fused kernel unavailable for this device/dtype
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


# ======================================================================================================
# Evaluation
# ======================================================================================================

def probe_accuracy(encoder: nn.Module, probe_data: Callable, test_data: Callable, *, device: torch.device,
                   precision: str, epochs: int) -> dict[str, Any]:
    """Accuracy (%) on the held-out batches of a linear probe fitted on the frozen encoder's features."""
    from advft.evaluate import extract_features, fit_probe

    encoder.eval()
    f, y = extract_features(encoder, probe_data(), device, precision)
    ft, yt = extract_features(encoder, test_data(), device, precision)
    n_classes = int(torch.cat([y, yt]).max()) + 1
    head = fit_probe(f, y, n_classes, epochs=epochs)
    with torch.no_grad():
        train_acc = 100.0 * (head(f).argmax(1) == y).float().mean().item()
        test_acc = 100.0 * (head(ft).argmax(1) == yt).float().mean().item()
    return {"probe_acc": test_acc, "probe_train_acc": train_acc, "probe_n": int(y.numel()), "n_test": int(yt.numel()),
            "chance_acc": 100.0 / n_classes}


# ======================================================================================================
# The run
# ======================================================================================================

ENCODER_FILE = "encoder.pt"


def _prepare_run_dir(cfg: PretrainConfig, is_main: bool) -> Path:
    """Create the run folder and write config.toml; refuse a folder that holds a different config."""
    run_dir = cfg.run.dir
    existing = run_dir / "config.toml"
    if existing.is_file():
        old = load_config(existing)
        if old.hash() != cfg.hash():
            raise C.ConfigError(f"run folder {run_dir} already holds a run with a different config "
                                f"(hash {old.hash()} vs {cfg.hash()}); choose another run.name")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        C.write(cfg, existing)  # duck-typed: any object with to_dict()
    return run_dir


def _state(net: SimCLRNet, opt: torch.optim.Optimizer, step: int, cfg: PretrainConfig) -> dict[str, Any]:
    # 'format': 'advft' with the trunk under 'model': a checkpoint is itself readable by load_encoder.
    return {"format": "advft", "kind": "simclr", "arch": cfg.model.arch, "stem": cfg.model.stem,
            "normalize": cfg.model.normalize,
            "model": {k: v.detach().cpu() for k, v in encoder_state_dict(net.encoder).items()},
            "head": {k: v.detach().cpu() for k, v in net.head.state_dict().items()},
            "optimizer": opt.state_dict(), "step": step, "rng": ckpt.rng_state(), "config": cfg.to_dict()}


def save_encoder(encoder: Encoder, path: Path) -> None:
    """Write ``{'format': 'advft-encoder', 'model', 'arch', 'stem', 'normalize'}`` atomically (temp + rename)."""
    obj = {"format": "advft-encoder", "arch": encoder.arch, "stem": encoder.stem, "normalize": encoder.normalize,
           "model": {k: v.detach().cpu().clone() for k, v in encoder_state_dict(encoder).items()}}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        raise ckpt.CheckpointError(f"could not write {path}: {e}") from None


def pretrain(cfg: PretrainConfig, *, should_stop: Callable[[], bool] | None = None, accelerator=None) -> Path:
    """Run (or resume, or return the output of a finished) SimCLR pretraining. Returns the path of encoder.pt.

    ``should_stop`` is polled at log steps; when any rank says True, all ranks checkpoint at that step
    boundary and :class:`advft.train.Interrupted` is raised (rerunning resumes from that checkpoint).
    """
    from advft.data import build_train_loader, eval_data

    acc = accelerator or make_accelerator(cfg.run.device)
    validate(cfg, world_size=acc.num_processes)
    device, rank, world, is_main = acc.device, acc.process_index, acc.num_processes, acc.is_main_process
    # run.precision as applied on this device ("auto" -> fp32 | bf16), once per run; config.toml keeps the request
    precision = run_precision(cfg.run.precision, device)
    run_dir = _prepare_run_dir(cfg, is_main)
    acc.wait_for_everyone()
    results_path, encoder_path = run_dir / "results.json", run_dir / ENCODER_FILE
    if results_path.is_file() and encoder_path.is_file():
        if json.loads(results_path.read_text()).get("status") == "finished":
            log.info("pretraining %s already finished; nothing to do", run_dir)
            return encoder_path

    # ---- model, optimiser, resume ----
    with torch.random.fork_rng(devices=[]):  # initial weights from the run seed, the caller's RNG untouched
        torch.manual_seed(cfg.run.seed)
        net = build_simclr(cfg.model).to(device)
    mf = torch.channels_last if cfg.run.channels_last else torch.preserve_format
    net = net.to(memory_format=mf)
    opt = build_optimizer(net, cfg.optim, device)
    start = 0
    found = ckpt.load_latest(run_dir)
    if found is not None:
        start, state = found
        net.encoder.net.load_state_dict(state["model"])
        net.head.load_state_dict(state["head"])
        opt.load_state_dict(state["optimizer"])
        ckpt.set_rng_state(state["rng"])
        log.info("resumed %s from step %d", run_dir, start)

    if is_main:
        label = precision_label(cfg.run.precision, precision)  # e.g. "fp32 (auto)"
        log.info("precision: %s on %s", label, device)
        tracking.update_manifest(run_dir, world, start, {"precision": label})
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    steps = cfg.optim.steps
    metrics = tracking.MetricsLog(run_dir, start, steps=steps, initial_done="initial" in results, enabled=is_main)
    if is_main:
        metrics.wandb_run = tracking.start_wandb(run_dir, cfg.run.name + "-" + cfg.hash(), "pretrain",
                                                 cfg.to_dict(), cfg.run.wandb)

    # ---- fixed order: sync BN, compile, DDP; `net` stays the plain module for saving and evaluation ----
    if world > 1 and device.type == "cuda" and cfg.model.sync_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)  # swaps the BN children in place
    net_fn: nn.Module = torch.compile(net) if cfg.run.compile else net
    net_ddp = acc.prepare_model(net_fn) if world > 1 else net_fn
    amp = lambda: autocast(device, precision)  # noqa: E731

    probe_data, test_data = eval_data(cfg, device)

    def run_eval(step: int) -> dict[str, Any] | None:
        res = None
        if is_main:  # the other ranks wait at the barrier
            res = probe_accuracy(net.encoder, probe_data, test_data, device=device, precision=precision,
                                 epochs=cfg.eval.probe_epochs)
            metrics.log({"step": step, "kind": "eval", **res})
        net.train()
        acc.wait_for_everyone()
        return res

    if start == 0 and "initial" not in results:
        r0 = run_eval(0)
        if is_main:
            results = {"status": "running", "initial": r0}
            tracking.write_json(results_path, results)
    net.train()

    loader = build_train_loader(cfg, rank=rank, world_size=world, start_step=start, device=device)
    bad = torch.zeros((), dtype=torch.bool, device=device)  # device-side: no sync per step
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    sums: dict[str, Tensor] = {}
    n_sum, t_last = 0, time.perf_counter()
    pbar = None
    if is_main and cfg.run.progress:
        from tqdm import tqdm

        pbar = tqdm(total=steps, initial=start, desc=f"pretrain {cfg.run.name}", dynamic_ncols=True)

    def check_finite() -> None:
        if bool(bad):  # host sync, only at log/checkpoint steps
            raise NonFiniteLossError(int(first_bad))

    def save(step: int) -> None:
        check_finite()  # never checkpoint weights that saw a non-finite loss
        if is_main:
            ckpt.save(run_dir, step, _state(net, opt, step, cfg), keep_last=cfg.run.keep_last)
        acc.wait_for_everyone()

    try:
        for step in range(start, steps):
            x, _ = next(loader)
            for g in opt.param_groups:
                g["lr"] = cfg.optim.lr * lr_factor(step, cfg.optim.warmup_steps, steps, cfg.optim.min_lr_ratio)
            v1, v2 = simclr_views(x, cfg.simclr, seed=cfg.run.seed, step=step, rank=rank, world_size=world)
            with amp():
                z = net_ddp(torch.cat([v1, v2]).contiguous(memory_format=mf))
            z1, z2 = gather_views(*z.float().chunk(2))
            logits, targets = _nt_xent_logits(z1, z2, cfg.simclr.temperature)
            loss = F.cross_entropy(logits, targets)
            if step == cfg.run.fail_at_step:  # fault injection (tests of the non-finite path)
                loss = loss * float("nan")
            nonfinite = ~torch.isfinite(loss.detach())
            first_bad = torch.where(nonfinite & ~bad, torch.tensor(step, device=device), first_bad)
            bad = bad | nonfinite
            loss.backward()
            if cfg.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():  # how often the positive is the most similar of the 2G - 1 candidates
                pos_acc = (logits.argmax(1) == targets).float().mean() * 100
            for k, v in (("loss", loss.detach()), ("pos_acc", pos_acc)):
                sums[k] = sums.get(k, 0) + v
            n_sum += 1
            done = step + 1
            if pbar is not None:
                pbar.update(1)

            if done % cfg.run.log_every == 0 or done == steps:
                check_finite()
                now = time.perf_counter()
                # the loss is already global (computed on the gathered batch); no reduction needed
                rec = {"step": done, "kind": "train", "lr": opt.param_groups[0]["lr"],
                       "img_per_s": n_sum * cfg.data.batch_size / max(now - t_last, 1e-9),
                       **{k: float(v) / n_sum for k, v in sums.items()}}
                if is_main:
                    metrics.log(rec)
                    if pbar is not None:
                        pbar.set_postfix(loss=f"{rec['loss']:.4g}", pos_acc=f"{rec['pos_acc']:.1f}")
                sums, n_sum, t_last = {}, 0, time.perf_counter()
            # order matters for exact resume: records of a step are written before its checkpoint
            if cfg.eval.every and done % cfg.eval.every == 0 and done != steps:
                run_eval(done)
                t_last = time.perf_counter()  # img_per_s measures training, not the probe
            if done % cfg.run.ckpt_every == 0 and done != steps:
                save(done)
            if should_stop is not None and done % cfg.run.log_every == 0 and _any_rank(should_stop(), device):
                if done % cfg.run.ckpt_every != 0 or done == steps:
                    save(done)
                raise Interrupted(done)
        save(steps)
    finally:
        if pbar is not None:
            pbar.close()

    final = run_eval(steps)
    if is_main:
        save_encoder(net.encoder, encoder_path)
        results.update({"status": "finished", "final": final, "probe_acc": (final or {}).get("probe_acc"),
                        "encoder": str(encoder_path), "steps": steps, "config_hash": cfg.hash()})
        tracking.write_json(results_path, results)
        if metrics.wandb_run is not None:
            metrics.wandb_run.summary.update({f"final/{k}": v for k, v in (final or {}).items()})
            metrics.wandb_run.finish()
    metrics.close()
    acc.wait_for_everyone()
    return encoder_path
