"""Sweep grids: ``--grid KEY=v1,v2,...`` parsing, the cartesian product, and run names.

A run's name is made of its grid values, read back from the RESOLVED config (so ``lr=1e-4`` and
``lr=0.0001`` name the same run), followed by the config's short hash: ``alpha=0.1,lr=0.0001-3fa2c1d0``.
Rerunning a sweep therefore finds its runs again by name, and two configs never share a folder.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from advft import config as C

# run.name and run.root place the run: the sweep sets them, a grid over them would scatter the sweep
RESERVED = {"run.name", "run.root"}
LABELS = {"loss.name": "loss"}  # "name=trades" would not say which name
_UNSAFE = re.compile(r"[^A-Za-z0-9_.=,+-]")
MAX_NAME = 120  # characters before the hash; long grid values are cut (the hash keeps names unique)


@dataclass(frozen=True)
class Axis:
    key: str  # canonical dotted key, e.g. "loss.alpha"
    label: str  # how the key appears in run names and tables, e.g. "alpha"
    values: tuple[str, ...]  # as typed; checked and canonicalised through the config


def split_values(text: str) -> list[str]:
    """Split on commas outside brackets, so tuple values work: ``(0.9,0.95),(0.9,0.999)``."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
            if depth < 0:
                raise C.ConfigError(f"unbalanced brackets in grid values {text!r}")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise C.ConfigError(f"unbalanced brackets in grid values {text!r}")
    return [*out, cur]


def parse_grid(items: list[str], fixed: dict[str, str] | None = None) -> list[Axis]:
    """``["alpha=0,0.1", "lr=1e-4,1e-3"]`` -> axes. ConfigError for bad syntax, empty or repeated values,
    unknown or repeated keys, keys also given with --set (``fixed``), and the keys the sweep sets itself."""
    axes: list[Axis] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise C.ConfigError(f"--grid expects KEY=v1,v2,..., got {item!r}")
        canon = next(iter(C.parse_set([f"{key}=0"])))  # checks the key, resolves aliases
        if canon in RESERVED:
            raise C.ConfigError(f"--grid {canon}: the sweep sets run.name and run.root itself "
                                f"(runs live in <run.root>/<sweep>/<run>)")
        if any(a.key == canon for a in axes):
            raise C.ConfigError(f"--grid {key}: the key {canon} is given twice; list all its values in one --grid")
        if fixed and canon in fixed:
            raise C.ConfigError(f"--grid {key}: {canon} is also given with --set; use one of them")
        values = [v.strip() for v in split_values(text)]
        if any(not v for v in values):
            raise C.ConfigError(f"--grid {key}: empty value in {text!r} (write KEY=v1,v2,...)")
        axes.append(Axis(canon, LABELS.get(canon, key.split(".")[-1]), tuple(values)))
    labels = [a.label for a in axes]
    if len(set(labels)) != len(labels):  # e.g. optim.steps and attack.steps: fall back to the full keys
        axes = [Axis(a.key, a.key, a.values) for a in axes]
    return axes


def expand(axes: list[Axis]) -> list[dict[str, str]]:
    """The cartesian product: one {key: value} per run, in the order of the axes and their values."""
    return [dict(zip((a.key for a in axes), combo)) for combo in itertools.product(*(a.values for a in axes))]


def format_value(value: object) -> str:
    """A resolved config value as it appears in a run name: 0, 0.0001, 1e-05, true, 0.9-0.95."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "-".join(format_value(v) for v in value)
    if isinstance(value, float):
        text = repr(value)  # the shortest exact form: 0.0001, 1e-05
        return text[:-2] if text.endswith(".0") else text
    return str(value)


def resolved_value(cfg: C.Config, key: str) -> object:
    """The value of ``key`` in the resolved config; None for an unset field (a weight its loss does not read)."""
    sec, name = key.split(".")
    return cfg.to_dict()[sec].get(name)


def unread_weights(cfg: C.Config, point: dict[str, str]) -> list[str]:
    """The grid keys of ``point`` that are loss weights ``cfg``'s loss does not read (alpha for trades).

    ``--grid loss.name=fare,trades --grid alpha=0,1`` crosses every loss with every alpha; a loss that does
    not read alpha runs once, with alpha unset, instead of being refused."""
    from advft.losses import LOSSES

    spec = LOSSES.get(cfg.loss.name)
    return [k for k in point if spec is not None and k in ("loss.alpha", "loss.beta")
            and k.split(".")[1] not in spec.weights]


def run_name(cfg: C.Config, axes: list[Axis], prefix: str = "run") -> str:
    """Grid values from the resolved config plus the config hash, made safe as one folder name (an unset
    value, a weight the run's loss does not read, is left out)."""
    values = [(a.label, resolved_value(cfg, a.key)) for a in sorted(axes, key=lambda a: a.label)]
    parts = ",".join(f"{label}={format_value(v)}" for label, v in values if v is not None)
    stem = _UNSAFE.sub("_", parts or prefix).replace("..", "_")[:MAX_NAME]
    return C.check_name(f"{stem}-{cfg.hash()}", "run name")
