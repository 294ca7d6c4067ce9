"""Typed, frozen run configuration: TOML job files + ``--set key=value`` overrides, validated up front.

One :class:`Config` describes one run. It is built from a job file in ``jobs/`` plus dotted overrides
(``optim.lr=1e-3``, or the aliases ``alpha`` and ``lr``), checked completely before anything runs, and
written (resolved) into the run folder as ``config.toml``.

Units: ``attack.eps`` is in units of 1/255 (``eps = 8`` means 8/255); :attr:`AttackConfig.eps_pixels`
is the value in [0, 1] pixel units, computed once here. Batch sizes are GLOBAL (summed over ranks);
the per-rank value is derived (:meth:`DataConfig.per_device_batch_size`), never written back.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

ALIASES = {"alpha": "loss.alpha", "lr": "optim.lr"}
CHECKOUT = Path(__file__).resolve().parent.parent  # where jobs/ lives


class ConfigError(ValueError):
    """A configuration problem, with a one-line message naming the key or path and what is valid."""


@dataclass(frozen=True)
class DataConfig:
    format: str = "synthetic"  # synthetic | cifar10 | folder | ffcv | dali
    path: str = ""  # dataset root (cifar10, folder) or .beton / DALI file list; unused for synthetic
    val_path: str = ""  # held-out split for ffcv/dali (a second .beton / file list); others derive it from `path`
    resolution: int = 32  # pixels (square) the encoder sees
    train_transform: str = "none"  # none (centre crop, as the report) | rrc_flip
    batch_size: int = 256  # GLOBAL batch, split evenly over ranks
    num_workers: int = 2
    synthetic_size: int = 10000  # training images of the synthetic set (the test split is eval.test_size)
    download: bool = False  # torchvision CIFAR-10 download, only on machines with internet

    def per_device_batch_size(self, world_size: int) -> int:
        return self.batch_size // world_size


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet50"  # resnet50 | resnet18 | tiny
    stem: str = "cifar"  # cifar (3x3 s1 conv1, no max-pool) | imagenet
    checkpoint: str = ""  # the pretrained base encoder phi_org (simclr-pytorch, solo-learn, torchvision, advft)
    normalize: str = "none"  # none | imagenet | cifar10: mean/std applied inside forward
    bn: str = "train"  # BatchNorm mode of the training forward: train (as the report) | eval
    head: str = ""  # optional fixed linear head file {'state_dict': {'weight','bias'}}
    # A pretraining job file (advft.pretrain; "" = none) whose <run.root>/<run.name>/encoder.pt IS `checkpoint`:
    # launch/sweep.py runs it first (once) when that file is missing. Resolved like a job file: as given, or
    # in this checkout (jobs/...). Not in the config hash: given the checkpoint it does not change the result.
    pretrain: str = ""


@dataclass(frozen=True)
class AttackConfig:
    name: str = "apgd"  # apgd | pgd
    eps: float = 8.0  # L-inf radius in units of 1/255
    steps: int = 10
    objective: str = "embedding"  # embedding (label-free FARE) | ce_head (CE through the fixed head; needs model.head)

    @property
    def eps_pixels(self) -> float:
        return self.eps / 255.0


@dataclass(frozen=True)
class LossConfig:
    alpha: float = 0.1  # weight of the clean term ||phi(x) - phi_org(x)||^2
    reduction: str = "sum"  # sum over the embedding dim (FARE) | mean over it too (the report's code)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-4
    warmup_steps: int = 1400
    steps: int = 20000
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    fused: bool = True  # fused AdamW kernel where the device supports it
    grad_clip: float = 0.0  # 0 = off


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1000  # steps between evaluations (0 = only at step 0 and the end)
    head: str = "probe"  # probe (linear probe re-fit on frozen features) | fixed (model.head)
    probe_train_size: int = 10000
    probe_epochs: int = 100  # full-batch L-BFGS-free Adam epochs of the probe fit
    test_size: int = 1000
    batch_size: int = 256
    attack_steps: int = 10  # APGD-CE steps during training
    final_attack_steps: int = 100  # APGD-CE steps at the end
    final_targets: int = 9  # APGD-T target classes at the end (0 = none)


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    root: str = "runs"  # the run folder is root/name
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    # fp32 | bf16 (autocast) | auto: bf16 where this device does bf16 in hardware (Ampere+ GPU, CPU with AMX or
    # AVX512-BF16), else fp32 (emulated bf16: up to 21x slower, BENCHMARKS.md); resolved at run start, in manifest.json
    precision: str = "auto"
    compile: bool = False
    channels_last: bool = True
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    wandb: str = "auto"  # auto (online with a key, else offline; WANDB_MODE wins) | online | offline | disabled
    progress: bool = True  # tqdm bar on rank 0
    fail_at_step: int = -1  # fault injection for tests: make the loss non-finite at this step (-1 = never)

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = dataclasses.asdict(self)
        for sec in out.values():
            for k, v in sec.items():
                if isinstance(v, tuple):
                    sec[k] = list(v)
        return out

    def hash(self, exclude_run: bool = True) -> str:
        """Short hash of everything that changes the result (excluded: run name, root, progress, wandb and
        model.pretrain)."""
        d = self.to_dict()
        if exclude_run:
            d["run"] = {k: v for k, v in d["run"].items() if k not in ("name", "root", "progress", "wandb")}
        # how the base encoder is made is not part of the run: model.checkpoint names the weights it starts from
        # (and a job file that gains model.pretrain keeps its run names, so its finished runs are found again)
        del d["model"]["pretrain"]
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]


SECTIONS: dict[str, type] = {
    "data": DataConfig, "model": ModelConfig, "attack": AttackConfig, "loss": LossConfig,
    "optim": OptimConfig, "eval": EvalConfig, "run": RunConfig,
}

CHOICES: dict[str, tuple[str, ...]] = {
    "data.format": ("synthetic", "cifar10", "folder", "ffcv", "dali"),
    "data.train_transform": ("none", "rrc_flip"),
    "model.arch": ("resnet50", "resnet18", "tiny"),
    "model.stem": ("cifar", "imagenet"),
    "model.normalize": ("none", "imagenet", "cifar10"),
    "model.bn": ("train", "eval"),
    "attack.name": ("apgd", "pgd"),
    "attack.objective": ("embedding", "ce_head"),
    "loss.reduction": ("sum", "mean"),
    "eval.head": ("probe", "fixed"),
    "run.device": ("auto", "cpu", "cuda"),
    "run.precision": ("fp32", "bf16", "auto"),
    "run.wandb": ("auto", "online", "offline", "disabled"),
}


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in fields(cls)] + list(ALIASES)


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    if not close:  # try matching the last component only ("lrr" -> optim.lr)
        tail = {k.split(".")[-1]: k for k in all_keys()}
        hit = difflib.get_close_matches(key.split(".")[-1], list(tail), n=1, cutoff=0.6)
        close = [tail[hit[0]]] if hit else []
    return f"; did you mean '{close[0]}'?" if close else ""


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a TOML value or a --set string to the field's type, or raise ConfigError naming the key."""
    origin = typing.get_origin(typ)
    tname = getattr(typ, "__name__", str(typ))
    if origin is tuple:
        args = typing.get_args(typ)
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected {len(args)} numbers like '0.9,0.95', got {value!r}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tname}")  # pragma: no cover - all fields are covered above


def _split_key(key: str, sections: Mapping[str, type] | None = None) -> tuple[str, str]:
    sections = SECTIONS if sections is None else sections
    key = ALIASES.get(key, key) if sections is SECTIONS else key
    if key.count(".") != 1:
        raise ConfigError(f"unknown config key '{key}'{_suggest(key)} (keys look like section.name, e.g. optim.lr)")
    sec, name = key.split(".")
    if sec not in sections or name not in {f.name for f in fields(sections[sec])}:
        raise ConfigError(f"unknown config key '{key}'{_suggest(key) if sections is SECTIONS else ''}")
    return sec, name


def parse_set(items: list[str] | tuple[str, ...], sections: Mapping[str, type] | None = None) -> dict[str, str]:
    """['optim.lr=1e-3', 'alpha=0'] -> {'optim.lr': '1e-3', 'loss.alpha': '0'} (keys checked)."""
    out: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        k = k.strip()
        sec, name = _split_key(k, sections)
        out[f"{sec}.{name}"] = v.strip()
    return out


def build_sections(sections: Mapping[str, type], raw: Mapping[str, Any],
                   overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Instantiate one frozen dataclass per section from nested TOML-like data plus flat dotted overrides.

    Generic over the section set, so other programs (pretraining) reuse the same typing and errors.
    Types are checked here; ranges by the caller's validate().
    """
    values: dict[str, dict[str, Any]] = {s: {} for s in sections}
    for sec, body in raw.items():
        if sections is SECTIONS and sec in ALIASES and not isinstance(body, Mapping):
            s, n = _split_key(sec, sections)
            values[s][n] = body
            continue
        if sec not in sections:
            hint = _suggest(sec) if sections is SECTIONS else ""
            raise ConfigError(f"unknown config section '{sec}'{hint} (sections: {', '.join(sections)})")
        if not isinstance(body, Mapping):
            raise ConfigError(f"[{sec}] must be a table of keys, got {body!r}")
        for name, v in body.items():
            s, n = _split_key(f"{sec}.{name}", sections)
            values[s][n] = v
    for key, v in (overrides or {}).items():
        s, n = _split_key(key, sections)
        values[s][n] = v
    built = {}
    for sec, cls in sections.items():
        kwargs = {n: _coerce(f"{sec}.{n}", v, _field_type(cls, n)) for n, v in values[sec].items()}
        built[sec] = cls(**kwargs)
    return built


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """Parse a TOML job file; ConfigError naming the path when missing, unreadable or invalid."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"job file {p} is a directory; give a TOML file, e.g. jobs/demo.toml")
    if not p.is_file():
        raise ConfigError(f"job file not found: {p}")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"job file {p} is not UTF-8 text (byte {e.start}); job files are TOML") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"job file {p} is not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"job file {p} cannot be read: {e.strerror}") from None


def from_dict(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Config:
    """Build a Config from nested TOML-like data plus flat dotted overrides; types are checked, not ranges."""
    return Config(**build_sections(SECTIONS, raw, overrides))


def load(path: str | os.PathLike | None, overrides: list[str] | Mapping[str, Any] | None = None) -> Config:
    """Load a TOML job file (or the defaults when path is None) with overrides; raises ConfigError."""
    raw: dict[str, Any] = read_toml(path) if path is not None else {}
    if isinstance(overrides, (list, tuple)):
        overrides = parse_set(list(overrides))
    return from_dict(raw, overrides)


def validate(cfg: Config, world_size: int = 1, check_paths: bool = True, checkpoint_made: bool = False) -> Config:
    """Check ranges, choices and paths; raise ConfigError with one line naming the key. Returns cfg.

    ``checkpoint_made``: a missing model.checkpoint is not an error when model.pretrain makes it before the
    run starts (launch/sweep.py does); everywhere else the file must exist.
    """
    d = cfg.to_dict()
    for key, allowed in CHOICES.items():
        s, n = key.split(".")
        if d[s][n] not in allowed:
            raise ConfigError(f"{key} = {d[s][n]!r} is not valid; choose one of: {', '.join(allowed)}")

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(cfg.loss.alpha >= 0, f"loss.alpha = {cfg.loss.alpha} must be >= 0")
    need(0 < cfg.attack.eps <= 255, f"attack.eps = {cfg.attack.eps} must be in (0, 255] (units of 1/255: 8 means 8/255)")
    need(cfg.attack.steps >= 1, f"attack.steps = {cfg.attack.steps} must be >= 1")
    need(cfg.optim.lr > 0, f"optim.lr = {cfg.optim.lr} must be > 0")
    need(all(0 <= b < 1 for b in cfg.optim.betas), f"optim.betas = {cfg.optim.betas} must lie in [0, 1)")
    need(cfg.optim.weight_decay >= 0, f"optim.weight_decay = {cfg.optim.weight_decay} must be >= 0")
    need(cfg.optim.steps >= 1, f"optim.steps = {cfg.optim.steps} must be >= 1")
    need(0 <= cfg.optim.warmup_steps <= cfg.optim.steps,
         f"optim.warmup_steps = {cfg.optim.warmup_steps} must be between 0 and optim.steps = {cfg.optim.steps}")
    need(0 <= cfg.optim.min_lr_ratio <= 1, f"optim.min_lr_ratio = {cfg.optim.min_lr_ratio} must be in [0, 1]")
    need(cfg.optim.grad_clip >= 0, f"optim.grad_clip = {cfg.optim.grad_clip} must be >= 0")
    need(cfg.data.resolution >= 8, f"data.resolution = {cfg.data.resolution} must be >= 8")
    need(cfg.data.batch_size >= 1, f"data.batch_size = {cfg.data.batch_size} must be >= 1")
    need(cfg.data.batch_size % world_size == 0,
         f"data.batch_size = {cfg.data.batch_size} is not divisible by the world size {world_size}; "
         f"use a multiple of {world_size}")
    need(cfg.data.num_workers >= 0, f"data.num_workers = {cfg.data.num_workers} must be >= 0")
    need(cfg.data.synthetic_size >= cfg.data.batch_size or cfg.data.format != "synthetic",
         f"data.synthetic_size = {cfg.data.synthetic_size} must be >= data.batch_size = {cfg.data.batch_size}")
    need(cfg.eval.every >= 0, f"eval.every = {cfg.eval.every} must be >= 0 (0 = only at the start and the end)")
    for k in ("probe_train_size", "test_size", "batch_size", "attack_steps", "final_attack_steps", "probe_epochs"):
        need(getattr(cfg.eval, k) >= 1, f"eval.{k} = {getattr(cfg.eval, k)} must be >= 1")
    need(0 <= cfg.eval.final_targets <= 99, f"eval.final_targets = {cfg.eval.final_targets} must be in [0, 99]")
    need(cfg.run.log_every >= 1, f"run.log_every = {cfg.run.log_every} must be >= 1")
    need(cfg.run.ckpt_every >= 1, f"run.ckpt_every = {cfg.run.ckpt_every} must be >= 1")
    need(cfg.run.keep_last >= 1, f"run.keep_last = {cfg.run.keep_last} must be >= 1")
    check_name(cfg.run.name, "run.name")
    need(cfg.attack.objective != "ce_head" or bool(cfg.model.head),
         "attack.objective = 'ce_head' needs model.head (a linear head file)")
    need(cfg.eval.head != "fixed" or bool(cfg.model.head), "eval.head = 'fixed' needs model.head (a linear head file)")
    if cfg.data.format in ("ffcv", "dali"):
        _check_extra(cfg.data.format)
    if check_paths:
        if cfg.data.format != "synthetic":
            need(bool(cfg.data.path), f"data.path is empty; data.format = '{cfg.data.format}' needs a dataset path")
            need(Path(cfg.data.path).exists() or (cfg.data.format == "cifar10" and cfg.data.download),
                 f"data.path: {cfg.data.path} does not exist")
            if cfg.data.val_path:
                need(Path(cfg.data.val_path).exists(), f"data.val_path: {cfg.data.val_path} does not exist")
        need(bool(cfg.model.checkpoint), "model.checkpoint is empty; fine-tuning needs the pretrained base encoder file")
        if cfg.model.pretrain:
            pretrain_job(cfg)
        for key, value in (("model.checkpoint", cfg.model.checkpoint), ("model.head", cfg.model.head)):
            need(not value or not Path(value).is_dir(), f"{key}: {value} is a directory; give the checkpoint file")
            if key == "model.checkpoint" and cfg.model.pretrain and not Path(value).is_file():
                need(checkpoint_made, f"model.checkpoint: {value} does not exist yet; it is made by the pretraining "
                                      f"job model.pretrain = {cfg.model.pretrain}: run python launch/pretrain.py "
                                      f"{cfg.model.pretrain} first, or start this job with launch/sweep.py, which "
                                      f"runs it")
                continue
            need(not value or Path(value).is_file(), f"{key}: {value} does not exist")
    return cfg


def resolve_job(path: str | os.PathLike) -> Path:
    """A job file path as given; a relative one that is not there but is in this checkout (``jobs/...``) is
    taken from the checkout, so the shipped jobs work from any directory."""
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (CHECKOUT / p).is_file():
        return CHECKOUT / p
    return p


def pretrain_job(cfg: Config, world_size: int = 1) -> tuple[Path, Any] | None:
    """The pretraining job of ``model.pretrain`` (None when unset): its resolved path and its validated
    :class:`advft.pretrain.PretrainConfig`, whose output ``<run.root>/<run.name>/encoder.pt`` must be
    ``model.checkpoint`` and whose encoder must be the model this job builds. Raises ConfigError (one line)."""
    if not cfg.model.pretrain:
        return None
    from advft import pretrain as P  # lazily: advft.pretrain imports this module

    job = resolve_job(cfg.model.pretrain)
    try:
        pcfg = P.validate(P.load_config(job), world_size=world_size)
    except ConfigError as e:
        raise ConfigError(f"model.pretrain = {cfg.model.pretrain}: {e}") from None
    made = pcfg.run.dir / P.ENCODER_FILE
    if not _same_file(made, Path(cfg.model.checkpoint)):
        raise ConfigError(f"model.pretrain = {cfg.model.pretrain} makes {made}, but model.checkpoint = "
                          f"{cfg.model.checkpoint} is another file; set model.checkpoint = \"{made}\" or "
                          f"model.pretrain = \"\"")
    for key in ("arch", "stem", "normalize"):
        ours, theirs = getattr(cfg.model, key), getattr(pcfg.model, key)
        if ours != theirs:
            raise ConfigError(f"model.pretrain = {cfg.model.pretrain} makes an encoder with model.{key} = "
                              f"{theirs!r}, but this job has model.{key} = {ours!r}; make them agree")
    return job, pcfg


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _check_extra(fmt: str) -> None:
    import importlib.util

    mod = {"ffcv": "ffcv", "dali": "nvidia.dali"}[fmt]
    try:
        found = importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise ConfigError(f"data.format = '{fmt}' needs the {fmt} package, which is not installed; "
                          f"install it with: bash scripts/install_extras.sh")


def check_name(name: str, what: str = "name") -> str:
    """Run and sweep names become folder names: letters, digits, '-', '_', '.', '=' and ',' only, no '..'."""
    import re

    if not name or not re.fullmatch(r"[A-Za-z0-9_.=,+-]+", name) or name in (".", "..") or ".." in name:
        raise ConfigError(f"{what} = {name!r} is not a valid name: use letters, digits and - _ . = , + "
                          f"(no '/', no '..', not empty)")
    return name


def to_toml(cfg: Config) -> str:
    import tomli_w

    return tomli_w.dumps(cfg.to_dict())


def write(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (temp file + rename)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(to_toml(cfg))
    os.replace(tmp, p)


def replace(cfg: Config, **dotted: Any) -> Config:
    """Copy of cfg with dotted keys replaced (values are type-checked like --set)."""
    return from_dict(cfg.to_dict(), dotted)
