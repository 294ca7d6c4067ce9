"""The pretraining job's config: data and run as fine-tuning's, its own model, optim, simclr and eval sections."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from advft import config as C
from advft.config import Section, probability, ranged


@dataclass(frozen=True)
class PretrainModelConfig(Section):
    arch: C.Arch = "resnet50"
    stem: C.Stem = "cifar"
    normalize: C.Normalize = "none"
    proj_dim: int = ranged(128, ge=1)  # output of the projection head (where the loss is computed)
    proj_hidden: int = ranged(0, ge=0, why="0 = feature_dim")  # hidden width of the head (SimCLR: feature_dim)
    proj_bn: bool = True  # BatchNorm after the head's hidden layer
    sync_bn: bool = True  # synchronise BatchNorm over ranks (GPU with several ranks only; gloo has none)


@dataclass(frozen=True)
class PretrainOptimConfig(C.OptimConfig):
    """Fine-tuning's optimiser fields at pretraining's defaults, and SGD as a second choice; weight decay
    skips the biases and BatchNorm weights here (:func:`advft.simclr.model.build_optimizer`)."""

    lr: float = ranged(1e-3, gt=0)  # PEAK lr, used as given (no automatic batch-size scaling)
    betas: tuple[float, float] = ranged((0.9, 0.999), ge=0, lt=1)  # adamw only
    warmup_steps: int = 500  # between 0 and steps (checked by validate)
    steps: int = ranged(10000, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"  # sgd: with momentum; LARS is not provided
    momentum: float = ranged(0.9, ge=0, lt=1)  # sgd only


@dataclass(frozen=True)
class SimCLRConfig(Section):
    # of the NT-Xent softmax: below ~0.01 the logits exceed 100 and fp32 softmax gradients become one-hot;
    # above 10 all pairs look alike
    temperature: float = ranged(0.5, ge=0.01, le=10, why="SimCLR uses 0.1-1; 0.5 for CIFAR-10")
    crop_scale_min: float = ranged(0.08, gt=0, le=1)  # random resized crop keeps an area in [crop_scale_min, 1]
    flip_p: float = probability(0.5)  # horizontal flip
    jitter_p: float = probability(0.8)  # colour jitter is applied with this probability
    # s: brightness/contrast/saturation 0.8 s, hue 0.2 s (0.5 -> 0.4,0.4,0.4,0.1)
    jitter_strength: float = ranged(0.5, ge=0, le=2.5, why="the hue shift 0.2 s is at most 0.5")
    grayscale_p: float = probability(0.2)
    blur_p: float = probability(0.0)  # Gaussian blur (sigma in [0.1, 2], kernel 10 % of the side); SimCLR: 0.5


@dataclass(frozen=True)
class PretrainEvalConfig(Section):
    every: int = ranged(0, ge=0, why="0 = only at the start and the end")  # steps between linear-probe evaluations
    probe_train_size: int = ranged(10000, ge=1)  # images of the training split the probe is fitted on
    test_size: int = ranged(1000, ge=1)  # images of the held-out split the accuracy is measured on
    batch_size: int = ranged(256, ge=1)
    probe_epochs: int = ranged(100, ge=1)  # full-batch Adam epochs of the probe fit


@dataclass(frozen=True)
class PretrainConfig(C.Sections):
    data: C.DataConfig = field(default_factory=C.DataConfig)
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    optim: PretrainOptimConfig = field(default_factory=PretrainOptimConfig)
    simclr: SimCLRConfig = field(default_factory=SimCLRConfig)
    eval: PretrainEvalConfig = field(default_factory=PretrainEvalConfig)
    run: C.RunConfig = field(default_factory=C.RunConfig)


SECTIONS: dict[str, type] = PretrainConfig.sections()


def load_config(path: str | os.PathLike | None,
                overrides: list[str] | Mapping[str, Any] | None = None) -> PretrainConfig:
    """A pretraining job file (or the defaults when path is None) plus ``--set`` overrides; types checked.

    Ranges and paths are checked by :func:`validate`. Raises ConfigError with one line naming the key.
    """
    return C.load(path, overrides, PretrainConfig)


def validate(cfg: PretrainConfig, world_size: int = 1, check_paths: bool = True) -> PretrainConfig:
    """Check choices, ranges and paths; raise ConfigError with one line naming the key. Returns cfg."""
    data = cfg.data
    if data.train_transform != "none":
        raise C.ConfigError(f"data.train_transform = {data.train_transform!r}: pretraining crops and flips on the "
                            f"device (simclr.crop_scale_min, simclr.flip_p); use 'none' so images are not cropped "
                            f"twice")
    if data.batch_size < 2:
        raise C.ConfigError(f"data.batch_size = {data.batch_size} must be >= 2 (NT-Xent needs negatives)")
    C.check_common(cfg, world_size)
    C.check_data(data, check_paths)
    return cfg
