"""Reading source images as RGB, and checking all of them before anything is written.

Every image is decoded once by ``probe`` before conversion: the writers need the final sample count
up front (a ``.beton`` header, a shard index), so unreadable files must be known before writing.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing as mp
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_prep.processes import worker_init


@dataclass(frozen=True)
class Probe:
    """What decoding one file showed: ``error`` is None for a good image.

    ``format`` is what PIL found inside the file (not the extension: ImageNet has PNGs named
    .JPEG), ``mode`` the stored colour mode ("RGB", "L", "CMYK", ...).
    """

    error: str | None
    format: str | None = None
    mode: str | None = None
    width: int = 0
    height: int = 0

    @property
    def is_rgb_jpeg(self) -> bool:
        """A 3-channel JPEG that every decoder (PIL, FFCV, DALI CPU and GPU) reads the same way."""
        return self.error is None and self.format == "JPEG" and self.mode == "RGB"

    def describe(self) -> str:
        return f"{self.mode} {self.format}"


def probe(path: str | os.PathLike) -> Probe:
    """Decode ``path`` fully and report its format, mode and size, or the error; never raises.

    Only a regular file is opened: reading a FIFO would wait forever for a writer.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return Probe("not a regular file (FIFO, socket or device); never opened")
        with Image.open(path) as im:
            fmt, mode, (w, h) = im.format, im.mode, im.size
            if fmt == "JPEG":
                # Decode at 1/8 scale: the whole entropy-coded stream is still read, so truncated or
                # damaged files fail here as in a full decode, at a fraction of the cost.
                im.draft(mode, (max(1, w // 8), max(1, h // 8)))
            im.load()
        return Probe(None, fmt, mode, w, h)
    except Exception as e:  # noqa: BLE001 - any failure means "unreadable"; the message is kept
        return Probe(f"{type(e).__name__}: {e}")


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """The image at ``path`` as a C-contiguous uint8 (H, W, 3) RGB array (grayscale, CMYK, palette
    and alpha images converted by PIL).

    The one rule for transparency, in the writers, the verifiers and advft's folder loader alike:
    PIL's ``convert("RGB")``, which drops the alpha channel (no blending onto a background), as
    torchvision's loader and DALI's and FFCV's decoders do.
    """
    with Image.open(path) as im:
        return np.array(im.convert("RGB"), dtype=np.uint8)  # a writable, contiguous copy


def jpeg_bytes(rgb: np.ndarray, quality: int) -> bytes:
    """``rgb`` (H, W, 3) uint8 as baseline JPEG bytes at ``quality``."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def probe_all(root: Path, files: list[str], workers: int, desc: str = "checking images") -> list[Probe]:
    """``probe`` of every ``root/file`` in order, over ``workers`` processes, with a progress bar."""
    paths = [str(root / f) for f in files]
    parallel = workers > 1 and len(paths) >= 64  # below that, starting processes costs more than it saves
    chunks = max(1, min(64, len(paths) // (4 * max(1, workers))))
    out: list[Probe] = []
    pool_or_none = mp.get_context("fork").Pool(workers, worker_init) if parallel else contextlib.nullcontext()
    with tqdm(total=len(paths), desc=desc, unit="img", mininterval=1.0) as bar, pool_or_none as pool:
        results: Iterable[Probe] = pool.imap(probe, paths, chunksize=chunks) if parallel else map(probe, paths)
        for r in results:
            out.append(r)
            bar.update()
    return out
