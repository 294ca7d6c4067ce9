"""NVIDIA DALI behind the loader contract of ``advft.data.loader``: image folders, file lists, webdataset shards.

Inputs (``file_root_or_list``)
- an ImageFolder split folder ``<root>/<class>/<image>`` (labels: sorted class folders, as torchvision);
- a file list ``<name>.txt`` of ``<path> <label>`` lines, as ``python -m data_prep dali`` writes it;
  paths are relative to the ``file_root`` in the sidecar ``<name>.json`` next to it, or else to the
  list's own folder;
- a folder of webdataset shards ``*.tar`` with their ``.idx`` index files (``data_prep dali --shards``).

Order and sharding. For folders and file lists the samples of every batch follow the contract
exactly: ``ShardedBatchSampler`` picks them (epoch permutation seeded by (seed, epoch); rank r, the
GLOBAL rank, takes the contiguous slice [r*G/W, (r+1)*G/W) of each global batch), and each epoch
gets a DALI pipeline whose reader lists just this rank's files of that epoch in that order. So
DALI yields the same images per step and rank as the built-in loader, resuming skips batches
without reading them, and nothing depends on the node-local rank that DALI's examples use.
(DALI's own ``random_shuffle`` only mixes within a buffer of ``initial_fill`` samples of a
contiguous shard, and cannot start in the middle of a later epoch.)

Webdataset shards are read sequentially, which is their point on network file systems, so their
order is DALI's: the samples are split between ranks by ``shard_id=(rank + epoch) % W, num_shards=W``
(disjoint within an epoch, rotating between epochs), shuffled within a buffer by a seed made from
(seed, epoch), G // W samples per rank and step, n // G steps per epoch. ``data_prep`` writes the
shards in a shuffled order, so the buffer shuffle is enough. Resuming replays the skipped batches
of the resumed epoch (they are decoded and dropped). Evaluation reads rank r's contiguous part.

Augmentation draws from the pipeline's seed, made from (seed, epoch, rank): reproducible for an
epoch read from its start, not after a resume in its middle.

Views (``transform``): "none" = resize the shorter side to round(resolution / 0.875) (linear,
antialiased), centre crop ``resolution``; "rrc_flip" = random-resized-crop (area
``rrc_scale(resolution)``, aspect 3/4..4/3) fused with decoding, resize, horizontal flip p = 1/2.
Decoding runs on the GPU (``device="mixed"``) when ``device`` is CUDA, with DALI's resize there;
else a CPU pipeline (``device_id=None``) whose resize is torch's uint8 kernel, the built-in loader's
``transforms.resize`` / ``center_crop``, run on DALI's batches by a thread pool inside the pipeline
(``fn.python_function``): DALI's CPU resize costs more than the decoding (see ``_torch_views``).
The flip, the layout the model gets and the scaling to float32 / 255 are one DALI op in the
pipeline (see ``_images``), so x leaves DALI as float32 in [0, 1] on ``device``; it is never
normalised. DALI is imported only when a loader is made.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from advft.data.datasets import DataError
from advft.data.loader import ShardedBatchSampler
from advft.data.transforms import CROP_FRACTION, RRC_RATIO, TRAIN_TRANSFORMS, center_crop, resize, rrc_scale

INSTALL_HINT = (
    "NVIDIA DALI is not installed in this environment. Install it with `bash scripts/install_extras.sh` "
    "(or pip install nvidia-dali-cuda120==2.4.0)"
)
_SEED_STREAM = 3  # first seed word of DALI's augmentation seeds; advft.data.loader uses 0..2


class DALIUnavailableError(ImportError):
    """DALI cannot be imported; the message says how to install it."""


def _import_dali() -> Any:
    try:
        import nvidia.dali  # noqa: F401 - the package first, so a blocked or broken install fails here
        import nvidia.dali.plugin.pytorch as dali_torch
    except (ImportError, OSError) as e:
        raise DALIUnavailableError(f"{INSTALL_HINT}. Import failed with {type(e).__name__}: {e}") from e
    return dali_torch


def available() -> bool:
    """Whether DALI and its PyTorch plugin can be imported here."""
    try:
        _import_dali()
    except DALIUnavailableError:
        return False
    return True


# ---------------------------------------------------------------- inputs


def _read_file_list(path: Path) -> tuple[str, list[str], np.ndarray]:
    """(file_root, relative paths, labels) of a ``<path> <label>`` list."""
    files, labels = [], []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            name, _, label = line.rpartition(" ")
            if not name or not label.lstrip("-").isdigit():
                raise DataError(f"{path}:{n}: expected '<path> <label>', got {line!r}")
            files.append(name)
            labels.append(int(label))
    if not files:
        raise DataError(f"file list {path} is empty")
    sidecar = path.with_suffix(".json")
    root = None
    if sidecar.is_file():
        try:
            root = json.loads(sidecar.read_text(encoding="utf-8")).get("file_root")
        except ValueError as e:
            raise DataError(f"sidecar {sidecar} is not valid JSON ({e})") from e
    return str(root or path.parent), files, np.asarray(labels, dtype=np.int64)


def _scan_folder(root: Path) -> tuple[str, list[str], np.ndarray]:
    """(root, relative paths, labels) of an ImageFolder split folder: the files ``python -m data_prep dali``
    would list (``folder_scan``: sorted class folders, each real folder and file once, regular files only)."""
    from advft.data.folder_scan import IMAGE_EXTENSIONS, scan_split

    try:
        scan = scan_split(root)
    except OSError as e:
        raise DataError(f"cannot read the image folder {root}: {e.strerror}") from e
    if not scan.files:
        raise DataError(f"no images under {root}/<class>/ (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return str(root), scan.files, scan.labels


def _shards(folder: Path) -> tuple[list[str], list[str], int]:
    """(tars, index files, number of samples) of a webdataset folder."""
    tars = sorted(folder.glob("*.tar"))
    idxs = [t.with_suffix(".idx") for t in tars]
    missing = [i.name for i in idxs if not i.is_file()]
    if missing:
        raise DataError(f"{folder}: index files {missing[:3]} are missing; write them with DALI's wds2idx "
                        "or convert with `python -m data_prep dali --shards N`")
    n = 0
    for i in idxs:
        with open(i, encoding="utf-8") as f:
            header = f.readline().split()
        if len(header) != 2 or not header[0].startswith("v1.") or not header[1].isdigit():
            raise DataError(f"{i}: not a webdataset index (first line {' '.join(header)!r})")
        n += int(header[1])
    return [str(t) for t in tars], [str(i) for i in idxs], n


# ---------------------------------------------------------------- pipelines


def _seed(*words: int) -> int:
    return int(np.random.SeedSequence([_SEED_STREAM, *words]).generate_state(1)[0] & 0x7FFFFFFF)


@functools.lru_cache(maxsize=None)
def _resize_pool(threads: int) -> ThreadPoolExecutor:
    """The threads that resize a CPU pipeline's batches (one pool per thread count, shared by loaders)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="advft-dali-resize")


def _torch_views(view: Callable[[Tensor], Tensor], threads: int) -> Callable[[list], list]:
    """A batch function for ``fn.python_function``: ``view`` (uint8 (3, H, W) -> (3, res, res)) applied
    to each HWC uint8 sample, the batch split over ``threads`` threads; CHW uint8 samples out (torch's
    resize writes CHW, and ``crop_mirror_normalize`` lays the pixels out for the model while scaling them).

    Why not DALI's own ``fn.resize`` on a CPU: its linear, antialiased resampling costs ~1.6-1.9 ms of
    CPU per 224 px random-resized crop, more than decoding the JPEG (~1.1-1.3 ms), while torch's uint8
    kernel (``transforms.resize``, the built-in loader's) takes ~0.3 ms; torch releases the GIL in the
    kernel, so the threads run in parallel. The DALI loader got 1.5x faster on a 2-core CPU
    (BENCHMARKS.md, "Runs 10-12")."""
    pool = _resize_pool(threads)

    def run(images: list[np.ndarray]) -> list[np.ndarray]:
        out: list[np.ndarray] = [np.empty(0)] * len(images)

        def part(lo: int, hi: int) -> None:
            for i in range(lo, hi):  # the CHW view of an HWC sample is channels-last: torch's fast layout
                out[i] = view(torch.from_numpy(images[i]).permute(2, 0, 1)).contiguous().numpy()

        bounds = np.linspace(0, len(images), min(threads, len(images)) + 1).astype(int)
        for f in [pool.submit(part, lo, hi) for lo, hi in itertools.pairwise(bounds)]:
            f.result()
        return out

    return run


def _crops(encoded: Any, transform: str, resolution: int, gpu: bool, threads: int = 1) -> tuple[Any, Any]:
    """(uint8 RGB images of ``resolution`` x ``resolution``, CHW from a CPU pipeline and HWC from a GPU
    one, whether to flip each one: a coin flip for "rrc_flip", 0 for the evaluation view). The flip
    and the layout the model gets are left to ``_images``.

    DALI decodes (and for "rrc_flip" picks and decodes the random crop) in both cases; the resize
    is DALI's on a GPU and torch's uint8 kernel on a CPU (``_torch_views``, ``threads`` threads), which
    also gives the CPU evaluation view exactly the geometry and filter of ``transforms.center_crop``."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    device = "mixed" if gpu else "cpu"
    if transform == "rrc_flip":
        img = fn.decoders.image_random_crop(encoded, device=device, output_type=types.RGB,
                                            random_area=list(rrc_scale(resolution)),
                                            random_aspect_ratio=list(RRC_RATIO), num_attempts=10)
        mirror = fn.random.coin_flip(probability=0.5)  # made before the resize: seeds follow the ops' order
        if gpu:
            img = fn.resize(img, size=[resolution, resolution], interp_type=types.INTERP_LINEAR, antialias=True)
        else:
            square = functools.partial(resize, size=(resolution, resolution))
            img = fn.python_function(img, function=_torch_views(square, threads),
                                     batch_processing=True, output_layouts="CHW")
        return img, mirror
    img = fn.decoders.image(encoded, device=device, output_type=types.RGB)
    if not gpu:
        centre = functools.partial(center_crop, resolution=resolution)
        return fn.python_function(img, function=_torch_views(centre, threads),
                                  batch_processing=True, output_layouts="CHW"), 0
    # On the GPU, the evaluation view with the geometry of ``transforms.center_crop``, so DALI, FFCV
    # and the built-in loader show the model the same region: shorter side to S = round(res / 0.875),
    # the other side rounded, then the crop at floor((side - res) / 2). The sizes come from the image
    # header (a CPU op, also when decoding on the GPU).
    hwc = fn.peek_image_shape(encoded)
    h, w = fn.cast(hwc[0], dtype=types.FLOAT), fn.cast(hwc[1], dtype=types.FLOAT)
    scale = round(resolution / CROP_FRACTION) / dmath.min(h, w)
    nh, nw = dmath.floor(h * scale + 0.5), dmath.floor(w * scale + 0.5)
    img = fn.resize(img, resize_y=nh, resize_x=nw, interp_type=types.INTERP_LINEAR, antialias=True)
    start = fn.cast(fn.stack(dmath.floor((nh - resolution) / 2), dmath.floor((nw - resolution) / 2)),
                    dtype=types.INT32)
    # Named arguments, not inputs: argument inputs live on the CPU also when the images are on the GPU.
    return fn.slice(img, start=start, shape=[resolution, resolution], axes=[0, 1]), 0


def _images(encoded: Any, transform: str, resolution: int, gpu: bool, channels_last: bool, threads: int = 1) -> Any:
    """The view ``transform`` of the images as float32 in [0, 1]: CHW, or HWC for ``channels_last``
    (the NCHW view of an NHWC batch is channels_last in memory, so torch then only permutes).

    Flip, the layout (CHW or HWC from the crops' own) and uint8 -> float32 / 255 are one fused
    ``crop_mirror_normalize`` that runs on DALI's worker threads (on the GPU with ``mixed``), not in
    the training process: a uint8 flip in DALI, then a permute and a float copy in torch, cost ~1.3x
    the CPU per image on 2 CPU cores (BENCHMARKS.md, "Data loaders"). Its mean 0 and std 255 only SCALE the pixels to [0, 1]: this is
    NOT mean/std normalisation, which lives inside the model (pixels are in [0, 1] outside it, so eps
    keeps its meaning)."""
    from nvidia.dali import fn, types

    img, mirror = _crops(encoded, transform, resolution, gpu, threads)
    return fn.crop_mirror_normalize(img, dtype=types.FLOAT, output_layout="HWC" if channels_last else "CHW",
                                    mean=[0.0], std=[255.0], mirror=mirror)


def _iterator(build: Any, *, batch: int, threads: int, device_id: int | None, seed: int, partial: bool) -> Any:
    """A built DALI pipeline from ``build()`` (a graph returning (images, labels)) wrapped for PyTorch."""
    from nvidia.dali import pipeline_def
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    pipe = pipeline_def(build, batch_size=batch, num_threads=threads, device_id=device_id, seed=seed)()
    pipe.build()
    policy = LastBatchPolicy.PARTIAL if partial else LastBatchPolicy.DROP
    return DALIGenericIterator([pipe], ["x", "y"], reader_name="reader", last_batch_policy=policy, auto_reset=False)


def _digits_to_int(cls: Tensor) -> Tensor:
    """Labels from webdataset ``.cls`` bytes, one row per sample: the ASCII digits read as a decimal
    number; other bytes (the zeros ``fn.pad`` appends to shorter rows) are skipped."""
    value = torch.zeros(cls.shape[0], dtype=torch.int64, device=cls.device)
    for col in cls.to(torch.int64).unbind(1):
        is_digit = (col >= 48) & (col <= 57)
        value = torch.where(is_digit, value * 10 + (col - 48), value)
    return value


def _checked(make: Callable[[], Any], source: Path) -> Iterator[dict[str, Tensor]]:
    """The batches of the DALI iterator ``make()``, with a read or decode failure turned into a
    DataError naming the input. The iterator is made here because DALI already reads its first
    batch while it is being built; it is released when the pass ends."""
    try:
        for out in make():
            # With pad_last_batch, a rank whose shard has fewer batches than another's gets a whole
            # batch of padding at the end, which the PARTIAL policy trims to nothing.
            if out[0]["y"].shape[0]:
                yield out[0]
    except RuntimeError as e:
        # DALI's message is a long report; the line after "encountered:" says what went wrong.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        after = [lines[i + 1] for i, line in enumerate(lines[:-1]) if line == "encountered:"]
        raise DataError(f"DALI failed reading {source} ({(after or lines or ['?'])[0]}); "
                        "`python -m data_prep dali` finds, lists and skips unreadable images") from e


def make_dali_loader(
    file_root_or_list: str | os.PathLike,
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
    """Batches ``(x, y)`` for this rank (``rank`` is the GLOBAL rank) from a folder, file list or shards.

    x: float32 in [0, 1] on ``device``, (global_batch // world_size, 3, resolution, resolution)
    (channels_last memory format if asked); y: int64 on ``device``. ``train=True``: infinite,
    shuffled, from global step ``start_step``; ``train=False``: one pass in order, last partial
    batch kept. ``num_workers`` is DALI's number of CPU threads (and, on a CPU, the number of threads
    that resize its crops). Raises DataError for a missing or malformed input, DALIUnavailableError
    when DALI is not installed, ValueError for bad arguments.
    """
    if transform not in TRAIN_TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; valid: {TRAIN_TRANSFORMS}")
    if resolution < 8:
        raise ValueError(f"resolution must be >= 8 pixels, got {resolution}")
    path = Path(file_root_or_list).expanduser()
    if not path.exists():
        raise DataError(f"DALI input {path} does not exist; give an image folder, a file list (.txt) or a "
                        "folder of webdataset shards (`python -m data_prep dali SRC OUT` writes the last two)")
    _import_dali()
    device = torch.device(device)
    gpu = device.type == "cuda"
    device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
    common = dict(threads=max(1, num_workers), device_id=device_id)

    def convert(out: dict[str, Tensor], labels_from_digits: bool) -> tuple[Tensor, Tensor]:
        # x leaves DALI as float32 in [0, 1] on the device already: NCHW, or NHWC for channels_last,
        # whose NCHW view is channels_last in memory (no copy).
        x = out["x"].to(device, non_blocking=True)
        x = x.permute(0, 3, 1, 2) if channels_last else x
        y = out["y"].to(device, non_blocking=True)
        y = _digits_to_int(y) if labels_from_digits else y.reshape(-1).to(torch.int64)
        return x, y

    if path.is_dir() and any(path.glob("*.tar")):
        return _webdataset_batches(path, convert, global_batch=global_batch, rank=rank, world_size=world_size,
                                   seed=seed, start_step=start_step, train=train, transform=transform,
                                   resolution=resolution, gpu=gpu, channels_last=channels_last, **common)
    file_root, files, labels = _read_file_list(path) if path.is_file() else _scan_folder(path)
    sampler = ShardedBatchSampler(len(files), global_batch, rank=rank, world_size=world_size, seed=seed,
                                  shuffle=train, start_step=start_step, infinite=train)
    per_rank = global_batch // world_size

    def graph(order: list[int]) -> Any:
        """The pipeline graph of one epoch: this rank's files of the epoch, in order."""
        from nvidia.dali import fn

        def build() -> tuple[Any, Any]:
            encoded, y = fn.readers.file(file_root=file_root, files=[files[i] for i in order],
                                         labels=[int(labels[i]) for i in order], random_shuffle=False,
                                         pad_last_batch=True, name="reader")
            return (_images(encoded, transform, resolution, gpu, channels_last, common["threads"]),
                    y.gpu() if gpu else y)

        return build

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for epoch, group in itertools.groupby(sampler, key=lambda item: item[1]):
            order = [i for _, _, ix in group for i in ix]
            if not order:
                continue
            make = functools.partial(_iterator, graph(order), batch=per_rank, seed=_seed(seed, epoch, rank),
                                     partial=not train, **common)
            for out in _checked(make, path):
                yield convert(out, labels_from_digits=False)

    return batches()


def _webdataset_batches(folder: Path, convert: Any, *, global_batch: int, rank: int, world_size: int, seed: int,
                        start_step: int, train: bool, transform: str, resolution: int, gpu: bool,
                        channels_last: bool, threads: int, device_id: int | None) -> Iterator[tuple[Tensor, Tensor]]:
    """The webdataset path (see the module docstring for its order and sharding)."""
    from nvidia.dali import fn

    tars, idxs, n = _shards(folder)
    # Validates the arguments the same way as the other paths; its batches are not used here.
    sampler = ShardedBatchSampler(n, global_batch, rank=rank, world_size=world_size, seed=seed,
                                  shuffle=train, start_step=start_step, infinite=train)
    per_rank = global_batch // world_size

    def pipeline(epoch: int) -> Any:
        shard = (rank + epoch) % world_size if train else rank

        def graph() -> tuple[Any, Any]:
            encoded, cls = fn.readers.webdataset(
                paths=tars, index_paths=idxs, ext=["jpg", "cls"], missing_component_behavior="error",
                shard_id=shard, num_shards=world_size, random_shuffle=train, seed=_seed(seed, epoch),
                stick_to_shard=True, pad_last_batch=not train, name="reader")
            cls = fn.pad(cls, fill_value=0)  # labels of different digit counts -> one width per batch
            return _images(encoded, transform, resolution, gpu, channels_last, threads), (cls.gpu() if gpu else cls)

        return _iterator(graph, batch=per_rank, seed=_seed(seed, epoch, rank), partial=not train,
                         threads=threads, device_id=device_id)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        if not train:
            for out in _checked(functools.partial(pipeline, 0), folder):
                yield convert(out, labels_from_digits=True)
            return
        epoch, skip = divmod(start_step, sampler.steps_per_epoch)
        while True:
            epoch_batches = _checked(functools.partial(pipeline, epoch), folder)
            for out in itertools.islice(epoch_batches, skip, sampler.steps_per_epoch):
                yield convert(out, labels_from_digits=True)
            epoch_batches.close()  # release this epoch's pipeline (and its GPU buffers) before the next
            epoch, skip = epoch + 1, 0

    return batches()
