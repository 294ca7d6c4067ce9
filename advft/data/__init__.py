"""Data: datasets (synthetic, CIFAR-10, ImageFolder), FFCV/DALI loaders, and the glue from a Config.

Every loader yields ``(x, y)`` with x float32 in [0,1] on the device (never normalised) and y int64,
sharded by global rank, deterministic from (seed, epoch), resumable from a global step.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor

from advft.data.datasets import FORMATS_BUILTIN, DataError, build_dataset
from advft.data.loader import ShardedBatchSampler, make_loader, subset
from advft.data.synthetic import SyntheticShapes

__all__ = ["DataError", "FORMATS_BUILTIN", "ShardedBatchSampler", "SyntheticShapes", "build_dataset",
           "make_loader", "subset", "build_train_loader", "eval_data", "held_out_problem", "held_out_split"]

DATASET_SEED = 0  # the synthetic data is the same for every run; the run seed changes order and attacks


def held_out_split(fmt: str) -> str:
    return {"folder": "val"}.get(fmt, "test")


def _same_place(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def _dali_images(path: Path) -> set[str] | None:
    """The image files a DALI file list or folder names (resolved), None for webdataset shards."""
    from advft.data.dali_loader import _read_file_list, _scan_folder

    if path.is_dir() and any(path.glob("*.tar")):
        return None
    root, files, _ = _read_file_list(path) if path.is_file() else _scan_folder(path)
    return {os.path.realpath(os.path.join(root, f)) for f in files}


def held_out_problem(fmt: str, path: str, val_path: str, check_paths: bool = True) -> str | None:
    """Why the probe's test images could be among its training images under these data settings, as one
    line naming the key and what is valid; None when they cannot be.

    cifar10 (train / test batches), folder (``<path>/train`` / ``<path>/val``) and synthetic (independent
    train / test streams) hold out by construction. ffcv and dali read the test images from
    ``data.val_path``, which must be another file (for DALI lists and folders: no image in both);
    ``check_paths`` = False checks only what the settings say, not the files."""
    if fmt not in ("ffcv", "dali"):
        return None
    made = f"python -m data_prep {fmt} SRC OUT --split val"
    if not val_path:
        return (f"data.val_path is empty; data.format = '{fmt}' reads the probe's test images from data.val_path, "
                f"which must hold held-out images (the validation split, e.g. from `{made}`), not data.path")
    if not check_paths or not path or not Path(path).exists() or not Path(val_path).exists():
        return None
    a, b = Path(path), Path(val_path)
    if _same_place(a, b):
        return (f"data.val_path = {val_path} is data.path: the probe would be tested on its training images; "
                f"give the validation split's file")
    if fmt == "dali":
        train, test = _dali_images(a), _dali_images(b)
        both = (train & test) if train is not None and test is not None else set()
        if both:
            return (f"data.val_path = {val_path} shares {len(both)} images with data.path = {path} "
                    f"(e.g. {sorted(both)[0]}); the held-out list must not contain training images")
    return None


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


def eval_data(cfg: Any, device: torch.device) -> tuple[Callable[..., Iterable], Callable[..., Iterable]]:
    """(probe-train batches, held-out test batches) as callables giving a fresh pass each time.

    The probe set is a fixed seeded subset of the training split (eval.probe_train_size images), the test
    set a fixed seeded subset of the held-out split (eval.test_size); both with the evaluation transform.
    Called with ``final=True`` they give the strong evaluations' sets: eval.final_probe_train_size and
    eval.final_test_size images (0 = the routine sizes), drawn the same way (a larger set holds the smaller).
    The test images are never among the probe's (see :func:`held_out_problem`).
    """
    d, e = cfg.data, cfg.eval
    seed = cfg.run.seed
    common = dict(global_batch=e.batch_size, rank=0, world_size=1, device=device, transform="none")
    # configs without final sizes (pretraining's) evaluate on the routine sets only
    final_sizes = (getattr(e, "final_probe_train_size", 0), getattr(e, "final_test_size", 0))
    sizes = {False: (e.probe_train_size, e.test_size),
             True: (final_sizes[0] or e.probe_train_size, final_sizes[1] or e.test_size)}
    if d.format in ("ffcv", "dali"):
        problem = held_out_problem(d.format, d.path, d.val_path, check_paths=False)
        if problem:  # config.validate refuses this first; a caller that skipped it must not test on train images
            raise DataError(problem)
        # one shuffled pass (order fixed by the seed) gives a seeded random subset without random access
        def probe(final: bool = False) -> Iterable:
            return _take(_extra_loader(cfg, d.path, seed=seed, train=True, **common), sizes[final][0])

        def test(final: bool = False) -> Iterable:
            return _take(_extra_loader(cfg, d.val_path, seed=seed, train=True, **common), sizes[final][1])

        return probe, test
    # datasets are built on first use (the final sets only for the strong evaluations), then kept
    made: dict[tuple[str, bool], Any] = {}

    def dataset(which: str, final: bool) -> Any:
        final = final and sizes[True] != sizes[False]  # the same sizes: the same sets
        if (which, final) not in made:
            n_probe, n_test = sizes[final]
            made[which, final] = (subset(_dataset(cfg, "train"), n_probe, seed) if which == "probe" else
                                  subset(_dataset(cfg, held_out_split(d.format), size=n_test), n_test, seed))
        return made[which, final]

    def probe(final: bool = False) -> Iterable:
        return make_loader(dataset("probe", final), train=False, num_workers=0, **common)

    def test(final: bool = False) -> Iterable:
        return make_loader(dataset("test", final), train=False, num_workers=0, **common)

    dataset("probe", False), dataset("test", False)  # a missing or broken dataset is named now, not mid-run
    return probe, test
