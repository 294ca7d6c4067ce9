"""Data: datasets (synthetic, CIFAR-10, ImageFolder), FFCV/DALI loaders, and the glue from a Config.

Every loader yields ``(x, y)`` with x float32 in [0,1] on the device (never normalised) and y int64,
sharded by global rank, deterministic from (seed, epoch), resumable from a global step.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor

from advft.data.datasets import FORMATS_BUILTIN, DataError, build_dataset
from advft.data.loader import ShardedBatchSampler, make_loader, subset
from advft.data.synthetic import SyntheticShapes

__all__ = ["DataError", "FORMATS_BUILTIN", "ShardedBatchSampler", "SyntheticShapes", "build_dataset",
           "make_loader", "subset", "build_train_loader", "eval_data", "held_out_split"]

DATASET_SEED = 0  # the synthetic data is the same for every run; the run seed changes order and attacks


def held_out_split(fmt: str) -> str:
    return {"folder": "val"}.get(fmt, "test")


def _dataset(cfg: Any, split: str, size: int | None = None):
    d = cfg.data
    return build_dataset(d.format, d.path, split, resolution=d.resolution,
                         synthetic_size=size or d.synthetic_size, seed=DATASET_SEED, download=d.download)


def _extra_loader(cfg: Any, path: str, **kw: Any) -> Iterator[tuple[Tensor, Tensor]]:
    d = cfg.data
    if d.format == "ffcv":
        from advft.data.ffcv_loader import make_ffcv_loader as make
    else:
        from advft.data.dali_loader import make_dali_loader as make
    return make(path, resolution=d.resolution, num_workers=d.num_workers, **kw)


def build_train_loader(cfg: Any, *, rank: int, world_size: int, start_step: int,
                       device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """The infinite training stream of this rank from global step ``start_step``."""
    d = cfg.data
    kw = dict(global_batch=d.batch_size, rank=rank, world_size=world_size, seed=cfg.run.seed,
              start_step=start_step, train=True, transform=d.train_transform, device=device,
              channels_last=cfg.run.channels_last)
    if d.format in ("ffcv", "dali"):
        return _extra_loader(cfg, d.path, **kw)
    return make_loader(_dataset(cfg, "train"), resolution=d.resolution, num_workers=d.num_workers, **kw)


def _take(it: Iterable[tuple[Tensor, Tensor]], n: int) -> Iterator[tuple[Tensor, Tensor]]:
    seen = 0
    for x, y in it:
        if seen >= n:
            return
        k = min(n - seen, y.shape[0])
        yield x[:k], y[:k]
        seen += k


def eval_data(cfg: Any, device: torch.device) -> tuple[Callable[[], Iterable], Callable[[], Iterable]]:
    """(probe-train batches, held-out test batches) as callables giving a fresh pass each time.

    The probe set is a fixed seeded subset of the training split (eval.probe_train_size images), the test
    set a fixed seeded subset of the held-out split (eval.test_size); both with the evaluation transform.
    """
    d, e = cfg.data, cfg.eval
    seed = cfg.run.seed
    common = dict(global_batch=e.batch_size, rank=0, world_size=1, device=device, transform="none")
    if d.format in ("ffcv", "dali"):
        # one shuffled pass (order fixed by the seed) gives a seeded random subset without random access
        val = d.val_path or d.path
        probe = lambda: _take(_extra_loader(cfg, d.path, seed=seed, train=True, **common), e.probe_train_size)  # noqa: E731
        test = lambda: _take(_extra_loader(cfg, val, seed=seed, train=True, **common), e.test_size)  # noqa: E731
        return probe, test
    train_ds = subset(_dataset(cfg, "train"), e.probe_train_size, seed)
    test_ds = subset(_dataset(cfg, held_out_split(d.format), size=e.test_size), e.test_size, seed)
    probe = lambda: make_loader(train_ds, train=False, num_workers=0, **common)  # noqa: E731
    test = lambda: make_loader(test_ds, train=False, num_workers=0, **common)  # noqa: E731
    return probe, test
