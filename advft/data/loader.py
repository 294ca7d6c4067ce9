"""Deterministic, sharded batches: the loader contract that every advft loader follows.

The contract (FFCV and DALI loaders implement the same one)
- ``make_loader`` yields ``(x, y)``: x float32 in [0, 1] on the device, shape
  (global_batch // world_size, 3, H, W), never normalised; y int64 on the device.
- Which images form global step s is a pure function of (seed, s): epoch e, k = divmod(s, steps
  per epoch); batch k of epoch e is ``perm_e[k*G:(k+1)*G]`` with perm_e a permutation seeded by
  (seed, e). The last incomplete batch of an epoch is dropped in training.
- Rank r of W takes the contiguous slice [r*G/W, (r+1)*G/W) of each global batch. Concatenating
  the ranks' batches in rank order gives the one-process batch, so W ranks on G/W samples each
  train on exactly what one process on G samples would.
- A run resumed at step s (``start_step=s``) sees the same batches as one that never stopped.
- Augmentation is keyed by (seed, epoch, index) (see ``transforms.py``), so the pixels do not
  depend on the number of workers, ranks or restarts either.
- Evaluation (``train=False``): one pass in dataset order, the last partial batch kept and split
  the same contiguous way.

Nothing here draws from torch's or numpy's global RNG.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from advft.data.transforms import TRAIN_TRANSFORMS, random_resized_crop_flip

# First seed word of each kind of stream, so that shuffling, subsets and augmentation
# (transforms.AUGMENT_STREAM = 1) never share random numbers even with equal seeds.
_PERMUTATION_STREAM = 0
_SUBSET_STREAM = 2


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the ``n`` samples in ``epoch``; a pure function of (n, seed, epoch)."""
    ss = np.random.SeedSequence([_PERMUTATION_STREAM, seed, epoch])
    return np.random.Generator(np.random.PCG64(ss)).permutation(n)


class ShardedBatchSampler:
    """Index batches for one rank: yields ``(step, epoch, indices)`` with ``indices`` a list of ints.

    ``infinite=True`` (training): endless, ``steps_per_epoch = n // global_batch``, incomplete
    batches dropped, starting at global step ``start_step``. ``infinite=False`` (evaluation): one
    epoch (epoch 0), ``steps_per_epoch = ceil(n / global_batch)``, the last batch may be smaller and
    is split into contiguous near-equal parts; a rank whose part is empty (only when that batch has
    fewer samples than ranks) gets an empty list. ``shuffle=False`` uses the identity order.
    """

    def __init__(
        self,
        n: int,
        global_batch: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        start_step: int = 0,
        infinite: bool = True,
    ) -> None:
        if global_batch < 1 or world_size < 1:
            raise ValueError(f"global_batch and world_size must be >= 1, got {global_batch} and {world_size}")
        if global_batch % world_size:
            raise ValueError(f"global_batch {global_batch} is not divisible by world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        if n < 1 or (infinite and n < global_batch):
            raise ValueError(f"a dataset of {n} samples is smaller than one global batch of {global_batch}")
        self.n, self.global_batch, self.rank, self.world_size = n, global_batch, rank, world_size
        self.seed, self.shuffle, self.start_step, self.infinite = seed, shuffle, start_step, infinite
        self.steps_per_epoch: int = n // global_batch if infinite else -(-n // global_batch)

    def order(self, epoch: int) -> np.ndarray:
        """All sample indices of ``epoch`` in the order they are used."""
        return epoch_permutation(self.n, self.seed, epoch) if self.shuffle else np.arange(self.n)

    def shard(self, batch: np.ndarray) -> list[int]:
        """This rank's contiguous part of a global batch (exactly G/W samples for a full batch)."""
        m, w = len(batch), self.world_size
        return batch[self.rank * m // w : (self.rank + 1) * m // w].tolist()

    def __len__(self) -> int:
        if self.infinite:
            raise TypeError("an infinite ShardedBatchSampler has no length")
        return max(0, self.steps_per_epoch - self.start_step)

    def __iter__(self) -> Iterator[tuple[int, int, list[int]]]:
        step, order, order_epoch = self.start_step, None, -1
        g = self.global_batch
        while self.infinite or step < self.steps_per_epoch:
            epoch, k = divmod(step, self.steps_per_epoch)
            if epoch != order_epoch:  # one permutation per epoch, not per batch
                order, order_epoch = self.order(epoch), epoch
            yield step, epoch, self.shard(order[k * g : (k + 1) * g])
            step += 1


class _KeyBatches:
    """Turns sampler output into DataLoader batches of (epoch, index) keys; skips empty shards."""

    def __init__(self, sampler: ShardedBatchSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for _, epoch, indices in self.sampler:
            if indices:  # an empty list cannot be collated; it only occurs at the end of evaluation
                yield [(epoch, i) for i in indices]


def _full_image(dataset: Dataset, i: int) -> tuple[torch.Tensor, int]:
    # Datasets with a centre-cropped evaluation view expose the whole image for training crops.
    fn = getattr(dataset, "full_image", None)
    return fn(i) if fn is not None else dataset[i]


class _KeyedDataset(Dataset):
    """``ds[(epoch, i)]``: sample i, augmented with randomness keyed by (seed, epoch, i) only."""

    def __init__(self, dataset: Dataset, transform: str, resolution: int, seed: int) -> None:
        self.dataset, self.transform, self.resolution, self.seed = dataset, transform, resolution, seed

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, i = key
        if self.transform == "none":
            return self.dataset[i]
        img, label = _full_image(self.dataset, i)
        return random_resized_crop_flip(img, self.resolution, seed=self.seed, epoch=epoch, index=i), label


def _resolution_of(dataset: Dataset) -> int:
    res = getattr(dataset, "resolution", None)
    return int(res) if res is not None else int(dataset[0][0].shape[-1])


def _to_device(
    batches: DataLoader, device: torch.device, channels_last: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for x, y in batches:
        # Copy uint8 (a quarter of the bytes of float32) and convert on the device; with pinned
        # host memory the copies are asynchronous.
        x = x.to(device, non_blocking=True).to(torch.float32, memory_format=memory_format).div_(255)
        yield x, y.to(device, non_blocking=True)


def make_loader(
    dataset: Dataset,
    *,
    global_batch: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    start_step: int = 0,
    train: bool = True,
    transform: str = "none",
    resolution: int | None = None,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``(x, y)`` of ``dataset`` for this rank, following the contract in the module docstring.

    ``train=True``: infinite and shuffled from global step ``start_step``. ``train=False``: one pass
    in order, last partial batch kept (split over ranks; a rank whose part of it would be empty gets
    one batch fewer). ``transform`` is one of TRAIN_TRANSFORMS; "rrc_flip" crops
    from the full image to ``resolution`` (default: the dataset's), "none" returns the dataset's own
    evaluation view, whose resolution must then match ``resolution`` if that is given.
    Arguments are checked now; workers start at the first ``next()``.
    """
    if transform not in TRAIN_TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; valid: {TRAIN_TRANSFORMS}")
    native = _resolution_of(dataset)
    if transform == "none" and resolution is not None and resolution != native:
        raise ValueError(
            f"transform 'none' keeps the dataset's resolution {native}, but resolution={resolution} was asked"
        )
    sampler = ShardedBatchSampler(
        len(dataset),
        global_batch,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle=train,
        start_step=start_step,
        infinite=train,
    )
    device = torch.device(device)
    keyed = _KeyedDataset(dataset, transform, resolution or native, seed)
    batches = DataLoader(
        keyed,
        batch_sampler=_KeyBatches(sampler),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    return _to_device(batches, device, channels_last)


class SeededSubset(Dataset):
    """A fixed subset of a dataset, in increasing index order; forwards classes, resolution, labels."""

    def __init__(self, dataset: Dataset, indices: np.ndarray) -> None:
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.classes: list[str] = list(getattr(dataset, "classes", []))
        self.resolution = _resolution_of(dataset)
        labels: Any = getattr(dataset, "labels", None)
        self.labels = None if labels is None else np.asarray(labels)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.dataset[int(self.indices[i])]

    def full_image(self, i: int) -> tuple[torch.Tensor, int]:
        return _full_image(self.dataset, int(self.indices[i]))


def subset(dataset: Dataset, n: int, seed: int) -> Dataset:
    """The first ``n`` indices of a permutation seeded by ``seed`` (sorted); all of it if n >= len.

    For evaluation sets: the same (dataset, n, seed) always gives the same images.
    """
    if n < 1:
        raise ValueError(f"subset size must be >= 1, got {n}")
    if n >= len(dataset):
        return dataset
    ss = np.random.SeedSequence([_SUBSET_STREAM, seed])
    chosen = np.random.Generator(np.random.PCG64(ss)).permutation(len(dataset))[:n]
    return SeededSubset(dataset, np.sort(chosen))
