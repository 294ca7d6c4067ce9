"""FFCV ``.beton`` files behind the loader contract of ``advft.data.loader`` (same batches, same shards).

Which samples form each batch is not FFCV's choice: ``ShardedBatchSampler`` decides it (epoch
permutation seeded by (seed, epoch); rank r takes the contiguous slice [r*G/W, (r+1)*G/W) of each
global batch; resumable at any global step; evaluation in file order with the last partial batch
kept), and FFCV's loader is handed this rank's resulting order for one epoch at a time. So a
``.beton`` yields exactly the images, per step and per rank, that the built-in loader yields for
the same dataset, no torch process group is needed, and resuming at step s skips the batches
before it without decoding them. (FFCV's own ``distributed=True`` would shard with
``DistributedSampler``: strided, padded with repeats, and only from epoch starts.)

What FFCV does: decoding, cropping and flipping, in compiled (numba) code on its own threads. The
first epoch includes that compilation (a few seconds). Its random crops and flips draw from
numba's internal generator, so augmentation pixels, unlike batch membership, are not reproducible.

Views (``transform``)
- "none": the evaluation view. Images of varied sizes: the centre square of side 0.875 * shorter
  side, resized to ``resolution`` (= resize the shorter side to resolution / 0.875, centre crop).
  A file whose images all have one size (CIFAR-10) is taken as stored at its final resolution, as
  the built-in CIFAR-10 loader does: resized whole, not cropped (exact pixels at that size).
- "rrc_flip": random-resized-crop (area ``rrc_scale(resolution)``, aspect 3/4..4/3) + horizontal flip.

x leaves FFCV as uint8 (a quarter of the bytes) and becomes float32 / 255 on ``device``; it is never
normalised (eps is in pixel units). FFCV is imported only when a loader is made.

Side effect to know: FFCV sets torch's intra-op thread count to ``num_workers`` (its Compiler calls
``torch.set_num_threads``) when a loader is made and at every epoch start.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from advft.data.datasets import DataError
from advft.data.loader import ShardedBatchSampler
from advft.data.transforms import CROP_FRACTION, RRC_RATIO, TRAIN_TRANSFORMS, rrc_scale

INSTALL_HINT = (
    "FFCV is not installed in this environment. Install it with `bash scripts/install_extras.sh` "
    "(apt-get install pkg-config libopencv-dev libturbojpeg0-dev, then pip install ffcv==1.0.2)"
)


class FFCVUnavailableError(ImportError):
    """FFCV (or a library it needs) cannot be imported; the message says how to install it."""


def _import_ffcv() -> Any:
    try:
        # The top-level package first, so that a blocked or broken install fails here.
        import ffcv
        import ffcv.fields.decoders  # noqa: F401 - the submodules the loader uses
        import ffcv.loader  # noqa: F401
        import ffcv.reader  # noqa: F401
        import ffcv.transforms  # noqa: F401
        import ffcv.traversal_order.base  # noqa: F401
    except (ImportError, OSError) as e:  # OSError: a shared library (libturbojpeg, OpenCV) is missing
        raise FFCVUnavailableError(f"{INSTALL_HINT}. Import failed with {type(e).__name__}: {e}") from e
    return ffcv


def available() -> bool:
    """Whether FFCV can be imported here."""
    try:
        _import_ffcv()
    except FFCVUnavailableError:
        return False
    return True


@functools.cache
def _planned_order_class() -> type:
    """A TraversalOrder that returns whatever order it is told to (made once FFCV is imported)."""
    from ffcv.traversal_order.base import TraversalOrder

    class PlannedOrder(TraversalOrder):
        """The order of the next epoch, set from outside before each pass over the loader.

        FFCV sizes the loader (``len``) from the order it gets while it is constructed, so
        ``upcoming`` starts as a full-length placeholder.
        """

        def __init__(self, full_length: int) -> None:  # no super().__init__: it needs the loader
            self.upcoming = np.zeros(full_length, dtype=np.uint64)

        def __call__(self, loader: Any) -> PlannedOrder:
            # FFCV 1.0.2 accepts a TraversalOrder *instance* and then calls it with the loader.
            return self

        def sample_order(self, epoch: int) -> np.ndarray:
            return self.upcoming

    return PlannedOrder


def _epoch_orders(sampler: ShardedBatchSampler) -> Iterator[np.ndarray]:
    """This rank's sample order of each epoch from ``sampler`` (the resumed epoch without its
    skipped batches); consecutive chunks of b = G/W samples are exactly the contract's batches."""
    for _, batches in itertools.groupby(sampler, key=lambda item: item[1]):
        parts = [np.asarray(ix, dtype=np.uint64) for _, _, ix in batches if ix]
        if parts:
            yield np.concatenate(parts)


def make_ffcv_loader(
    path: str | os.PathLike,
    *,
    global_batch: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    start_step: int = 0,
    train: bool = True,
    transform: str = "none",
    resolution: int = 224,
    num_workers: int = 2,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Batches ``(x, y)`` of the ``.beton`` at ``path`` for this rank (``rank`` is the GLOBAL rank).

    x: float32 in [0, 1] on ``device``, (global_batch // world_size, 3, resolution, resolution)
    (channels_last memory format if asked); y: int64 on ``device``. ``train=True``: infinite,
    shuffled, from global step ``start_step``; ``train=False``: one pass in file order, last partial
    batch kept. The file needs fields ``image`` (RGBImageField) and ``label`` (IntField), as
    ``python -m data_prep ffcv`` writes. Raises DataError for a missing or malformed file,
    FFCVUnavailableError when FFCV is not installed, ValueError for bad arguments.
    """
    if transform not in TRAIN_TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; valid: {TRAIN_TRANSFORMS}")
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8 pixels, got {resolution}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"FFCV file {path} does not exist; write one with `python -m data_prep ffcv SRC OUT`")
    _import_ffcv()
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader
    from ffcv.reader import Reader
    from ffcv.transforms import RandomHorizontalFlip, ToDevice, ToTensor, ToTorchImage

    try:
        reader = Reader(path)
    except Exception as e:  # noqa: BLE001 - FFCV raises assorted errors on a file it cannot parse
        raise DataError(f"{path} is not a readable .beton ({type(e).__name__}: {e})") from e
    if not {"image", "label"} <= set(reader.field_names):
        raise DataError(f"{path} has fields {reader.field_names}; expected 'image' and 'label' (as data_prep writes)")
    n = int(reader.num_samples)
    sampler = ShardedBatchSampler(n, global_batch, rank=rank, world_size=world_size, seed=seed,
                                  shuffle=train, start_step=start_step, infinite=train)
    per_rank = global_batch // world_size
    device = torch.device(device)

    if transform == "rrc_flip":
        image_ops: list[Any] = [RandomResizedCropRGBImageDecoder((resolution, resolution), scale=rrc_scale(resolution),
                                                                 ratio=RRC_RATIO), RandomHorizontalFlip()]
    else:
        meta = reader.metadata[reader.metadata.dtype.names[reader.field_names.index("image")]]
        one_size = len(np.unique(meta["width"])) == 1 and len(np.unique(meta["height"])) == 1
        image_ops = [CenterCropRGBImageDecoder((resolution, resolution), ratio=1.0 if one_size else CROP_FRACTION)]
    to_device = [ToDevice(device, non_blocking=True)] if device.type != "cpu" else []
    # ToTorchImage(channels_last=True) is a free permuted view of FFCV's NHWC buffer.
    pipelines = {
        "image": image_ops + [ToTensor(), *to_device, ToTorchImage(channels_last=True)],
        "label": [IntDecoder(), ToTensor(), *to_device],
    }
    if train:
        full_length = sampler.steps_per_epoch * per_rank
        orders: Iterator[np.ndarray] = _epoch_orders(sampler)
    else:
        only = list(_epoch_orders(sampler))  # the single evaluation pass, known in full now
        full_length = len(only[0]) if only else 0
        orders = iter(only)
    if full_length == 0:  # an evaluation set smaller than the number of ranks leaves this one empty
        return iter(())
    order = _planned_order_class()(full_length)
    loader = Loader(path, batch_size=per_rank, num_workers=max(1, num_workers), order=order,
                    pipelines=pipelines, drop_last=train, seed=seed)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for epoch_order in orders:
            order.upcoming = epoch_order
            for x, y in loader:
                # FFCV reuses its buffers for later batches: the conversion makes the copy we keep.
                yield (x.to(torch.float32, memory_format=memory_format).div_(255),
                       y.reshape(-1).to(torch.int64, copy=True))

    return batches()
