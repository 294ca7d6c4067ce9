"""The rule "a pretraining job makes this fine-tuning job's base encoder" (``model.pretrain``).

The library only trains; which job makes which file is the launcher's business: launch/train.py refuses a
job whose base encoder is still to be made, launch/sweep.py runs its pretraining first.
"""
from __future__ import annotations

import os
from pathlib import Path

from advft import config as C


def pretrain_job(cfg: C.Config, world_size: int = 1):
    """The pretraining job of ``model.pretrain`` (None when unset): its resolved path and its validated
    :class:`advft.simclr.PretrainConfig`, whose output ``<run.root>/<run.name>/encoder.pt`` must be
    ``model.checkpoint`` and whose encoder must be the model this job builds. Raises ConfigError (one line)."""
    if not cfg.model.pretrain:
        return None
    from advft import simclr

    job = C.resolve_job(cfg.model.pretrain)
    try:
        pcfg = simclr.validate(simclr.load_config(job), world_size=world_size)
    except C.ConfigError as e:
        raise C.ConfigError(f"model.pretrain = {cfg.model.pretrain}: {e}") from None
    made = pcfg.run.dir / simclr.ENCODER_FILE
    if not _same_file(made, Path(cfg.model.checkpoint)):
        raise C.ConfigError(f"model.pretrain = {cfg.model.pretrain} makes {made}, but model.checkpoint = "
                            f"{cfg.model.checkpoint} is another file; set model.checkpoint = \"{made}\" or "
                            f"model.pretrain = \"\"")
    for key in ("arch", "stem", "normalize"):
        ours, theirs = getattr(cfg.model, key), getattr(pcfg.model, key)
        if ours != theirs:
            raise C.ConfigError(f"model.pretrain = {cfg.model.pretrain} makes an encoder with model.{key} = "
                                f"{theirs!r}, but this job has model.{key} = {ours!r}; make them agree")
    return job, pcfg


def validate(cfg: C.Config, world_size: int = 1, made_here: bool = False) -> C.Config:
    """:func:`advft.config.validate` plus the model.pretrain rule. ``made_here``: the caller runs the
    pretraining before the run (launch/sweep.py), so a base encoder still to be made is not an error."""
    C.validate(cfg, world_size=world_size, checkpoint_made=bool(cfg.model.pretrain))
    if not cfg.model.pretrain:
        return cfg
    pretrain_job(cfg)
    ck = cfg.model.checkpoint
    if not made_here and Path(ck).exists() and not Path(ck).is_file():
        raise C.ConfigError(f"model.checkpoint: {ck} {C.not_a_file(ck)}")
    if not made_here and not Path(ck).is_file():
        raise C.ConfigError(f"model.checkpoint: {ck} does not exist yet; it is made by the pretraining job "
                            f"model.pretrain = {cfg.model.pretrain}: run python launch/pretrain.py "
                            f"{cfg.model.pretrain} first, or start this job with launch/sweep.py, which runs it")
    return cfg


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()
