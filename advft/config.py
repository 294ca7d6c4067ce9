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
import logging
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Mapping

ALIASES = {"alpha": "loss.alpha", "beta": "loss.beta", "lr": "optim.lr", "seed": "run.seed"}
log = logging.getLogger(__name__)
CHECKOUT = Path(__file__).resolve().parent.parent  # where jobs/ lives


class ConfigError(ValueError):
    """A configuration problem, with a one-line message naming the key or path and what is valid."""


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


class Range:
    """The valid values of a number field: bounds (inclusive ``ge``/``le``, exclusive ``gt``/``lt``) and why."""

    def __init__(self, ge: float | None = None, gt: float | None = None, le: float | None = None,
                 lt: float | None = None, why: str = "", prob: bool = False) -> None:
        self.ge, self.gt, self.le, self.lt, self.why, self.prob = ge, gt, le, lt, why, prob

    def holds(self, v: float) -> bool:
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def text(self, each: bool = False) -> str:
        lo, hi = (self.ge, "[") if self.gt is None else (self.gt, "(")
        top, close = (self.le, "]") if self.lt is None else (self.lt, ")")
        verb = "lie" if each else "be"
        if top is None:
            out = f"must {verb} {'>=' if hi == '[' else '>'} {lo}"
        else:
            out = f"must {verb} {'a probability ' if self.prob else ''}in {hi}{lo}, {top}{close}"
        return out + (f" ({self.why})" if self.why else "")


def ranged(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None, why: str = "") -> Any:
    """A dataclass field whose valid range sits next to it; :meth:`Section.check` enforces it."""
    return field(default=default, metadata={"range": Range(ge, gt, le, lt, why)})


def probability(default: float) -> Any:
    return field(default=default, metadata={"range": Range(ge=0, le=1, prob=True)})


class Section:
    """Base of one config section: choices are ``Literal`` types, ranges are :func:`ranged` fields, and
    :meth:`check` enforces both (one line naming the key). Checks across fields stay with the config."""

    def check(self, section: str) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            key, value, typ = f"{section}.{f.name}", getattr(self, f.name), _field_type(type(self), f.name)
            if typing.get_origin(typ) is Literal and value not in typing.get_args(typ):
                raise ConfigError(f"{key} = {value!r} is not valid; choose one of: {', '.join(typing.get_args(typ))}")
            rng = f.metadata.get("range")
            if rng is None:
                continue
            each = isinstance(value, tuple)
            if not all(rng.holds(v) for v in (value if each else (value,))):
                raise ConfigError(f"{key} = {value} {rng.text(each)}")


class Sections:
    """Base of a whole config (one :class:`Section` per field): plain-data form, hash, field checks."""

    # run settings that do not change the result (where it is written, how it is shown)
    UNHASHED_RUN = ("name", "root", "progress", "wandb", "wandb_artifacts")
    # keys that no longer exist: read from old config.toml files with a warning and dropped, and hashed at their
    # old default so the run folders (named by the hash) of existing sweeps are found again
    REMOVED = {"run": {"fail_at_step": -1}}
    # keys added later: hashed only when they differ from this default, so that the run folders of existing
    # sweeps (which never set them) keep their names
    ADDED: dict[str, dict[str, Any]] = {}

    @classmethod
    def sections(cls) -> dict[str, type]:
        return {f.name: _field_type(cls, f.name) for f in fields(cls)}  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Nested plain values; unset (None) fields are left out, as TOML has no null."""
        return {s: {k: list(v) if isinstance(v, tuple) else v for k, v in sec.items() if v is not None}
                for s, sec in dataclasses.asdict(self).items()}  # type: ignore[call-overload]

    def hashed(self) -> dict[str, dict[str, Any]]:
        """What :meth:`hash` covers."""
        d = self.to_dict()
        d["run"] = {k: v for k, v in d["run"].items() if k not in self.UNHASHED_RUN}
        for sec, keys in self.REMOVED.items():
            if sec in d:
                d[sec].update(keys)
        for sec, keys in self.ADDED.items():
            for k, default in keys.items():
                if sec in d and d[sec].get(k, default) == default:
                    d[sec].pop(k, None)
        return d

    def hash(self) -> str:
        """Short hash of everything that changes the result."""
        return hashlib.sha1(json.dumps(self.hashed(), sort_keys=True).encode()).hexdigest()[:8]

    def check_fields(self) -> None:
        """Choices and ranges of every field (ConfigError naming the first bad key)."""
        for name in self.sections():
            getattr(self, name).check(name)


@dataclass(frozen=True)
class DataConfig(Section):
    format: Literal["synthetic", "digits", "cifar10", "folder", "ffcv", "dali"] = "synthetic"
    path: str = ""  # dataset root (cifar10, folder) or .beton / DALI file list; unused for synthetic and digits
    val_path: str = ""  # held-out split for ffcv/dali (a second .beton / file list); others derive it from `path`
    resolution: int = ranged(32, ge=8)  # pixels (square) the encoder sees
    train_transform: Literal["none", "rrc_flip"] = "none"  # none: centre crop, as the report
    batch_size: int = ranged(256, ge=1)  # GLOBAL batch, split evenly over ranks
    num_workers: int = ranged(2, ge=0)
    synthetic_size: int = 10000  # training images of the synthetic set (the test split is eval.test_size)
    download: bool = False  # torchvision CIFAR-10 download, only on machines with internet

    def per_device_batch_size(self, world_size: int) -> int:
        return self.batch_size // world_size


Arch = Literal["resnet50", "resnet18", "tiny"]
# cifar: 3x3 s1 conv1, no max-pool; cifar_pad2: the same with padding 2 (solo-learn's CIFAR networks)
Stem = Literal["cifar", "cifar_pad2", "imagenet"]
Normalize = Literal["none", "imagenet", "cifar10"]  # mean/std applied inside the encoder's forward


@dataclass(frozen=True)
class ModelConfig(Section):
    arch: Arch = "resnet50"
    stem: Stem = "cifar"
    checkpoint: str = ""  # the pretrained base encoder phi_org (simclr-pytorch, solo-learn, torchvision, advft)
    normalize: Normalize = "none"
    bn: Literal["train", "eval"] = "train"  # BatchNorm mode of the training forward (train: as the report)
    # bn = train on several ranks: normalise over the GLOBAL batch (SyncBatchNorm; on CPU advft.sync_bn), as one
    # process would; false = each rank over its own share
    sync_bn: bool = True
    head: str = ""  # optional fixed linear head file {'state_dict': {'weight','bias'}}
    # A pretraining job file ("" = none) whose <run.root>/<run.name>/encoder.pt IS `checkpoint`: launch/sweep.py
    # runs it first (once) when that file is missing. Resolved like a job file: as given, or in this checkout
    # (jobs/...). Not in the config hash: given the checkpoint it does not change the result.
    pretrain: str = ""


@dataclass(frozen=True)
class AttackConfig(Section):
    name: Literal["apgd", "pgd"] = "apgd"
    eps: float = ranged(8.0, gt=0, le=255, why="units of 1/255: 8 means 8/255")  # L-inf radius
    steps: int = ranged(10, ge=1)
    objective: Literal["embedding", "ce_head"] = "embedding"  # ce_head: CE through the fixed head (model.head)

    @property
    def eps_pixels(self) -> float:
        return self.eps / 255.0


@dataclass(frozen=True)
class LossConfig(Section):
    name: str = "fare"  # fare | cosine | trades | deacl: the training loss and its attack objective (advft.losses)
    # The weights a loss reads; unset = the loss's default (fare, cosine: alpha 0.1; trades: beta 1; deacl: beta 2).
    # A weight the loss does not read must stay unset (validate refuses it).
    alpha: float | None = None  # fare, cosine: weight of the clean term d(phi(x), phi_org(x))
    beta: float | None = None  # trades, deacl: weight of the robust term d(phi(z), phi(x))
    reduction: Literal["sum", "mean"] = "sum"  # sum over the embedding dim (FARE) | mean (the report's code)

    def __post_init__(self) -> None:
        from advft.losses import LOSSES  # lazily: the registry imports torch

        for key, default in LOSSES[self.name].weights.items() if self.name in LOSSES else ():
            if getattr(self, key) is None:
                object.__setattr__(self, key, default)  # frozen: set once, here, to the loss's default


@dataclass(frozen=True)
class OptimConfig(Section):
    """AdamW, linear warmup then cosine decay; pretraining's section extends it (advft.simclr.config)."""

    lr: float = ranged(1e-4, gt=0)
    betas: tuple[float, float] = ranged((0.9, 0.95), ge=0, lt=1)
    weight_decay: float = ranged(1e-4, ge=0)
    warmup_steps: int = 1400  # between 0 and steps (checked by validate)
    steps: int = ranged(20000, ge=1)
    min_lr_ratio: float = ranged(0.0, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    fused: bool = True  # fused AdamW kernel where the device supports it
    grad_clip: float = ranged(0.0, ge=0)  # 0 = off


@dataclass(frozen=True)
class EvalConfig(Section):
    every: int = ranged(1000, ge=0, why="0 = only at the start and the end")  # steps between evaluations
    head: Literal["probe", "fixed"] = "probe"  # probe: linear probe re-fit on frozen features | fixed: model.head
    probe_train_size: int = ranged(10000, ge=1)
    probe_epochs: int = ranged(100, ge=1)  # full-batch Adam epochs of the probe fit
    test_size: int = ranged(1000, ge=1)
    batch_size: int = ranged(256, ge=1)
    attack_steps: int = ranged(10, ge=1)  # APGD-CE steps during training
    final_attack_steps: int = ranged(100, ge=1)  # APGD-CE steps at the end
    final_targets: int = ranged(9, ge=0, le=99)  # APGD-T target classes at the end (0 = none)
    # The strong evaluations (step 0 and the end) on more images than the routine ones, so that their 95 %
    # intervals can resolve alpha (0 = the routine size); the CIFAR-10 / ImageNet jobs set them
    final_test_size: int = ranged(0, ge=0, why="0 = the routine size")
    final_probe_train_size: int = ranged(0, ge=0, why="0 = the routine size")
    # apgd: advft's APGD-CE + APGD-T above | autoattack: AutoAttack's standard ensemble (pip install pyautoattack)
    final_attack: Literal["apgd", "autoattack"] = "apgd"
    # a second L-inf radius (1/255 units) attacked at step 0 and the end only, with the same attack and images:
    # results carry eps_extra and robust_acc_eps_extra (0 = none)
    final_eps_extra: float = ranged(0.0, ge=0, le=255, why="units of 1/255; 0 = none")


@dataclass(frozen=True)
class RunConfig(Section):
    name: str = "run"
    root: str = "runs"  # the run folder is root/name
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # bf16 = autocast; auto = bf16 where this device does bf16 in hardware (Ampere+ GPU, CPU with AMX or
    # AVX512-BF16), else fp32 (emulated bf16 is far slower); resolved at run start, recorded in manifest.json
    precision: Literal["fp32", "bf16", "auto"] = "auto"
    compile: bool = False
    channels_last: bool = True
    log_every: int = ranged(10, ge=1)
    ckpt_every: int = ranged(500, ge=1)
    keep_last: int = ranged(3, ge=1)
    # auto: online with a key, else offline (WANDB_MODE wins)
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"
    wandb_artifacts: bool = False  # also upload the base encoder and the final weights to wandb (large files)
    progress: bool = True  # rank 0: a tqdm bar on a terminal, else a log line per log step and per evaluation

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name


@dataclass(frozen=True)
class Config(Sections):
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # keys added after run folders were named by the hash: left out of it while at these defaults, so the
    # runs of existing sweeps are found again
    ADDED = {"eval": {"final_test_size": 0, "final_probe_train_size": 0, "final_attack": "apgd",
                      "final_eps_extra": 0.0}}

    def hashed(self) -> dict[str, dict[str, Any]]:
        d = super().hashed()
        # how the base encoder is made is not part of the run: model.checkpoint names the weights it starts from
        # (and a job file that gains model.pretrain keeps its run names, so its finished runs are found again)
        del d["model"]["pretrain"]
        if d["model"]["sync_bn"]:  # the default, and the only behaviour on one process
            del d["model"]["sync_bn"]
        if d["loss"]["name"] == "fare":  # the loss before it was a choice: its runs keep their names
            del d["loss"]["name"]
        return d


SECTIONS: dict[str, type] = Config.sections()


def all_keys(sections: Mapping[str, type] | None = None) -> list[str]:
    """Every dotted key of a config with these sections (the fine-tuning config's, with its aliases, by default)."""
    secs = SECTIONS if sections is None else sections
    keys = [f"{s}.{f.name}" for s, cls in secs.items() for f in fields(cls)]
    return keys + list(ALIASES) if secs is SECTIONS else keys


def _suggest(key: str, sections: Mapping[str, type] | None = None) -> str:
    keys = all_keys(sections)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not close:  # try matching the last component only ("lrr" -> optim.lr)
        tail = {k.split(".")[-1]: k for k in keys}
        hit = difflib.get_close_matches(key.split(".")[-1], list(tail), n=1, cutoff=0.6)
        close = [tail[hit[0]]] if hit else []
    return f"; did you mean '{close[0]}'?" if close else ""


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a TOML value or a --set string to the field's type, or raise ConfigError naming the key."""
    origin = typing.get_origin(typ)
    if origin is Literal:  # a choice: typed as a string here, the choice is checked by validate()
        typ = str
    tname = getattr(typ, "__name__", str(typ))
    if origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(typ):  # optional: None = unset
        if value is None:
            return None
        return _coerce(key, value, next(a for a in typing.get_args(typ) if a is not type(None)))
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
        raise ConfigError(f"unknown config key '{key}'{_suggest(key, sections)} (keys look like section.name, "
                          f"e.g. optim.lr)")
    sec, name = key.split(".")
    if sec not in sections or name not in {f.name for f in fields(sections[sec])}:
        hint = _suggest(key, sections) or f" (sections: {', '.join(sections)})"
        raise ConfigError(f"unknown config key '{key}'{hint}")
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
            hint = _suggest(sec, sections)
            raise ConfigError(f"unknown config section '{sec}'{hint} (sections: {', '.join(sections)})")
        if not isinstance(body, Mapping):
            raise ConfigError(f"[{sec}] must be a table of keys, got {body!r}")
        for name, v in body.items():
            if name in Sections.REMOVED.get(sec, {}):  # an old config.toml: still loads
                log.warning("ignoring %s.%s = %r: the key no longer exists", sec, name, v)
                continue
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


def from_dict(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None, cls: type = None) -> Any:
    """Build a config (``cls``, default :class:`Config`) from nested TOML-like data plus flat dotted overrides;
    types are checked, not ranges."""
    cls = Config if cls is None else cls
    sections = SECTIONS if cls is Config else cls.sections()
    return cls(**build_sections(sections, raw, overrides))


def load(path: str | os.PathLike | None, overrides: list[str] | Mapping[str, Any] | None = None,
         cls: type = None) -> Any:
    """Load a TOML job file (or the defaults when path is None) with overrides as a ``cls`` (default
    :class:`Config`); raises ConfigError naming the key, path or value."""
    cls = Config if cls is None else cls
    raw: dict[str, Any] = read_toml(path) if path is not None else {}
    if isinstance(overrides, (list, tuple)):
        overrides = parse_set(list(overrides), SECTIONS if cls is Config else cls.sections())
    return from_dict(raw, overrides, cls)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def check_common(cfg: Sections, world_size: int = 1) -> None:
    """The checks every task's config shares (it has data, optim and run sections): choices and ranges of
    every field, then the cross-field rules of those sections."""
    cfg.check_fields()
    data, optim = cfg.data, cfg.optim  # type: ignore[attr-defined]
    _need(0 <= optim.warmup_steps <= optim.steps,
          f"optim.warmup_steps = {optim.warmup_steps} must be between 0 and optim.steps = {optim.steps}")
    _need(data.batch_size % world_size == 0,
          f"data.batch_size = {data.batch_size} is not divisible by the world size {world_size}; "
          f"use a multiple of {world_size}")
    _need(data.synthetic_size >= data.batch_size or data.format != "synthetic",
          f"data.synthetic_size = {data.synthetic_size} must be >= data.batch_size = {data.batch_size}")
    check_name(cfg.run.name, "run.name")  # type: ignore[attr-defined]


def check_data(data: DataConfig, check_paths: bool = True) -> None:
    """The loader's package is installed and the dataset files exist."""
    if data.format in EXTRA_FORMATS:
        _check_extra(data.format)
        _check_held_out(data, check_paths)
    if check_paths and data.format not in PATHLESS_FORMATS:
        _need(bool(data.path), f"data.path is empty; data.format = '{data.format}' needs a dataset path "
                               f"(e.g. --set data.path=/data/{data.format})")
        _need(Path(data.path).exists() or (data.format == "cifar10" and data.download),
              f"data.path: {data.path} does not exist")
        if data.val_path:
            _need(Path(data.val_path).exists(), f"data.val_path: {data.val_path} does not exist")


def validate(cfg: Config, world_size: int = 1, check_paths: bool = True, checkpoint_made: bool = False) -> Config:
    """Check choices, ranges and paths; raise ConfigError with one line naming the key. Returns cfg.

    ``checkpoint_made``: model.checkpoint may not exist yet, because something makes it before the run
    starts (the pretraining of model.pretrain; launch/base_encoder.py checks that rule).
    """
    check_common(cfg, world_size)
    from advft.losses import resolve_weights

    try:
        resolve_weights(cfg.loss.name, cfg.loss.alpha, cfg.loss.beta, cfg.loss.reduction)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _need(cfg.attack.objective != "ce_head" or bool(cfg.model.head),
          "attack.objective = 'ce_head' needs model.head (a linear head file)")
    _need(cfg.eval.head != "fixed" or bool(cfg.model.head), "eval.head = 'fixed' needs model.head (a linear head file)")
    check_data(cfg.data, check_paths)
    if cfg.eval.final_attack == "autoattack":
        _check_extra("autoattack", "eval.final_attack")
    if check_paths:
        _need(bool(cfg.model.checkpoint), "model.checkpoint is empty; fine-tuning needs the pretrained base encoder file")
        for key, value in (("model.checkpoint", cfg.model.checkpoint), ("model.head", cfg.model.head)):
            _need(not value or not Path(value).is_dir(), f"{key}: {value} is a directory; give the checkpoint file")
            if key == "model.checkpoint" and checkpoint_made and not Path(value).is_file():
                continue
            _need(not value or Path(value).is_file(), f"{key}: {value} {not_a_file(value)}")
    return cfg


def not_a_file(path: str | os.PathLike) -> str:
    """Why ``path`` is no regular file, for an error message: missing, or there but a FIFO, device, socket."""
    p = Path(path)
    if not p.exists():
        return "does not exist"
    return "is not a regular file (a FIFO, device or socket?); give the checkpoint file"


def resolve_job(path: str | os.PathLike) -> Path:
    """A job file path as given; a relative one that is not there but is in this checkout (``jobs/...``) is
    taken from the checkout, so the shipped jobs work from any directory."""
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (CHECKOUT / p).is_file():
        return CHECKOUT / p
    return p


def _check_held_out(data: DataConfig, check_paths: bool) -> None:
    """The probe's test images must never be among its training images (advft.data.held_out_problem)."""
    from advft.data import DataError, held_out_problem  # lazily: advft.data imports torch

    try:
        problem = held_out_problem(data.format, data.path, data.val_path, check_paths)
    except DataError as e:
        raise ConfigError(f"data.val_path: {e}") from None
    _need(problem is None, problem or "")


# optional packages: (module to find, its name, the install command)
EXTRA_FORMATS = {
    "ffcv": ("ffcv", "ffcv", "bash scripts/install_extras.sh"),
    "dali": ("nvidia.dali", "dali", "bash scripts/install_extras.sh"),
    "digits": ("sklearn", "scikit-learn", "pip install -e '.[demo]' (bash scripts/setup.sh does)"),
}
OPTIONAL = {**EXTRA_FORMATS, "autoattack": ("pyautoattack", "pyautoattack", "bash scripts/install_extras.sh")}
PATHLESS_FORMATS = ("synthetic", "digits")  # data.path is not needed (a cache folder at most)


def _check_extra(fmt: str, key: str = "data.format") -> None:
    import importlib.util

    mod, package, install = OPTIONAL[fmt]
    try:
        found = importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise ConfigError(f"{key} = '{fmt}' needs the {package} package, which is not installed; "
                          f"install it with: {install}")


def check_name(name: str, what: str = "name") -> str:
    """Run and sweep names become folder names: letters, digits, '-', '_', '.', '=' and ',' only, no '..'."""
    import re

    if not name or not re.fullmatch(r"[A-Za-z0-9_.=,+-]+", name) or name in (".", "..") or ".." in name:
        raise ConfigError(f"{what} = {name!r} is not a valid name: use letters, digits and - _ . = , + "
                          f"(no '/', no '..', not empty)")
    return name


def to_toml(cfg: Sections) -> str:
    import tomli_w

    return tomli_w.dumps(cfg.to_dict())


def replace(cfg: Config, **dotted: Any) -> Config:
    """Copy of cfg with dotted keys replaced (values are type-checked like --set)."""
    return from_dict(cfg.to_dict(), dotted)
