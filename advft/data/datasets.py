"""Map-style datasets behind one contract, and ``build_dataset`` to pick one by name.

Contract (every dataset here, and what the loaders in ``loader.py`` rely on)
- ``ds[i]`` is ``(uint8 tensor (3, res, res), int label)``: the *evaluation view* at the requested
  resolution. Pixels are never normalised.
- ``ds.classes`` lists the class names; ``ds.resolution`` is res.
- Optionally ``ds.full_image(i)`` returns ``(uint8 tensor (3, H, W), int label)``, the whole decoded
  image at its native size. Random-resized-crop training reads this, so that its crops can reach
  the image borders which the centre-cropped evaluation view has cut off. Datasets stored at their
  final resolution (synthetic, CIFAR-10) do not need it.

Formats
- ``synthetic``: ``SyntheticShapes``; ``path`` is its cache folder ("" = the default cache).
- ``digits``: ``Digits``, the handwritten digits inside scikit-learn, upsampled to res; split "train"
  (1200) or "test" (597), fixed by the seed; ``path`` is unused.
- ``cifar10``: the python pickles of CIFAR-10 (``<path>/cifar-10-batches-py/``), as torchvision
  downloads them; split "train" (50 000) or "test" (10 000). At res != 32 images are resized.
- ``folder``: ImageNet layout ``<path>/<split>/<class>/<image>``; any format PIL reads, converted
  to RGB. Evaluation view: shorter side to round(res / 0.875), centre crop res.
"""

from __future__ import annotations

import codecs
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from advft.data.digits import SPLITS as DIGITS_SPLITS
from advft.data.digits import Digits
from advft.data.folder_scan import IMAGE_EXTENSIONS, scan_split
from advft.data.synthetic import SPLITS as SYNTHETIC_SPLITS
from advft.data.synthetic import SyntheticShapes
from advft.data.transforms import center_crop, resize

FORMATS_BUILTIN = ("synthetic", "digits", "cifar10", "folder")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad data settings or a data folder that is missing or malformed; the message names the path."""


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only.

    The CIFAR-10 batches are pickles, and a pickle can run arbitrary code when loaded. These files
    need nothing but dicts, lists, strings and uint8 arrays, so every other global is refused.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
        ("numpy._core.multiarray", "_reconstruct"): np.empty(0).__reduce__()[0],
        ("numpy.core.numeric", "_frombuffer"): np.empty(1).__reduce_ex__(5)[0],
        ("numpy._core.numeric", "_frombuffer"): np.empty(1).__reduce_ex__(5)[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 writes bytes into protocol-2 pickles as codecs.encode(str, "latin1"): data only.
        ("_codecs", "encode"): codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch") from None


def _read_pickle(path: Path) -> Any:
    with open(path, "rb") as f:
        # The batches were written by Python 2; latin1 maps its byte strings 1:1.
        return _ArrayUnpickler(f, encoding="latin1").load()


class CIFAR10(Dataset):
    """CIFAR-10 from torchvision's on-disk format, held in memory as uint8 (N, 32, 32, 3)."""

    def __init__(self, path: str | os.PathLike, split: str, *, resolution: int = 32, download: bool = False) -> None:
        if split not in CIFAR10_SPLITS:
            raise DataError(f"CIFAR-10 split {split!r} is not one of {tuple(CIFAR10_SPLITS)}")
        root = Path(path)
        if download:
            # torchvision fetches the archive and checks its md5; reading stays ours (below).
            import torchvision

            torchvision.datasets.CIFAR10(root, train=split == "train", download=True)
        # Accept both the download root and the batches folder itself.
        folder = root if (root / "batches.meta").is_file() else root / CIFAR10_DIR
        files = [folder / name for name in CIFAR10_SPLITS[split]] + [folder / "batches.meta"]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DataError(
                f"CIFAR-10 not found at {root}: {folder} lacks {', '.join(missing)}; "
                f"pass download=True or unpack {CIFAR10_URL} there"
            )
        images, labels = [], []
        try:
            for f in files[:-1]:
                batch = _read_pickle(f)
                images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                labels.extend(batch["labels"])
            meta = _read_pickle(files[-1])
        except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as e:
            reason = f"{type(e).__name__}: {e}"
            raise DataError(f"CIFAR-10 at {folder} is corrupted ({reason}); delete it and download again") from e
        self.images: np.ndarray = np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1))
        self.labels: np.ndarray = np.asarray(labels, dtype=np.int64)
        self.classes: list[str] = list(meta["label_names"])
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.labels)

    def full_image(self, i: int) -> tuple[torch.Tensor, int]:
        """The native 32 x 32 image."""
        return torch.from_numpy(self.images[i]).permute(2, 0, 1).contiguous(), int(self.labels[i])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.full_image(i)
        return resize(img, (self.resolution, self.resolution)), label


def _decode_rgb(path: str) -> Image.Image:
    with Image.open(path) as im:
        # convert() decodes and copies, so the file can be closed; grayscale, CMYK, palette and
        # RGBA images all become 3-channel RGB.
        return im.convert("RGB")


class ImageFolderDataset(Dataset):
    """``<root>/<split>/<class>/<image>`` (ImageNet layout); labels are the sorted class folders. The files
    are those ``python -m data_prep`` converts (``folder_scan``: each real folder and file once, so a link
    loop cannot multiply the data; only regular files)."""

    def __init__(self, root: str | os.PathLike, split: str, *, resolution: int) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist; expected the layout {root}/<split>/<class>/<image>")
        split_dir = root / split
        if not split_dir.is_dir():
            present = sorted(p.name for p in root.iterdir() if p.is_dir())
            raise DataError(f"split folder {split_dir} does not exist; folders under {root}: {present or 'none'}")
        scan = scan_split(split_dir)
        if not scan.files:
            raise DataError(f"no images under {split_dir}/<class>/ (extensions {', '.join(IMAGE_EXTENSIONS)})")
        if scan.excluded:
            first = scan.excluded[0]
            log.warning("%s: %d entries skipped (links to what was already read, special files), e.g. %s: %s",
                        split_dir, len(scan.excluded), first["path"], first["error"])
        self.root = split_dir
        self.classes: list[str] = scan.classes
        self.samples: list[tuple[str, int]] = [(str(split_dir / f), int(y)) for f, y in zip(scan.files, scan.labels)]
        self.labels = scan.labels
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.samples)

    def full_image(self, i: int) -> tuple[torch.Tensor, int]:
        """The decoded image at its own size, uint8 (3, H, W): a channels-last view of PIL's H x W x 3
        pixels (no copy; ``transforms.resize`` is fastest on this layout)."""
        file, label = self.samples[i]
        array = np.array(_decode_rgb(file))  # a writable copy: torch refuses read-only buffers
        return torch.from_numpy(array).permute(2, 0, 1), label

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.full_image(i)
        return center_crop(img, self.resolution), label


def build_dataset(
    fmt: str,
    path: str,
    split: str,
    *,
    resolution: int,
    synthetic_size: int = 10000,
    seed: int = 0,
    download: bool = False,
) -> Dataset:
    """The dataset ``fmt`` (one of FORMATS_BUILTIN) at ``path``, split ``split``, at ``resolution``.

    ``seed`` picks the synthetic images and the digits split, ``synthetic_size`` only affects the synthetic
    set, ``download`` only CIFAR-10 (it is never implied). Raises DataError with one line naming the bad
    value or path.
    """
    if resolution < 8:
        raise DataError(f"resolution must be >= 8 pixels, got {resolution}")
    if fmt == "synthetic":
        if split not in SYNTHETIC_SPLITS:
            raise DataError(f"synthetic split {split!r} is not one of {SYNTHETIC_SPLITS}")
        if synthetic_size < 1:
            raise DataError(f"synthetic_size must be >= 1, got {synthetic_size}")
        return SyntheticShapes(split, synthetic_size, resolution, seed, cache_dir=path or None)
    if fmt == "digits":
        if split not in DIGITS_SPLITS:
            raise DataError(f"digits split {split!r} is not one of {DIGITS_SPLITS}")
        try:
            return Digits(split, resolution, seed)
        except ImportError as e:  # scikit-learn is missing: the message says how to install it
            raise DataError(str(e)) from None
    if fmt == "cifar10":
        if not path:
            raise DataError(f"cifar10 needs a data path (the folder holding {CIFAR10_DIR}/)")
        return CIFAR10(path, split, resolution=resolution, download=download)
    if fmt == "folder":
        if not path:
            raise DataError("folder needs a data path (the folder holding <split>/<class>/<image>)")
        return ImageFolderDataset(path, split, resolution=resolution)
    raise DataError(f"unknown data format {fmt!r}; built-in formats are {FORMATS_BUILTIN}")
