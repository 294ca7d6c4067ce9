"""Cluster profiles: the facts of one cluster (partition, account, GPUs, time limit, ...) read from a TOML
file in ``slurm/profiles/``, plus command-line overrides. Code holds no cluster facts, only their types.

A profile is named (``local`` -> ``slurm/profiles/local.toml``) or given as a path. Every key of
:class:`Profile` without a default must be in the file (``slurm/README.md`` documents them); a string
set to ``""`` is not passed to sbatch, so the site default applies.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

from advft.config import ConfigError, read_toml

PROFILE_DIR = Path(__file__).resolve().parent.parent / "slurm" / "profiles"


@dataclass(frozen=True)
class Profile:
    name: str
    partition: str
    account: str
    qos: str
    constraint: str
    nodes: int
    gpus_per_node: int
    cpus_per_task: int
    mem_gb: int
    timeout_min: int
    signal_delay_s: int  # USR2 this long before the limit; must cover log_every steps plus one checkpoint
    max_num_timeout: int
    array_parallelism: int
    tasks_per_node: int = 0  # optional; 0 = one task per GPU, or 1 on a CPU node
    setup: tuple[str, ...] = ()  # optional shell lines run before srun (module load, conda activate)

    @property
    def tasks(self) -> int:
        """Tasks (processes, ranks) per node."""
        return self.tasks_per_node or max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks


_MINIMUM = {"nodes": 1, "gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 1, "timeout_min": 1,
            "signal_delay_s": 0, "max_num_timeout": 0, "array_parallelism": 1, "tasks_per_node": 0}
# the keys a user may set; `name` is the profile's own name, not a key of the file
KEYS = tuple(f.name for f in fields(Profile) if f.name != "name")
REQUIRED = tuple(f.name for f in fields(Profile)
                 if f.name != "name" and f.default is dataclasses.MISSING)


def _coerce(where: str, key: str, value: Any, typ: Any) -> Any:
    if typ is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                pass
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        if value < _MINIMUM[key]:
            raise ConfigError(f"{where}: {key} = {value} must be >= {_MINIMUM[key]}")
        return value
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        return value
    # tuple[str, ...]: a TOML list of shell lines, or one line from the command line
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ConfigError(f"{where}: {key} must be a list of strings (shell lines), got {value!r}")
    return tuple(items)


def profile_path(name: str) -> Path:
    """A name (``local``) means ``slurm/profiles/<name>.toml``; anything with a '/' or '.toml' is a path."""
    if "/" in name or name.endswith(".toml"):
        return Path(name)
    return PROFILE_DIR / f"{name}.toml"


def load_profile(name: str, overrides: Mapping[str, Any] | None = None) -> Profile:
    """Read a profile and apply overrides (``{"partition": "low", "nodes": "2"}``); ConfigError on any problem."""
    path = profile_path(name)
    if not path.is_file():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))
        raise ConfigError(f"cluster profile {name!r} not found ({path}); profiles here: {', '.join(known) or 'none'}")
    raw = dict(read_toml(path))
    where = str(path)
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(KEYS)}")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {', '.join(missing)} (see slurm/README.md)")
    for key, value in (overrides or {}).items():
        if key not in KEYS:
            raise ConfigError(f"unknown cluster key {key!r}; valid keys: {', '.join(KEYS)}")
        raw[key] = value
    hints = typing.get_type_hints(Profile)
    values = {k: _coerce(where, k, v, hints[k]) for k, v in raw.items()}
    return Profile(name=path.stem if path.parent == PROFILE_DIR else str(path), **values)


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["qos=high", "mem_gb=64"]`` -> dict; the keys are checked by :func:`load_profile`."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--cluster-set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def slurm_parameters(p: Profile, setup: list[str] | None = None) -> dict[str, Any]:
    """submitit ``SlurmExecutor.update_parameters`` keywords (sbatch options) for one run per array task."""
    params: dict[str, Any] = {
        "nodes": p.nodes, "ntasks_per_node": p.tasks, "cpus_per_task": p.cpus_per_task,
        "mem": f"{p.mem_gb}GB", "time": p.timeout_min, "signal_delay_s": p.signal_delay_s,
        "array_parallelism": p.array_parallelism, "setup": [*p.setup, *(setup or [])],
        # srun does not inherit --cpus-per-task (Slurm >= 22.05): where tasks are bound, it would get one core
        "srun_args": [f"--cpus-per-task={p.cpus_per_task}"],
    }
    if p.gpus_per_node:
        params["gpus_per_node"] = p.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(p, key):
            params[key] = getattr(p, key)
    return params


def local_parameters(p: Profile) -> dict[str, Any]:
    """submitit ``LocalExecutor`` keywords. Its default time limit is 2 minutes: always set it from the profile."""
    if p.nodes != 1:
        raise ConfigError(f"the local executor runs on this machine only: nodes = {p.nodes} needs --cluster slurm")
    return {"timeout_min": p.timeout_min, "signal_delay_s": p.signal_delay_s, "tasks_per_node": p.tasks,
            "gpus_per_node": p.gpus_per_node}


def default_profile() -> str:
    """``$ADVFT_PROFILE`` if set (a cluster's users set it once), else the local test cluster's profile."""
    return os.environ.get("ADVFT_PROFILE", "local")
