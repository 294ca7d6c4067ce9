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
# A stored JPEG must stay this close to its source (mean absolute error in 1/255 units) to pass
# --verify; generous enough for quality 50, far below what a swapped channel order gives.
VERIFY_JPEG_MAE = 8.0


def field_column(reader, name: str) -> np.ndarray:
    """The metadata column of field ``name`` (FFCV stores the columns unnamed, in field order)."""
    if name not in reader.field_names:
        raise PrepError(f"{reader.file_name} has fields {reader.field_names}; expected {name!r}")
    return reader.metadata[reader.metadata.dtype.names[reader.field_names.index(name)]]


def stored_modes(beton: str | os.PathLike) -> dict[str, int]:
    """How many images of ``beton`` are stored as JPEG and how many raw."""
    from ffcv.reader import Reader

    modes = field_column(Reader(str(beton)), "image")["mode"]
    return {"jpeg": int((modes == _JPEG).sum()), "raw": int((modes == _RAW).sum())}


def stored_samples(beton: str | os.PathLike) -> Iterator[tuple[np.ndarray, int, str]]:
    """Yields ``(uint8 (H, W, 3) RGB image, label, "raw" | "jpeg")`` for every sample in file order.

    JPEG samples are decoded with PIL (FFCV's own decoder may round differently by a level).
    """
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    images, labels = field_column(reader, "image"), field_column(reader, "label")
    table = np.sort(reader.alloc_table, order="ptr")
    ptrs, sizes = table["ptr"], table["size"]
    data = np.memmap(beton, dtype=np.uint8, mode="r")
    for img, label in zip(images, labels):
        ptr = int(img["data_ptr"])
        blob = data[ptr : ptr + int(sizes[np.searchsorted(ptrs, ptr)])]
        h, w = int(img["height"]), int(img["width"])
        if img["mode"] == _RAW:
            yield np.array(blob[: h * w * 3]).reshape(h, w, 3), int(label), "raw"
        else:
            with Image.open(io.BytesIO(blob.tobytes())) as im:
                yield np.asarray(im.convert("RGB")), int(label), "jpeg"


def verify_beton(beton: str | os.PathLike, source: Source) -> None:
    """Checks ``beton`` against the (already filtered) ``source`` it was written from.

    Same count and labels; every image decodes; images stored at their own size are equal to the
    source (raw) or close to it (JPEG). Raises PrepError naming the first mismatch.
    """
    n = 0
    for i, (img, label, mode) in enumerate(stored_samples(beton)):
        if i >= len(source):
            break
        n += 1
        if label != int(source.labels[i]):
            raise PrepError(f"{beton}: sample {i} ({source.name_of(i)}) has label {label}, expected {source.labels[i]}")
        ref = source.arrays[i] if source.arrays is not None else read_rgb(source.root / source.files[i])
        if img.shape != ref.shape:
            continue  # shrunk by --max-res; only the decodability is checked
        err = np.abs(img.astype(np.int16) - ref).mean()
        if (mode == "raw" and err != 0) or err > VERIFY_JPEG_MAE:
            raise PrepError(f"{beton}: sample {i} ({source.name_of(i)}) differs from its source "
                            f"({mode}, mean abs error {err:.2f})")
    from ffcv.reader import Reader

    total = int(Reader(str(beton)).num_samples)
    if n != len(source) or total != len(source):
        raise PrepError(f"{beton} holds {total} samples, expected {len(source)}")
    log.info("verified %s: %d samples", beton, total)
