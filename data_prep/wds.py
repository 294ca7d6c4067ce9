"""Webdataset tar shards and the index files DALI's ``fn.readers.webdataset`` reads.

A shard is a plain POSIX (ustar) tar whose members are ``<key>.<ext>``; the members of one sample
are adjacent and share the key. The index (format "v1.2", as DALI's ``wds2idx`` tool writes it) has
a header line ``v1.2 <number of samples>`` and then one line per sample listing, for each of its
members, ``<ext> <offset of the member's data in bytes> <size in bytes> <member name>``. With it
DALI can split and shuffle the samples without scanning the tar first.

We know the offsets while writing, so the index is written alongside the tar and never re-scanned.
"""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.outputs import tmp_name

INDEX_VERSION = "v1.2"
_BLOCK = tarfile.BLOCKSIZE  # 512: tar headers and data are padded to whole blocks


@dataclass
class ShardWriter:
    """Writes one shard to a temporary name; ``close()`` renames the tar and its index into place.

    Members get mode 0644, owner 0 and mtime 0, so the same samples always give the same bytes.
    """

    tar_path: Path
    idx_path: Path
    _lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._tmp = tmp_name(self.tar_path)
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)

    def add(self, key: str, components: dict[str, bytes]) -> None:
        """One sample: ``components`` maps extension (no dot) -> the member's bytes."""
        if "." in key or "/" in key:
            raise ValueError(f"webdataset key {key!r} must not contain '.' or '/'")
        parts = []
        for ext, data in components.items():
            name = f"{key}.{ext}"
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            self._tar.addfile(info, io.BytesIO(data))
            # After addfile the archive offset is just past this member's padded data.
            padded = -(-len(data) // _BLOCK) * _BLOCK
            parts.append(f"{ext} {self._tar.offset - padded} {len(data)} {name}")
        self._lines.append(" ".join(parts))

    def __len__(self) -> int:
        return len(self._lines)

    def close(self) -> None:
        self._tar.close()
        tmp_name(self.idx_path).write_text(f"{INDEX_VERSION} {len(self._lines)}\n"
                                           + "".join(line + "\n" for line in self._lines))
        os.replace(self._tmp, self.tar_path)
        os.replace(tmp_name(self.idx_path), self.idx_path)

    def abort(self) -> None:
        """Removes the temporary files; closing may fail again (a full disk), which changes nothing here."""
        with contextlib.suppress(OSError):
            self._tar.close()
        self._tmp.unlink(missing_ok=True)
        tmp_name(self.idx_path).unlink(missing_ok=True)


def shard_names(n: int) -> list[str]:
    """``shard-000000`` ... : the stems of n shards (the tar is ``<stem>.tar``, its index ``<stem>.idx``)."""
    return [f"shard-{i:06d}" for i in range(n)]


def index_sample_count(idx_path: Path) -> int:
    """The sample count in the header of a v1.x index file."""
    with open(idx_path, encoding="utf-8") as f:
        version, count = f.readline().split()
    if not version.startswith("v1."):
        raise ValueError(f"{idx_path}: unknown index version {version!r}")
    return int(count)
