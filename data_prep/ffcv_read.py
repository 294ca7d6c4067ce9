"""Reading a ``.beton`` back sample by sample, without FFCV's loader, to check what was written.

FFCV's loader only returns crops of variable-size images; this reads the stored bytes themselves:
a sample's ``data_ptr`` is a file offset and the allocation table gives the size of each block.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator

import numpy as np
from PIL import Image

from data_prep.images import read_rgb
from data_prep.sources import PrepError, Source

log = logging.getLogger("data_prep")

_JPEG, _RAW = 0, 1  # FFCV's RGBImageField modes


def _reader(beton: str | os.PathLike):
    """FFCV's Reader of ``beton``; a file it cannot parse is a PrepError naming it."""
    from ffcv.reader import Reader

    try:
        return Reader(str(beton))
    except Exception as e:  # noqa: BLE001 - whatever the parser trips on, the file is damaged
        raise PrepError(f"{beton} cannot be read as an FFCV file ({type(e).__name__}: {e}); delete it to rebuild") \
            from e


def field_column(reader, name: str) -> np.ndarray:
    """The metadata column of field ``name`` (FFCV stores the columns unnamed, in field order)."""
    if name not in reader.field_names:
        raise PrepError(f"{reader.file_name} has fields {reader.field_names}; expected {name!r}")
    return reader.metadata[reader.metadata.dtype.names[reader.field_names.index(name)]]


def stored_modes(beton: str | os.PathLike) -> dict[str, int]:
    """How many images of ``beton`` are stored as JPEG and how many raw, after checking that every
    sample's data lies inside the file (a write cut short by a full disk may raise no error)."""
    reader = _reader(beton)
    table = reader.alloc_table
    end = int((table["ptr"] + table["size"]).max()) if len(table) else 0
    size = os.path.getsize(beton)
    if end > size or len(table) < reader.num_samples:
        raise PrepError(f"{beton} is incomplete: its samples need {end} bytes, the file has {size}")
    modes = field_column(reader, "image")["mode"]
    return {"jpeg": int((modes == _JPEG).sum()), "raw": int((modes == _RAW).sum())}


def ffcv_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """The JPEG bytes FFCV's RGBImageField stores for ``rgb`` (uint8 (H, W, 3) RGB) at ``quality``:
    OpenCV's encoder on the BGR image."""
    import cv2

    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [int(cv2.IMWRITE_JPEG_QUALITY), quality])
    if not ok:
        raise PrepError("OpenCV could not encode a JPEG")
    return data.tobytes()


def stored_samples(beton: str | os.PathLike) -> Iterator[tuple[np.ndarray, int, str]]:
    """Yields ``(uint8 (H, W, 3) RGB image, label, "raw" | "jpeg")`` for every sample in file order.

    JPEG samples are decoded with PIL (FFCV's own decoder may round differently by a level).
    """
    for img, label, mode, _ in _stored(beton):
        yield img, label, mode


def _stored(beton: str | os.PathLike) -> Iterator[tuple[np.ndarray, int, str, bytes]]:
    """``stored_samples`` with the stored bytes of each JPEG sample (empty for raw ones)."""
    reader = _reader(beton)
    images, labels = field_column(reader, "image"), field_column(reader, "label")
    table = np.sort(reader.alloc_table, order="ptr")
    ptrs, sizes = table["ptr"], table["size"]
    data = np.memmap(beton, dtype=np.uint8, mode="r")
    for img, label in zip(images, labels):
        ptr = int(img["data_ptr"])
        blob = data[ptr : ptr + int(sizes[np.searchsorted(ptrs, ptr)])]
        h, w = int(img["height"]), int(img["width"])
        if img["mode"] == _RAW:
            yield np.array(blob[: h * w * 3]).reshape(h, w, 3), int(label), "raw", b""
        else:
            with Image.open(io.BytesIO(blob.tobytes())) as im:
                yield np.asarray(im.convert("RGB")), int(label), "jpeg", blob.tobytes()


def verify_beton(beton: str | os.PathLike, source: Source, jpeg_quality: int) -> None:
    """Checks ``beton`` against the (already filtered) ``source`` it was written from.

    Same count and labels; every image decodes; an image stored at its own size is its source's
    pixels (raw) or exactly the JPEG that FFCV makes of them at ``jpeg_quality``; a shrunk one
    (``--max-res``) only has to decode. Raises PrepError naming the first mismatch.
    """
    n = 0
    try:
        for i, (img, label, mode, blob) in enumerate(_stored(beton)):
            if i >= len(source):
                break
            n += 1
            if label != int(source.labels[i]):
                raise PrepError(f"{beton}: sample {i} ({source.name_of(i)}) has label {label}, "
                                f"expected {source.labels[i]}")
            ref = source.arrays[i] if source.arrays is not None else read_rgb(source.root / source.files[i])
            if img.shape != ref.shape:
                continue  # shrunk by --max-res; only the decodability is checked
            if mode == "raw" and not np.array_equal(img, ref):
                err = np.abs(img.astype(np.int16) - ref).mean()
                raise PrepError(f"{beton}: sample {i} ({source.name_of(i)}) differs from its source "
                                f"(raw, mean abs error {err:.2f})")
            if mode == "jpeg" and blob != ffcv_jpeg(ref, jpeg_quality):
                raise PrepError(f"{beton}: sample {i} ({source.name_of(i)}) is not the JPEG of its source "
                                f"at quality {jpeg_quality}")
    except PrepError:
        raise
    except Exception as e:  # noqa: BLE001 - a damaged file fails in many ways; each means "not verified"
        raise PrepError(f"{beton}: sample {n} cannot be read back ({type(e).__name__}: {e})") from e
    total = int(_reader(beton).num_samples)
    if n != len(source) or total != len(source):
        raise PrepError(f"{beton} holds {total} samples, expected {len(source)}")
    log.info("verified %s: %d samples", beton, total)
