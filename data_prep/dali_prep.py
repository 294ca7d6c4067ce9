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

Splitting the work (``slurm/prep_imagenet.sbatch`` does this as a SLURM job array):
1. ``dali SRC OUT`` writes the file list; this decodes every image once (the expensive check).
2. ``dali SRC OUT --shards N --shard-range A:B`` writes shards A..B-1 only, from the file list in
   OUT; any number of these run at once on disjoint ranges. It writes no list and no sidecar.
3. ``dali SRC OUT --shards N`` finds the shards already written and writes only the missing ones
   and the sidecar (the same call on one machine writes all N).
The shards are byte for byte those of a single run. A run reuses the image check recorded in the
sidecar of an earlier complete run in OUT when the split folder is unchanged since (the same files,
sizes and mtimes: ``Source.digest``) and the file list is still the one written. A shard is kept when
its index lists exactly the keys this file list, seed and N put there and its tar is long enough;
a run that had to check the images afresh deletes all shards first, since their keys refer to the
lines of the list it replaces.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.images import Probe, jpeg_bytes, probe_all, read_rgb
from data_prep.outputs import (check_digests, check_writable, file_digests, file_sizes, is_done, provenance, read_json,
                               remove_dead_tmp, write_json_atomic, write_text_atomic)
from data_prep.processes import worker_init
from data_prep.sources import PrepError, Source, resolve
from data_prep.wds import INDEX_VERSION, ShardWriter, shard_names

log = logging.getLogger("data_prep")

REENCODE_QUALITY = 95
_TAR_END = 2 * 512  # a tar ends with two zero blocks after the last member


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


@dataclass(frozen=True)
class _Checked:
    """What checking the source found: ``source`` holds the readable images only, ``skipped`` the
    others ({path, error}), ``not_rgb_jpeg`` maps each readable image that is not a 3-channel JPEG
    to what it is ("<mode> <format>")."""

    source: Source
    skipped: list[dict[str, str]]
    not_rgb_jpeg: dict[str, str]


def _check(source: Source, workers: int) -> _Checked:
    """Decodes every image of ``source`` (see ``images.probe``)."""
    probes = probe_all(source.root, source.files, workers)
    # DALI's file list is line-based; a newline inside a name cannot be listed.
    probes = [Probe("newline in file name") if "\n" in f or "\r" in f else p for f, p in zip(source.files, probes)]
    skipped = [{"path": f, "error": p.error} for f, p in zip(source.files, probes) if p.error]
    good = np.asarray([i for i, p in enumerate(probes) if p.error is None], dtype=np.int64)
    not_rgb = {f: p.describe() for f, p in zip(source.files, probes) if p.error is None and not p.is_rgb_jpeg}
    return _Checked(source.take(good), skipped, not_rgb)


def _list_text(source: Source) -> str:
    return "".join(f"{f} {int(y)}\n" for f, y in zip(source.files, source.labels))


def _earlier_check(paths: DALIPaths, source: Source) -> _Checked | None:
    """The check recorded by an earlier complete run in ``paths.folder``, when its file list is still
    exactly the readable part of ``source`` (same names, order and labels); else None."""
    meta = read_json(paths.sidecar)
    if not meta or not meta.get("complete") or meta.get("file_root") != str(source.root):
        return None
    if meta.get("source_digest") != source.digest:
        return None
    if meta.get("settings", {}).get("split") != paths.split or meta.get("classes") != source.classes:
        return None
    sizes = meta.get("files", {})
    for f in (paths.file_list, paths.class_index):
        if not f.is_file() or sizes.get(f.name) != f.stat().st_size:
            return None
    skipped = list(meta.get("skipped", []))
    bad = {s["path"] for s in skipped}  # also holds source.excluded, which are not in source.files
    readable = source.take(np.asarray([i for i, f in enumerate(source.files) if f not in bad], dtype=np.int64))
    if paths.file_list.read_text(encoding="utf-8") != _list_text(readable):
        return None
    return _Checked(readable, skipped, {d["path"]: d["found"] for d in meta.get("not_rgb_jpeg", [])})


def _key_width(n: int) -> int:
    return max(8, len(str(n - 1)))


# One sample in a shard: (key, absolute source path, label, copy the bytes as they are).
_Sample = tuple[str, str, int, bool]


def _shard_plan(checked: _Checked, settings: DALISettings) -> list[tuple[str, list[_Sample]]]:
    """(stem, samples) of every shard; a pure function of the file list, the seed and the shard count."""
    source = checked.source
    key_width = _key_width(len(source))
    order = np.random.default_rng(settings.seed).permutation(len(source))
    return [
        (stem, [(f"{i:0{key_width}d}", str(source.root / source.files[i]), int(source.labels[i]),
                 source.files[i] not in checked.not_rgb_jpeg) for i in chunk])
        for stem, chunk in zip(shard_names(settings.shards), np.array_split(order, settings.shards))
    ]


def _shard_is_complete(tar: Path, idx: Path, samples: list[_Sample]) -> bool:
    """Whether ``idx`` lists exactly these samples' keys (a .jpg and a .cls each, in order) and
    ``tar`` is long enough to hold all of them."""
    try:
        lines = idx.read_text(encoding="utf-8").splitlines()
        tar_size = tar.stat().st_size
    except OSError:
        return False
    if len(lines) != len(samples) + 1 or lines[0] != f"{INDEX_VERSION} {len(samples)}":
        return False
    end = 0
    for (key, *_), line in zip(samples, lines[1:]):
        f = line.split()  # jpg <offset> <size> <key>.jpg cls <offset> <size> <key>.cls
        if len(f) != 8 or f[3] != f"{key}.jpg" or f[7] != f"{key}.cls":
            return False
        end = max(end, int(f[1]) + int(f[2]), int(f[5]) + int(f[6]))
    return tar_size >= end + _TAR_END


def _write_shard(task: tuple[Path, Path, list[_Sample], int]) -> None:
    """Writes one shard. Runs in a worker process."""
    tar_path, idx_path, samples, cls_width = task
    writer = ShardWriter(tar_path, idx_path)
    try:
        for key, path, label, as_is in samples:
            if as_is:
                with open(path, "rb") as f:
                    data = f.read()
            else:
                data = jpeg_bytes(read_rgb(path), REENCODE_QUALITY)
            writer.add(key, {"jpg": data, "cls": str(label).zfill(cls_width).encode("ascii")})
        writer.close()
    except BaseException:
        writer.abort()
        raise


def _write_shards(paths: DALIPaths, checked: _Checked, settings: DALISettings, workers: int,
                  shard_range: tuple[int, int]) -> dict[str, Any]:
    """Writes the shards in ``shard_range`` that are not already complete; returns the sidecar's
    record of all shards."""
    plan = _shard_plan(checked, settings)
    cls_width = len(str(len(checked.source.classes) - 1))
    paths.shard_dir.mkdir(parents=True, exist_ok=True)
    tasks = []
    for stem, samples in plan[shard_range[0]:shard_range[1]]:
        tar, idx = paths.shard_dir / f"{stem}.tar", paths.shard_dir / f"{stem}.idx"
        if not _shard_is_complete(tar, idx, samples):
            tasks.append((tar, idx, samples, cls_width))
    kept = shard_range[1] - shard_range[0] - len(tasks)
    log.info("writing %d shards to %s (%d of shards %d..%d already complete)", len(tasks), paths.shard_dir,
             kept, shard_range[0], shard_range[1] - 1)
    try:
        if workers > 1 and len(tasks) > 1:
            with mp.get_context("fork").Pool(min(workers, len(tasks)), worker_init) as pool:
                for _ in pool.imap_unordered(_write_shard, tasks):
                    pass
        else:
            for t in tasks:
                _write_shard(t)
    finally:
        remove_dead_tmp(paths.shard_dir)  # of workers stopped mid-shard (a stopped pool ends them with SIGTERM)
    root = checked.source.root
    return {
        "dir": paths.shard_dir.name,
        "count": settings.shards,
        "samples_per_shard": [len(samples) for _, samples in plan],
        "key_digits": _key_width(len(checked.source)),
        "label_digits": cls_width,
        "reencoded_jpeg_quality": REENCODE_QUALITY,
        "reencoded": [os.path.relpath(path, root) for _, samples in plan for _, path, _, as_is in samples if not as_is],
        "written": len(tasks),
        "kept": kept,
    }


def _remove_shards(folder: Path, keep: Collection[str] = ()) -> None:
    """Deletes shard files in ``folder`` not named in ``keep`` (and temporary files of dead writers)."""
    if folder.is_dir():
        remove_dead_tmp(folder)
        for f in folder.glob("shard-*"):
            if f.name not in keep:
                f.unlink()


def _verify(paths: DALIPaths, meta: dict[str, Any]) -> None:
    """Reads the outputs back with DALI; a failure removes the sidecar, so they no longer count as done."""
    from data_prep.dali_verify import verify_outputs

    try:
        verify_outputs(paths, meta)
    except PrepError:
        paths.sidecar.unlink(missing_ok=True)
        raise


def _check_shard_range(shard_range: tuple[int, int], shards: int) -> None:
    start, end = shard_range
    if not shards:
        raise PrepError("--shard-range needs --shards N (the total number of shards)")
    if not 0 <= start < end <= shards:
        raise PrepError(f"--shard-range {start}:{end} must satisfy 0 <= START < END <= --shards {shards}")


def prepare(
    src: str | os.PathLike,
    out: str | os.PathLike,
    settings: DALISettings,
    *,
    workers: int = 0,
    strict: bool = False,
    verify: bool = False,
    shard_range: tuple[int, int] | None = None,
) -> DALIPaths:
    """Write the DALI inputs of ``settings.split`` into folder ``out`` (skipped when already done).

    With ``shard_range=(start, end)``: write only shards start..end-1 of ``settings.shards``, from the
    file list an earlier run left in ``out`` (see the module docstring); no list, no sidecar, no verify.
    """
    workers = workers or os.cpu_count() or 1
    paths = DALIPaths(Path(out).expanduser().resolve(), settings.split)
    if paths.folder.suffix in (".txt", ".json", ".tar", ".beton"):
        raise PrepError(f"OUT must be a folder for the DALI inputs, got the file name {paths.folder}")
    if shard_range is not None:
        _check_shard_range(shard_range, settings.shards)
        if verify:
            raise PrepError("--verify reads back the finished output: give it to the final run without --shard-range")
    check_writable(paths.folder, folders=(paths.shard_dir,), files=(paths.file_list, paths.class_index, paths.sidecar))
    source = resolve(src, settings.split)
    if source.kind != "folder":
        raise PrepError(f"{source.root} is a CIFAR-10 root; DALI reads image files. Convert it with "
                        "`python -m data_prep ffcv` or use the built-in cifar10 loader")
    recorded = {**asdict(settings), "source": str(source.root)}
    if shard_range is None and is_done(paths.sidecar, recorded, source.digest):
        if not verify:
            log.info("skipped: %s already holds these settings (delete %s to rebuild)", paths.folder, paths.sidecar)
            return paths
        log.info("%s already holds these settings; verifying them", paths.folder)
        check_digests(paths.sidecar)
        _verify(paths, read_json(paths.sidecar) or {})
        return paths
    remove_dead_tmp(paths.folder)
    remove_dead_tmp(paths.shard_dir)
    t0 = time.time()
    checked = _earlier_check(paths, source)
    if shard_range is not None:
        if checked is None:
            raise PrepError(f"--shard-range writes shards from the file list in {paths.folder}, which is missing "
                            f"or does not match {source.root} now; write it first with "
                            f"`python -m data_prep dali {src} {out} --split {settings.split}`")
        if len(checked.source) < settings.shards:
            raise PrepError(f"--shards {settings.shards} is more than the {len(checked.source)} images")
        shards = _write_shards(paths, checked, settings, workers, shard_range)
        log.info("wrote shards %d..%d: %d written, %d already complete (%.1f s)", shard_range[0],
                 shard_range[1] - 1, shards["written"], shards["kept"], time.time() - t0)
        return paths

    fresh = checked is None
    if checked is None:
        checked = _check(source, workers)
    else:
        log.info("reusing the image check of %s (%d images, the same files)", paths.sidecar, len(checked.source))
    skipped = source.excluded + checked.skipped if fresh else checked.skipped  # a reused check holds both
    excluded = {e["path"] for e in source.excluded}
    unreadable = [s for s in skipped if s["path"] not in excluded]
    if strict and unreadable:
        raise PrepError(f"unreadable image {source.root / unreadable[0]['path']}: {unreadable[0]['error']}"
                        + (f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""))
    if not len(checked.source):
        raise PrepError(f"no readable images in {source.root}")
    if settings.shards > len(checked.source):
        raise PrepError(f"--shards {settings.shards} is more than the {len(checked.source)} images")
    paths.folder.mkdir(parents=True, exist_ok=True)
    paths.sidecar.unlink(missing_ok=True)  # the outputs below change; "complete" must not linger
    if fresh:
        # Shard keys are line numbers of the list being replaced: no shard of it may be kept.
        _remove_shards(paths.shard_dir)
        write_text_atomic(paths.file_list, _list_text(checked.source))
        write_json_atomic(paths.class_index, checked.source.classes)
    outputs = [paths.file_list, paths.class_index]
    shards: dict[str, Any] | None = None
    if settings.shards:
        shards = _write_shards(paths, checked, settings, workers, (0, settings.shards))
        # Shards of an earlier run with more shards would otherwise be read as part of this one.
        _remove_shards(paths.shard_dir, {f"{s}.{e}" for s in shard_names(settings.shards) for e in ("tar", "idx")})
        outputs += sorted(paths.shard_dir.glob("shard-*"))

    readable = checked.source
    meta: dict[str, Any] = {
        "format": "dali",
        "complete": True,
        "settings": recorded,
        "source_digest": source.digest,
        "file_root": str(source.root),
        "file_list": paths.file_list.name,
        "class_index": paths.class_index.name,
        "num_samples": len(readable),
        "classes": readable.classes,
        "counts_per_class": readable.counts_per_class(),
        "skipped": skipped,
        "not_rgb_jpeg": [{"path": f, "found": found} for f, found in checked.not_rgb_jpeg.items()],
        "shards": shards,
        "seconds": round(time.time() - t0, 2),
        "files": file_sizes(outputs, paths.folder),
        "sha256": file_digests(outputs, paths.folder),
        **provenance(),
    }
    log.info("wrote %s (%d images, %d skipped, %.1f s)", paths.file_list, len(readable), len(skipped), meta["seconds"])
    if verify:
        _verify(paths, meta)
    write_json_atomic(paths.sidecar, meta)
    return paths
