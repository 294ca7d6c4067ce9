"""ImageFolder tree or CIFAR-10 root -> one FFCV ``.beton`` (fields ``image``: RGBImageField,
``label``: IntField) with a JSON sidecar.

Naming: when OUT is a folder the file is ``<split>_<max-res>_<compress-prob>_<quality>[_<mode>][_sub<N>-seed<S>].beton``
(``train_500_0.50_90.beton``), so files made with different settings never collide and a listing
says what each one holds. The write mode is named only when it is not the default.

Stored pixels are uint8 RGB exactly as PIL decodes the source (``raw``), or JPEG re-encodings of
them (``jpg``; ``proportion``: a random share ``compress-prob`` of the images; ``smart``: the images
whose raw size exceeds ``smart-threshold`` bytes). ``max-res`` shrinks images whose longer side
exceeds it (OpenCV INTER_AREA, inside FFCV); 0 keeps every image at its own size.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.ffcv_read import stored_modes, verify_beton
from data_prep.images import probe_all, read_rgb
from data_prep.ffcv_write import write_beton
from data_prep.outputs import (check_digests, check_writable, file_digests, file_sizes, is_done, provenance, read_json,
                               remove_dead_tmp, tmp_name, write_json_atomic)
from data_prep.sources import PrepError, Source, resolve, subset_indices

log = logging.getLogger("data_prep")

WRITE_MODES = ("raw", "jpg", "proportion", "smart")
DEFAULT_WRITE_MODE = "proportion"


@dataclass(frozen=True)
class FFCVSettings:
    """Everything that decides the bytes of the ``.beton`` (and so its name)."""

    split: str = "train"
    max_res: int = 500
    compress_prob: float = 0.5
    jpeg_quality: int = 90
    write_mode: str = DEFAULT_WRITE_MODE
    smart_threshold: int = 256 * 1024
    subset: int = 0  # 0 = all images
    seed: int = 0  # of the subset permutation

    def __post_init__(self) -> None:
        if self.write_mode not in WRITE_MODES:
            raise PrepError(f"--write-mode {self.write_mode!r} is not one of {WRITE_MODES}")
        if self.max_res < 0:
            raise PrepError(f"--max-res must be >= 0 (0 = keep sizes), got {self.max_res}")
        if not 0.0 <= self.compress_prob <= 1.0:
            raise PrepError(f"--compress-prob must be in [0, 1], got {self.compress_prob}")
        if not 1 <= self.jpeg_quality <= 100:
            raise PrepError(f"--jpeg-quality must be in [1, 100], got {self.jpeg_quality}")
        if self.subset < 0:
            raise PrepError(f"--subset must be >= 0 (0 = all), got {self.subset}")

    def file_stem(self) -> str:
        res = str(self.max_res) if self.max_res else "full"
        stem = f"{self.split}_{res}_{self.compress_prob:.2f}_{self.jpeg_quality}"
        if self.write_mode == "smart":
            stem += f"_smart{self.smart_threshold}"
        elif self.write_mode != DEFAULT_WRITE_MODE:
            stem += f"_{self.write_mode}"
        if self.subset:
            stem += f"_sub{self.subset}-seed{self.seed}"
        return stem


class _WriterDataset:
    """What FFCV's writer indexes: ``ds[i] = (uint8 (H, W, 3) RGB array, int label)``.

    It runs inside FFCV's writer processes. A file that passed the check and fails now (changed on
    disk meanwhile) is recorded in ``failures`` and stored as one black pixel, so the write goes on
    and the error names every such file; ``convert`` then discards the output.
    """

    def __init__(self, source: Source, failures: Path) -> None:
        self.source, self.failures = source, failures

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        src = self.source
        label = int(src.labels[i])
        if src.arrays is not None:
            return src.arrays[i], label
        try:
            return read_rgb(src.root / src.files[i]), label
        except Exception as e:  # noqa: BLE001 - see the class docstring
            with open(self.failures, "a", encoding="utf-8") as f:
                f.write(f"{src.files[i]}\t{type(e).__name__}: {e}\n")
            return np.zeros((1, 1, 3), np.uint8), label


def output_paths(out: str | os.PathLike, settings: FFCVSettings) -> tuple[Path, Path]:
    """(beton, sidecar): OUT itself when it ends in .beton, else a settings-named file in folder OUT."""
    out = Path(out).expanduser().resolve()
    beton = out if out.suffix == ".beton" else out / f"{settings.file_stem()}.beton"
    return beton, beton.with_suffix(".json")


def _check_images(source: Source, workers: int, strict: bool) -> tuple[np.ndarray, list[dict], list[dict]]:
    """(indices of good images, skipped [{path, error}], converted [{path, found}]) of a folder source."""
    probes = probe_all(source.root, source.files, workers)
    skipped = [{"path": f, "error": p.error} for f, p in zip(source.files, probes) if p.error]
    if strict and skipped:
        first = skipped[0]
        raise PrepError(f"unreadable image {source.root / first['path']}: {first['error']}"
                        + (f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""))
    converted = [{"path": f, "found": p.describe()} for f, p in zip(source.files, probes)
                 if p.error is None and (p.mode != "RGB" or not _extension_matches(f, p.format))]
    good = np.asarray([i for i, p in enumerate(probes) if p.error is None], dtype=np.int64)
    return good, skipped, converted


def _extension_matches(name: str, fmt: str | None) -> bool:
    ext = name.rsplit(".", 1)[-1].lower()
    return {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "tif": "TIFF", "tiff": "TIFF"}.get(ext, fmt) == fmt


def _readable(source: Source, skipped: list[dict]) -> Source:
    """``source`` without the images an earlier run recorded as skipped."""
    bad = {s["path"] for s in skipped}
    return source.take(np.asarray([i for i, f in enumerate(source.files) if f not in bad], dtype=np.int64))


def _verify(beton: Path, sidecar: Path, source: Source, settings: FFCVSettings) -> None:
    """``verify_beton``; a failure removes the sidecar, so the output no longer counts as done."""
    try:
        verify_beton(beton, source, settings.jpeg_quality)
    except PrepError:
        sidecar.unlink(missing_ok=True)
        raise


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike,
    settings: FFCVSettings,
    *,
    workers: int = 0,
    strict: bool = False,
    verify: bool = False,
) -> Path:
    """Write the ``.beton`` for ``settings`` (skipped when a complete one made from the source as it is
    now exists; with ``verify`` that one is checked again); returns its path. The sidecar is written
    last, after the verification passed."""
    beton, sidecar = output_paths(out, settings)
    check_writable(beton.parent, files=(beton, sidecar))
    try:
        from ffcv.fields import IntField, RGBImageField
    except ImportError as e:
        raise PrepError(f"FFCV is not installed ({e}); run: bash scripts/install_extras.sh") from e
    workers = workers or os.cpu_count() or 1
    source = resolve(src, settings.split)
    recorded = {**asdict(settings), "source": str(source.root)}
    if settings.subset:
        source = source.take(subset_indices(len(source), settings.subset, settings.seed))
    if is_done(sidecar, recorded, source.digest):
        if not verify:
            log.info("skipped: %s already holds these settings (delete it to rebuild)", beton)
            return beton
        log.info("%s already holds these settings; verifying it", beton)
        check_digests(sidecar)
        _verify(beton, sidecar, _readable(source, (read_json(sidecar) or {}).get("skipped", [])), settings)
        return beton
    beton.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_tmp(beton.parent)
    sidecar.unlink(missing_ok=True)  # an older file of this name is about to be replaced
    t0 = time.time()
    skipped: list[dict] = list(source.excluded)
    converted: list[dict] = []
    if source.kind == "folder":
        good, bad, converted = _check_images(source, workers, strict)
        skipped += bad
        source = source.take(good)
    if len(source) == 0:
        raise PrepError(f"no readable images in {source.root}")

    tmp, failures = tmp_name(beton), tmp_name(beton.with_suffix(".failures"))
    failures.unlink(missing_ok=True)
    fields = {
        "image": RGBImageField(
            write_mode=settings.write_mode,
            max_resolution=settings.max_res or None,
            smart_threshold=settings.smart_threshold,
            jpeg_quality=settings.jpeg_quality,
            compress_probability=settings.compress_prob,
        ),
        "label": IntField(),
    }
    try:
        log.info("writing %d images to %s", len(source), beton)
        write_beton(tmp, fields, _WriterDataset(source, failures), workers,
                    chunksize=max(1, min(100, len(source) // (4 * workers))))
        if failures.exists():
            raise PrepError(f"images changed on disk while converting; run again. {failures.read_text()[:2000]}")
        stored = stored_modes(tmp)
        os.replace(tmp, beton)
    finally:
        tmp.unlink(missing_ok=True)
        failures.unlink(missing_ok=True)

    meta: dict[str, Any] = {
        "format": "ffcv",
        "complete": True,
        "settings": recorded,
        "source_kind": source.kind,
        "source_digest": source.digest,
        "num_samples": len(source),
        "classes": source.classes,
        "counts_per_class": source.counts_per_class(),
        "stored": stored,
        "skipped": skipped,  # unreadable, not regular files, second links to a file or folder
        "converted": converted,  # not RGB, or not the format the extension says; stored as RGB
        "seconds": round(time.time() - t0, 2),
        "files": file_sizes([beton], beton.parent),
        "sha256": file_digests([beton], beton.parent),
        **provenance(),
    }
    log.info("wrote %s (%d images, %d skipped, %.1f s)", beton, len(source), len(skipped), meta["seconds"])
    if verify:
        _verify(beton, sidecar, source, settings)
    write_json_atomic(sidecar, meta)
    return beton
