"""``--verify`` for the DALI inputs: read everything back with DALI itself (CPU pipelines).

Every image of the file list must decode and its label must match the list; with shards, DALI's
webdataset reader must return the same number of samples, in the recorded shuffled order, with
the same labels and image sizes as the file list.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from data_prep.sources import PrepError

if TYPE_CHECKING:  # for the annotation only; dali_prep imports this module
    from data_prep.dali_prep import DALIPaths

log = logging.getLogger("data_prep")
BATCH = 32


def _read_all(make_reader, n: int) -> tuple[list[tuple[int, ...]], list[np.ndarray]]:
    """(decoded image shapes, second outputs) of the first ``n`` samples a CPU pipeline yields."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=BATCH, num_threads=2, device_id=None, prefetch_queue_depth=1)
    def pipe():
        encoded, other = make_reader()
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB), other

    p = pipe()
    p.build()
    shapes: list[tuple[int, ...]] = []
    others: list[np.ndarray] = []
    try:
        while len(shapes) < n:
            images, other = p.run()
            shapes += [tuple(s) for s in images.shape()]
            others += [np.array(other[i]) for i in range(len(other))]
    except RuntimeError as e:
        raise PrepError(f"DALI could not read the data back: {e}") from e
    return shapes[:n], others[:n]


def verify_outputs(paths: DALIPaths, meta: dict[str, Any]) -> None:
    """Reads the outputs named by ``paths`` back with DALI, as ``meta`` (the sidecar's record, written
    after this passes) describes them; raises PrepError at the first mismatch."""
    from nvidia.dali import fn

    root = meta["file_root"]
    lines = paths.file_list.read_text(encoding="utf-8").splitlines()
    labels = np.asarray([int(line.rsplit(" ", 1)[1]) for line in lines])
    n = len(labels)
    shapes, got = _read_all(
        lambda: fn.readers.file(file_list=str(paths.file_list), file_root=root, pad_last_batch=True, name="r"), n)
    got_labels = np.asarray([int(g.reshape(-1)[0]) for g in got])
    if len(shapes) != n or not np.array_equal(got_labels, labels):
        raise PrepError(f"{paths.file_list}: DALI read {len(shapes)} samples or labels that differ from the list")
    shards = meta.get("shards")
    if shards:
        folder = paths.folder / shards["dir"]
        stems = sorted(p.stem for p in folder.glob("shard-*.tar"))
        tars = [str(folder / f"{s}.tar") for s in stems]
        idxs = [str(folder / f"{s}.idx") for s in stems]
        sh_shapes, cls = _read_all(lambda: fn.readers.webdataset(
            paths=tars, index_paths=idxs, ext=["jpg", "cls"], missing_component_behavior="error",
            pad_last_batch=True, name="r"), n)
        order = np.random.default_rng(meta["settings"]["seed"]).permutation(n)
        sh_labels = np.asarray([int(bytes(c.astype(np.uint8)).decode("ascii")) for c in cls])
        if not np.array_equal(sh_labels, labels[order]):
            raise PrepError(f"{folder}: labels in the shards differ from {paths.file_list}")
        if sh_shapes != [shapes[i] for i in order]:
            raise PrepError(f"{folder}: image sizes in the shards differ from the images of {paths.file_list}")
    extra = f", {len(shards['samples_per_shard'])} shards" if shards else ""
    log.info("verified %s: %d samples%s", paths.folder, n, extra)

