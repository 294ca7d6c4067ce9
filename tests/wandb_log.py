"""Read an offline wandb run's ``run-<id>.wandb`` file in tests: the records wandb will upload on sync.

The file is wandb's record log (the LevelDB log layout: 32 KiB blocks, each record chunk with a 7-byte
header of crc32, length and chunk type); each record is a ``wandb_internal_pb2.Record``.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

_BLOCK, _HEADER = 32 * 1024, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> Iterator[bytes]:
    pos, record = _HEADER, b""  # the file starts with a 7-byte header (":W&B", magic, version)
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        body = data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind == _FULL:
            yield body
        elif kind == _FIRST:
            record = body
        elif kind == _MIDDLE:
            record += body
        elif kind == _LAST:
            yield record + body
        else:
            return


def records(run_file: Path) -> Iterator[tuple[str, Any]]:
    """(record type, the record's message) of every record in the file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in _chunks(Path(run_file).read_bytes()):
        r = pb.Record()
        r.ParseFromString(raw)
        kind = r.WhichOneof("record_type")
        yield kind, getattr(r, kind)


def segment(offline_dir: Path) -> dict[str, Any]:
    """One offline segment: its run record (id, group, job_type), logged rows, metric definitions, summary."""
    run_file, = Path(offline_dir).glob("run-*.wandb")
    out: dict[str, Any] = {"run": None, "rows": [], "metrics": {}, "summary": {}, "artifacts": []}
    for kind, msg in records(run_file):
        if kind == "run" and out["run"] is None:
            out["run"] = msg
        elif kind == "history":
            out["rows"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in msg.item})
        elif kind == "metric":
            out["metrics"][msg.name or msg.glob_name] = msg.step_metric
        elif kind == "summary":
            out["summary"].update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in msg.update})
        elif kind == "artifact":
            out["artifacts"].append(msg.name)
    return out
