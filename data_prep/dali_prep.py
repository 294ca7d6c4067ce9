"""ImageFolder tree -> DALI inputs in folder OUT:

- ``<split>.txt``: the file list ``fn.readers.file(file_list=...)`` reads, one ``<path> <label>`` line
  per readable image, paths relative to the split folder (``file_root``, recorded in the sidecar);
- ``<split>_classes.json``: the class names in label order;
- with ``--shards N``: ``<split>_shards/shard-000000.tar`` ... webdataset shards, each sample a
  ``<key>.jpg`` and a ``<key>.cls`` (the label in ASCII decimal, zero-padded to one width), plus the
  ``.idx`` index of every tar. Samples go into the shards in a permutation seeded by ``--seed``, so
  sequential reads with DALI's buffered shuffle are already well mixed. The key is the sample's
  line number in the file list. Images that are not 3-channel JPEGs (grayscale, CMYK, PNG named
  .JPEG, ...) are re-encoded as RGB JPEG at quality 95, so every decoder, GPU ones included, reads
  them; all others are copied byte for byte.
- ``<split>.json``: the sidecar (settings, file_root, class names, counts, skipped and re-encoded
  files, shard sizes, time taken).

The file list keeps the source images untouched: DALI's decoders read grayscale, CMYK and PNG data
themselves and convert to RGB.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.images import Probe, jpeg_bytes, probe_all, read_rgb
from data_prep.outputs import file_sizes, is_done, provenance, write_json_atomic, write_text_atomic
from data_prep.sources import PrepError, Source, resolve
from data_prep.wds import ShardWriter, shard_names

log = logging.getLogger("data_prep")

REENCODE_QUALITY = 95


@dataclass(frozen=True)
class DALISettings:
    split: str = "train"
    shards: int = 0  # 0 = file list only
    seed: int = 0  # of the order of samples in the shards

    def __post_init__(self) -> None:
        if self.shards < 0:
            raise PrepError(f"--shards must be >= 0, got {self.shards}")


@dataclass(frozen=True)
class DALIPaths:
    folder: Path
    split: str

    @property
    def file_list(self) -> Path:
        return self.folder / f"{self.split}.txt"

    @property
    def class_index(self) -> Path:
        return self.folder / f"{self.split}_classes.json"

    @property
    def sidecar(self) -> Path:
        return self.folder / f"{self.split}.json"

    @property
    def shard_dir(self) -> Path:
        return self.folder / f"{self.split}_shards"


def _write_shard(task: tuple[Path, Path, list[tuple[str, str, int, bool]], int]) -> list[str]:
    """Writes one shard; returns the source paths that were re-encoded. Runs in a worker process."""
    tar_path, idx_path, samples, cls_width = task
    writer = ShardWriter(tar_path, idx_path)
    reencoded = []
    try:
        for key, path, label, is_rgb_jpeg in samples:
            if is_rgb_jpeg:
                with open(path, "rb") as f:
                    data = f.read()
            else:
                data = jpeg_bytes(read_rgb(path), REENCODE_QUALITY)
                reencoded.append(path)
            writer.add(key, {"jpg": data, "cls": str(label).zfill(cls_width).encode("ascii")})
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return reencoded


def _write_shards(paths: DALIPaths, source: Source, probes: list[Probe], settings: DALISettings,
                  workers: int) -> dict[str, Any]:
    n = len(source)
    key_width = max(8, len(str(n - 1)))
    cls_width = len(str(len(source.classes) - 1))
    order = np.random.default_rng(settings.seed).permutation(n)
    stems = shard_names(settings.shards)
    paths.shard_dir.mkdir(parents=True, exist_ok=True)
    tasks = []
    for stem, chunk in zip(stems, np.array_split(order, settings.shards)):
        samples = [(f"{i:0{key_width}d}", str(source.root / source.files[i]), int(source.labels[i]),
                    probes[i].is_rgb_jpeg) for i in chunk]
        tasks.append((paths.shard_dir / f"{stem}.tar", paths.shard_dir / f"{stem}.idx", samples, cls_width))
    log.info("writing %d shards to %s", len(tasks), paths.shard_dir)
    if workers > 1 and len(tasks) > 1:
        with mp.get_context("fork").Pool(min(workers, len(tasks))) as pool:
            reencoded = [p for r in pool.imap(_write_shard, tasks) for p in r]
    else:
        reencoded = [p for t in tasks for p in _write_shard(t)]
    # Shards of an earlier run with more shards would otherwise be read as part of this one.
    keep = {f"{s}.{ext}" for s in stems for ext in ("tar", "idx")}
    for stale in paths.shard_dir.glob("shard-*"):
        if stale.name not in keep:
            stale.unlink()
    root = str(source.root)
    return {
        "dir": paths.shard_dir.name,
        "count": settings.shards,
        "samples_per_shard": [len(t[2]) for t in tasks],
        "key_digits": key_width,
        "label_digits": cls_width,
        "reencoded_jpeg_quality": REENCODE_QUALITY,
        "reencoded": [os.path.relpath(p, root) for p in reencoded],
    }


def prepare(
    src: str | os.PathLike,
    out: str | os.PathLike,
    settings: DALISettings,
    *,
    workers: int = 0,
    strict: bool = False,
    verify: bool = False,
) -> DALIPaths:
    """Write the DALI inputs of ``settings.split`` into folder ``out`` (skipped when already done)."""
    workers = workers or os.cpu_count() or 1
    paths = DALIPaths(Path(out).expanduser().resolve(), settings.split)
    if paths.folder.suffix in (".txt", ".json", ".tar", ".beton"):
        raise PrepError(f"OUT must be a folder for the DALI inputs, got the file name {paths.folder}")
    source = resolve(src, settings.split)
    if source.kind != "folder":
        raise PrepError(f"{source.root} is a CIFAR-10 root; DALI reads image files. Convert it with "
                        "`python -m data_prep ffcv` or use the built-in cifar10 loader")
    recorded = {**asdict(settings), "source": str(source.root)}
    if is_done(paths.sidecar, recorded):
        log.info("skipped: %s already holds these settings (delete %s to rebuild)", paths.folder, paths.sidecar)
        if verify:
            from data_prep.dali_verify import verify_outputs

            verify_outputs(paths)
        return paths
    t0 = time.time()
    paths.folder.mkdir(parents=True, exist_ok=True)
    paths.sidecar.unlink(missing_ok=True)  # the outputs below change; "complete" must not linger

    probes = probe_all(source.root, source.files, workers)
    # DALI's file list is line-based; a newline inside a name cannot be listed.
    probes = [Probe("newline in file name") if "\n" in f or "\r" in f else p for f, p in zip(source.files, probes)]
    skipped = [{"path": f, "error": p.error} for f, p in zip(source.files, probes) if p.error]
    if strict and skipped:
        raise PrepError(f"unreadable image {source.root / skipped[0]['path']}: {skipped[0]['error']}"
                        + (f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""))
    good = [i for i, p in enumerate(probes) if p.error is None]
    if not good:
        raise PrepError(f"no readable images in {source.root}")
    source, probes = source.take(np.asarray(good)), [probes[i] for i in good]

    write_text_atomic(paths.file_list, "".join(f"{f} {int(y)}\n" for f, y in zip(source.files, source.labels)))
    write_json_atomic(paths.class_index, source.classes)
    outputs = [paths.file_list, paths.class_index]
    shards: dict[str, Any] | None = None
    if settings.shards:
        if settings.shards > len(source):
            raise PrepError(f"--shards {settings.shards} is more than the {len(source)} images")
        shards = _write_shards(paths, source, probes, settings, workers)
        outputs += sorted(paths.shard_dir.glob("shard-*"))

    meta: dict[str, Any] = {
        "format": "dali",
        "complete": True,
        "settings": recorded,
        "file_root": str(source.root),
        "file_list": paths.file_list.name,
        "class_index": paths.class_index.name,
        "num_samples": len(source),
        "classes": source.classes,
        "counts_per_class": source.counts_per_class(),
        "skipped": skipped,
        "not_rgb_jpeg": [{"path": f, "found": p.describe()} for f, p in zip(source.files, probes) if not p.is_rgb_jpeg],
        "shards": shards,
        "seconds": round(time.time() - t0, 2),
        "files": file_sizes(outputs, paths.folder),
        **provenance(),
    }
    write_json_atomic(paths.sidecar, meta)
    log.info("wrote %s (%d images, %d skipped, %.1f s)", paths.file_list, len(source), len(skipped), meta["seconds"])
    if verify:
        from data_prep.dali_verify import verify_outputs

        verify_outputs(paths)
    return paths

