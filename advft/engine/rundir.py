"""The run folder: every file of a run is named, read and written here, each write atomic.

    <run.root>/<run.name>/ config.toml  manifest.json  metrics.jsonl  results.json  checkpoints/  encoder.pt
                           wandb_id  wandb/  (the wandb mirror's id and its local files)

A reader (the sweep, the report, a resumed run) never sees half a file: each write goes to a temporary
name in the same folder and is renamed over the old one.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import string
from pathlib import Path
from typing import IO, Any, Callable, Union

log = logging.getLogger(__name__)
_WANDB_ID = re.compile(r"[a-z0-9]{8,64}")
Payload = Union[str, bytes, Callable[[IO[bytes]], None]]


def atomic_write(path: str | os.PathLike, data: Payload, *, sync: bool = False) -> None:
    """Write ``data`` (text, bytes, or a function writing to a binary file) to ``path`` via temp + rename.

    ``sync`` fsyncs before the rename, for files that must survive a power cut (model weights). On any
    error the temporary file is removed and the old file, if any, is untouched.
    """
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """The object in a JSON file; {} when the file is missing, and {} with a warning naming the file and line
    when it is not a JSON object (a hand edit, a foreign tool): a run's checkpoints, not this file, say where
    it is, so a damaged file must not stop it from resuming."""
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        obj = json.loads(p.read_text())
    except UnicodeDecodeError:
        log.warning("%s: not UTF-8 text; ignored", p)
        return {}
    except json.JSONDecodeError as e:
        log.warning("%s line %d: not valid JSON (%s); ignored", p, e.lineno, e.msg)
        return {}
    if not isinstance(obj, dict):
        log.warning("%s line 1: a JSON %s, not an object; ignored", p, type(obj).__name__)
        return {}
    return obj


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records (JSON objects) of a metrics.jsonl. Other lines are skipped with a warning naming the file
    and line; a torn last line (a writer killed mid-line) too, as such."""
    p = Path(path)
    if not p.is_file():
        return []
    text = p.read_text(errors="replace")
    lines = text.splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            torn = n == len(lines) and not text.endswith("\n")
            log.warning("%s line %d: %s; skipped", p, n,
                        "torn last line (its writer was stopped mid-line)" if torn else "not valid JSON")
            continue
        if not isinstance(rec, dict):
            log.warning("%s line %d: a JSON %s, not an object; skipped", p, n, type(rec).__name__)
            continue
        out.append(rec)
    return out


class RunDir:
    """One run's folder. Only rank 0 writes; every rank may read."""

    CONFIG, MANIFEST, METRICS, RESULTS, CHECKPOINTS, ENCODER, WANDB_ID = (
        "config.toml", "manifest.json", "metrics.jsonl", "results.json", "checkpoints", "encoder.pt", "wandb_id")

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    config = property(lambda self: self.path / self.CONFIG)
    manifest = property(lambda self: self.path / self.MANIFEST)
    metrics = property(lambda self: self.path / self.METRICS)
    results = property(lambda self: self.path / self.RESULTS)
    checkpoints = property(lambda self: self.path / self.CHECKPOINTS)
    encoder = property(lambda self: self.path / self.ENCODER)

    def wandb_id(self) -> str:
        """This folder's wandb run id: made on first use and kept in the folder (lowercase letters and digits,
        which wandb accepts; grid values such as ``alpha=0,lr=1e-3`` are not)."""
        p = self.path / self.WANDB_ID
        if p.is_file() and _WANDB_ID.fullmatch(p.read_text().strip()):
            return p.read_text().strip()
        new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(12))
        atomic_write(p, new + "\n")
        return new

    def read_results(self) -> dict[str, Any]:
        return read_json(self.results)

    def write_results(self, results: dict[str, Any]) -> None:
        write_json(self.results, results)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics)

    def status(self) -> str | None:
        """results.json's status (running | finished | failed), None before the run wrote it."""
        try:
            return self.read_results().get("status")
        except (OSError, ValueError):
            return None

    def claim(self, cfg: Any, load_config: Callable[[Path], Any], toml: str, is_main: bool) -> None:
        """Create the folder and write config.toml; refuse a folder that holds a run of a different config.

        ``load_config`` reads an existing config.toml as the same kind of config (its hash is compared);
        ``toml`` is ``cfg`` as written.
        """
        from advft.config import ConfigError  # the engine's one dependency on the config module

        if self.config.is_file():
            old = load_config(self.config)
            if old.hash() != cfg.hash():
                raise ConfigError(f"run folder {self.path} already holds a run with a different config "
                                  f"(hash {old.hash()} vs {cfg.hash()}); choose another run.name")
        if is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write(self.config, toml)
