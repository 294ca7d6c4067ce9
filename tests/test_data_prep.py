"""Tests of data_prep (FFCV .beton, DALI file lists and webdataset shards) and of the FFCV and DALI loaders.

All data is made here: a tiny ImageNet-layout tree (3 classes, varied sizes, one grayscale, one
CMYK, one PNG named .JPEG, one corrupt and one truncated file) and fake CIFAR-10 roots. Tests that
need FFCV or DALI are marked; they skip when the package is missing, and fail instead when
ADVFT_REQUIRE_EXTRAS=1 (CI). Everything runs on the CPU.
"""

from __future__ import annotations

import itertools
import json
import logging
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from advft.data import dali_loader, ffcv_loader
from advft.data.datasets import DataError
from advft.data.loader import ShardedBatchSampler
from advft.data.transforms import RRC_RATIO, center_crop, resize, rrc_scale
from conftest import require_extra
from data_prep.__main__ import main
from data_prep.images import read_rgb
from data_prep.sources import PrepError, resolve, subset_indices

RES = 32
BAD = ("class1/truncated.JPEG", "class2/broken.JPEG")
NOT_RGB_JPEG = {"class0/gray.JPEG": "L JPEG", "class1/cmyk.JPEG": "CMYK JPEG", "class2/png.JPEG": "RGB PNG"}
CONTRAST = "class0/contrast.JPEG"




# FFCV compiles its pipeline with numba; when a loader is garbage-collected, numba's finalizer of
# those functions raises a harmless KeyError that Python reports as "Exception ignored in".
NUMBA_FINALIZER_NOISE = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <finalize object:pytest.PytestUnraisableExceptionWarning")


# ---------------------------------------------------------------- test data


def _smooth(h: int, w: int, j: int, rng: np.random.Generator) -> np.ndarray:
    """A distinct smooth image per j (DALI and the built-in loader then agree within a level)."""
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([xx * 255 / w, yy * 255 / h, 128 + 100 * np.sin(xx / 5 + yy / 7 + 1.3 * j)], -1)
    return np.clip(a + rng.normal(0, 2, a.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``<root>/train/class{0,1,2}/*.JPEG``: 4, 4, 5 plain images of varied sizes plus the odd files (17 readable)."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    sizes = [(40, 56), (64, 44), (37, 70), (50, 50)]
    for c in range(3):
        folder = root / "train" / f"class{c}"
        folder.mkdir(parents=True)
        for k in range(4 + (c == 2)):
            Image.fromarray(_smooth(*sizes[(c + k) % 4], 5 * c + k, rng)).save(folder / f"img{k}.JPEG", quality=95)
    split = root / "train"
    base = _smooth(48, 60, 99, rng)
    Image.fromarray(base).convert("L").save(split / "class0/gray.JPEG", quality=95)
    Image.fromarray(_smooth(60, 46, 98, rng)).convert("CMYK").save(split / "class1/cmyk.JPEG", quality=95)
    Image.fromarray(_smooth(44, 52, 97, rng)).save(split / "class2/png.JPEG", format="PNG")
    contrast = np.zeros((48, 64, 3), np.uint8)
    contrast[:, 32:] = 255  # black | white: a view normalised in the loader would leave [0, 1]
    Image.fromarray(contrast).save(split / CONTRAST, quality=95)
    whole = (split / "class1/img0.JPEG").read_bytes()
    (split / BAD[0]).write_bytes(whole[: len(whole) // 2])
    (split / BAD[1]).write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (split / "class2/notes.txt").write_text("not an image; ignored")
    return root


def _listed(tree: Path) -> list[str]:
    """The readable images of the tree in source order (sorted classes, sorted names)."""
    files = sorted(p.relative_to(tree / "train").as_posix() for p in (tree / "train").rglob("*.JPEG"))
    return [f for f in files if f not in BAD]


def _views(tree: Path, files: list[str]) -> torch.Tensor:
    """The built-in loader's evaluation views (PIL decode + transforms.center_crop) as float [0, 1]."""
    views = [center_crop(torch.from_numpy(read_rgb(tree / "train" / f)).permute(2, 0, 1), RES) for f in files]
    return torch.stack(views).float() / 255


def _fake_cifar(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """torchvision's cifar-10-batches-py: the images spread over 5 train batches; 4 of them as test."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    parts = np.array_split(np.arange(len(images)), 5)
    for b, part in enumerate(parts, 1):
        batch = {"data": rows[part], "labels": labels[part].tolist()}
        (folder / f"data_batch_{b}").write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "test_batch").write_bytes(pickle.dumps({"data": rows[:4], "labels": labels[:4].tolist()}, protocol=2))
    meta = {"label_names": [f"c{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def _id_images(n: int) -> np.ndarray:
    """n 32 x 32 images, each one colour that encodes its index (red = i), inside a white 1-pixel frame.

    The centre survives any crop, resize or flip, so it identifies the sample; the frame shows
    whether a view was cropped.
    """
    images = np.full((n, 32, 32, 3), 255, np.uint8)
    for i in range(n):
        images[i, 1:-1, 1:-1] = (i, 255 - i, 40 + 3 * i)
    return images


def _index_of(x: torch.Tensor) -> list[int]:
    """Sample ids of a batch of ``_id_images`` views: the red level at the centre."""
    h, w = x.shape[-2:]
    return torch.round(x[:, 0, h // 2 - 1 : h // 2 + 1, w // 2 - 1 : w // 2 + 1].mean(dim=(1, 2)) * 255).long().tolist()


def _nearest(x: torch.Tensor, ref: torch.Tensor) -> list[int]:
    """Index of the reference view closest to each image of the batch."""
    d = (x[:, None] - ref[None]).abs().mean(dim=(2, 3, 4))
    return d.argmin(dim=1).tolist()


def _expected(n: int, *, global_batch: int, rank: int, world_size: int, start_step: int, steps: int, seed: int = 0):
    sampler = ShardedBatchSampler(n, global_batch, rank=rank, world_size=world_size, seed=seed, start_step=start_step)
    return [ix for _, _, ix in itertools.islice(sampler, steps)]


# ---------------------------------------------------------------- sources (no extras needed)


def test_sources_resolve_layouts_and_name_bad_paths(tree: Path, tmp_path: Path) -> None:
    a = resolve(tree, "train")  # SRC/<split>/<class>
    b = resolve(tree / "train", "anything")  # SRC/<class>
    assert a.files == b.files and a.classes == ["class0", "class1", "class2"]
    assert "class2/notes.txt" not in a.files and len(a.files) == len(_listed(tree)) + len(BAD)
    with pytest.raises(PrepError, match=str(tmp_path / "nope")):
        resolve(tmp_path / "nope", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrepError, match="cannot read"):
        resolve(tmp_path / "empty", "train")


def test_loaders_import_without_extras_and_say_how_to_install(tmp_path: Path, monkeypatch) -> None:
    some_file = tmp_path / "x.beton"
    some_file.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "ffcv", None)  # makes `import ffcv` fail as if not installed
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    assert not ffcv_loader.available() and not dali_loader.available()
    with pytest.raises(ffcv_loader.FFCVUnavailableError, match="install_extras.sh") as e:
        ffcv_loader.make_ffcv_loader(some_file, global_batch=2)
    assert isinstance(e.value, ImportError)
    with pytest.raises(dali_loader.DALIUnavailableError, match="install_extras.sh") as e:
        dali_loader.make_dali_loader(tmp_path, global_batch=2)
    assert isinstance(e.value, ImportError)


def test_loaders_name_a_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "not_here.beton"
    with pytest.raises(DataError, match=str(missing)):
        ffcv_loader.make_ffcv_loader(missing, global_batch=2)
    with pytest.raises(DataError, match=str(tmp_path / "no_list.txt")):
        dali_loader.make_dali_loader(tmp_path / "no_list.txt", global_batch=2)


# ---------------------------------------------------------------- FFCV


@pytest.fixture(scope="module")
def raw_beton(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_extra("ffcv")  # module fixtures run before the tests' own need_ffcv
    out = tmp_path_factory.mktemp("ffcv")
    assert main(["ffcv", str(tree), str(out), "--write-mode", "raw", "--max-res", "1000", "--workers", "1"]) == 0
    return out / "train_1000_0.50_90_raw.beton"


@pytest.mark.ffcv
def test_ffcv_raw_stores_source_pixels_exactly(need_ffcv, tree: Path, raw_beton: Path) -> None:
    from data_prep.ffcv_read import stored_samples

    files = _listed(tree)
    samples = list(stored_samples(raw_beton))
    assert len(samples) == len(files)
    for f, (img, label, mode) in zip(files, samples):
        assert mode == "raw"
        assert np.array_equal(img, read_rgb(tree / "train" / f)), f
        assert label == int(f[len("class")])
    meta = json.loads(raw_beton.with_suffix(".json").read_text())
    assert meta["complete"] and meta["num_samples"] == len(files)
    assert sorted(s["path"] for s in meta["skipped"]) == sorted(BAD)
    assert {c["path"]: c["found"] for c in meta["converted"]} == NOT_RGB_JPEG
    assert meta["counts_per_class"] == {f"class{c}": sum(f.startswith(f"class{c}/") for f in files) for c in range(3)}
    assert meta["classes"] == ["class0", "class1", "class2"] and meta["settings"]["write_mode"] == "raw"


@pytest.mark.ffcv
def test_ffcv_second_conversion_does_no_work(need_ffcv, tree: Path, raw_beton: Path, caplog) -> None:
    before = raw_beton.stat().st_mtime_ns, raw_beton.with_suffix(".json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="data_prep"):
        assert main(["ffcv", str(tree), str(raw_beton.parent), "--write-mode", "raw", "--max-res", "1000"]) == 0
    assert "skipped" in caplog.text
    assert (raw_beton.stat().st_mtime_ns, raw_beton.with_suffix(".json").stat().st_mtime_ns) == before
    assert sorted(p.name for p in raw_beton.parent.iterdir()) == [raw_beton.name, raw_beton.with_suffix(".json").name]


@pytest.mark.ffcv
def test_ffcv_jpeg_mode_is_close_to_the_source(need_ffcv, tree: Path, tmp_path: Path) -> None:
    from data_prep.ffcv_read import stored_samples

    beton = tmp_path / "q95.beton"  # an explicit file name instead of a folder
    argv = ["ffcv", str(tree), str(beton), "--write-mode", "jpg", "--jpeg-quality", "95", "--max-res", "0",
            "--workers", "1", "--verify"]
    assert main(argv) == 0
    assert json.loads(beton.with_suffix(".json").read_text())["stored"] == {"jpeg": len(_listed(tree)), "raw": 0}
    for f, (img, _, mode) in zip(_listed(tree), stored_samples(beton)):
        ref = read_rgb(tree / "train" / f)
        assert mode == "jpeg" and img.shape == ref.shape
        # Quality 95 of a smooth image; the black|white edge rings most.
        assert np.abs(img.astype(np.int16) - ref).mean() < 3.0, f


@pytest.mark.ffcv
def test_ffcv_strict_fails_naming_the_unreadable_file(need_ffcv, tree: Path, tmp_path: Path, capsys) -> None:
    assert main(["ffcv", str(tree), str(tmp_path), "--write-mode", "raw", "--strict", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert str(tree / "train" / BAD[0]) in err and "truncated" in err
    assert not list(tmp_path.glob("*.beton"))


@pytest.mark.ffcv
def test_ffcv_cifar10_root_converts_with_exact_pixels(need_ffcv, tmp_path: Path) -> None:
    from data_prep.ffcv_read import stored_samples

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 20)
    root = _fake_cifar(tmp_path / "cifar", images, labels)
    assert main(["ffcv", str(root), str(tmp_path / "out"), "--write-mode", "raw", "--workers", "1"]) == 0
    got = list(stored_samples(tmp_path / "out" / "train_500_0.50_90_raw.beton"))
    assert np.array_equal(np.stack([g[0] for g in got]), images)
    assert [g[1] for g in got] == labels.tolist()
    assert main(["ffcv", str(root), str(tmp_path / "out"), "--split", "test", "--write-mode", "raw"]) == 0
    assert len(list(stored_samples(tmp_path / "out" / "test_500_0.50_90_raw.beton"))) == 4
    # --subset: a seeded choice, kept in source order, and named so it never passes for the full set.
    assert main(["ffcv", str(root), str(tmp_path / "out"), "--write-mode", "raw", "--subset", "7", "--seed", "3"]) == 0
    chosen = subset_indices(20, 7, 3)
    assert len(set(chosen)) == 7 and list(chosen) == sorted(chosen)
    got = list(stored_samples(tmp_path / "out" / "train_500_0.50_90_raw_sub7-seed3.beton"))
    assert np.array_equal(np.stack([g[0] for g in got]), images[chosen])


@pytest.mark.ffcv
@NUMBA_FINALIZER_NOISE
def test_ffcv_loader_evaluation_view(need_ffcv, tree: Path, raw_beton: Path) -> None:
    files = _listed(tree)
    batches = list(ffcv_loader.make_ffcv_loader(raw_beton, global_batch=4, train=False, resolution=RES,
                                                num_workers=1))
    assert [len(y) for _, y in batches] == [4, 4, 4, 4, len(files) - 16]  # last partial batch kept
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (len(files), 3, RES, RES)
    assert y.tolist() == [int(f[len("class")]) for f in files]
    assert 0.0 <= x.min() and x.max() <= 1.0
    hi = files.index(CONTRAST)
    assert x[hi].max() > 0.9 and x[hi].min() < 0.1  # [0, 1] pixels, not normalised, not [0, 255]
    # FFCV crops 0.875 of the shorter side then resizes (OpenCV, area); the built-in loader resizes
    # then crops: the same region, slightly different filters.
    err = (x - _views(tree, files)).abs().mean(dim=(1, 2, 3)) * 255
    assert err.max() < 6.0, err


@pytest.mark.ffcv
@NUMBA_FINALIZER_NOISE
def test_ffcv_loader_follows_the_sharding_contract_and_resumes(need_ffcv, tmp_path: Path) -> None:
    n, g, w = 22, 4, 2  # 5 steps per epoch, 2 images dropped per epoch
    images = _id_images(n)
    root = _fake_cifar(tmp_path / "cifar", images, np.arange(n) % 10)
    assert main(["ffcv", str(root), str(tmp_path), "--write-mode", "raw", "--workers", "1"]) == 0
    beton = tmp_path / "train_500_0.50_90_raw.beton"
    steps = 12  # into the third epoch
    seen = {}
    for rank in range(w):
        it = ffcv_loader.make_ffcv_loader(beton, global_batch=g, rank=rank, world_size=w, seed=5, resolution=RES,
                                          num_workers=1, channels_last=True)
        batches = list(itertools.islice(it, steps))
        x, y = batches[0]
        assert x.shape == (g // w, 3, RES, RES) and x.is_contiguous(memory_format=torch.channels_last)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        seen[rank] = [_index_of(x) for x, _ in batches]
        assert seen[rank] == _expected(n, global_batch=g, rank=rank, world_size=w, start_step=0, steps=steps, seed=5)
        # A file of one image size is taken as stored at its final size: whole images, exact pixels.
        assert all(torch.equal(torch.round(x * 255).to(torch.uint8), torch.from_numpy(images[ix]).permute(0, 3, 1, 2))
                   for (x, _), ix in zip(batches, seen[rank]))
        assert all(y.tolist() == [i % 10 for i in ix] for (_, y), ix in zip(batches, seen[rank]))
    for epoch in range(2):  # the ranks split each epoch: disjoint, together every kept sample once
        parts = [sum(seen[r][epoch * 5 : epoch * 5 + 5], []) for r in range(w)]
        assert not set(parts[0]) & set(parts[1]) and len(set(parts[0] + parts[1])) == 5 * g
    # Resumed mid-epoch, with the training augmentation: the same samples as the uninterrupted run.
    it = ffcv_loader.make_ffcv_loader(beton, global_batch=g, rank=1, world_size=w, seed=5, start_step=7,
                                      transform="rrc_flip", resolution=24, num_workers=1)
    resumed = [_index_of(x) for x, _ in itertools.islice(it, steps - 7)]
    assert resumed == seen[1][7:]


# ---------------------------------------------------------------- DALI


@pytest.fixture(scope="module")
def dali_out(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_extra("dali")
    out = tmp_path_factory.mktemp("dali")
    assert main(["dali", str(tree), str(out), "--shards", "3", "--workers", "1", "--verify"]) == 0
    return out


@pytest.mark.dali
def test_dali_prep_writes_list_classes_shards_and_sidecar(need_dali, tree: Path, dali_out: Path) -> None:
    files = _listed(tree)
    lines = (dali_out / "train.txt").read_text().splitlines()
    assert lines == [f"{f} {f[len('class')]}" for f in files]
    assert json.loads((dali_out / "train_classes.json").read_text()) == ["class0", "class1", "class2"]
    meta = json.loads((dali_out / "train.json").read_text())
    assert meta["complete"] and meta["file_root"] == str(tree / "train")
    assert sorted(s["path"] for s in meta["skipped"]) == sorted(BAD)
    assert {c["path"]: c["found"] for c in meta["not_rgb_jpeg"]} == NOT_RGB_JPEG
    assert sorted(meta["shards"]["reencoded"]) == sorted(NOT_RGB_JPEG)
    assert sum(meta["shards"]["samples_per_shard"]) == len(files)
    shard_files = sorted(p.name for p in (dali_out / "train_shards").iterdir())
    assert shard_files == [f"shard-00000{i}.{e}" for i in range(3) for e in ("idx", "tar")]


@pytest.mark.dali
def test_dali_index_files_equal_what_dalis_own_tool_writes(need_dali, dali_out: Path, tmp_path: Path) -> None:
    wds2idx = pytest.importorskip("wds2idx")  # ships with the DALI wheel
    for tar in sorted((dali_out / "train_shards").glob("*.tar")):
        ref = tmp_path / f"{tar.stem}.idx"
        creator = wds2idx.IndexCreator(str(tar), str(ref), verbose=False)
        creator.create_index()
        creator.close()
        assert tar.with_suffix(".idx").read_text() == ref.read_text()


@pytest.mark.dali
def test_dali_second_run_skips_and_strict_fails(need_dali, tree: Path, dali_out: Path, tmp_path: Path,
                                                capsys, caplog) -> None:
    stamps = {p: p.stat().st_mtime_ns for p in dali_out.rglob("*") if p.is_file()}
    with caplog.at_level(logging.INFO, logger="data_prep"):
        assert main(["dali", str(tree), str(dali_out), "--shards", "3"]) == 0
    assert "skipped" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in dali_out.rglob("*") if p.is_file()} == stamps
    assert main(["dali", str(tree), str(tmp_path / "strict"), "--strict", "--workers", "1"]) == 2
    assert str(tree / "train" / BAD[0]) in capsys.readouterr().err
    assert not (tmp_path / "strict" / "train.txt").exists()


@pytest.mark.dali
def test_dali_names_its_input_when_an_image_cannot_be_decoded(need_dali, tree: Path) -> None:
    it = dali_loader.make_dali_loader(tree / "train", global_batch=20, train=False, resolution=RES, num_workers=1)
    with pytest.raises(DataError, match=f"{tree / 'train'}.*data_prep dali"):
        list(it)


@pytest.mark.dali
def test_dali_cpu_evaluation_view_equals_pil_and_centre_crop(need_dali, tree: Path, dali_out: Path) -> None:
    files = _listed(tree)
    batches = list(dali_loader.make_dali_loader(dali_out / "train.txt", global_batch=4, train=False,
                                                resolution=RES, num_workers=1))
    assert [len(y) for _, y in batches] == [4, 4, 4, 4, len(files) - 16]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (len(files), 3, RES, RES)
    assert y.tolist() == [int(f[len("class")]) for f in files]
    hi = files.index(CONTRAST)
    assert x[hi].max() > 0.9 and x[hi].min() < 0.1 and 0.0 <= x.min() and x.max() <= 1.0
    # transforms.center_crop itself (torch's uint8 resize) on DALI's decode, which equals PIL's here:
    # the same pixels up to the float rounding of x * (1/255).
    assert (x - _views(tree, files)).abs().max() <= 1e-6


def _dali_uint8_then_torch(path: Path, *, transform: str, train: bool, global_batch: int, seed: int,
                           steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What the DALI loader gave before it scaled in the pipeline: the same reader, crops, seed and
    op order, flipped with ``fn.flip`` and left uint8 (CHW on a CPU), then divided by 255 in torch."""
    from nvidia.dali import fn

    root, files, labels = dali_loader._read_file_list(path)
    sampler = ShardedBatchSampler(len(files), global_batch, seed=seed, shuffle=train, infinite=train)
    order = [i for _, epoch, ix in itertools.islice(sampler, steps) for i in ix if epoch == 0]

    def build():
        encoded, y = fn.readers.file(file_root=root, files=[files[i] for i in order],
                                     labels=[int(labels[i]) for i in order], random_shuffle=False,
                                     pad_last_batch=True, name="reader")
        img, mirror = dali_loader._crops(encoded, transform, RES, gpu=False)
        return (fn.flip(img, horizontal=mirror) if transform == "rrc_flip" else img), y

    it = dali_loader._iterator(build, batch=global_batch, threads=1, device_id=None,
                               seed=dali_loader._seed(seed, 0, 0), partial=not train)
    return [(out[0]["x"].float() / 255, out[0]["y"].reshape(-1).long())
            for out in itertools.islice(it, steps)]


@pytest.mark.dali
@pytest.mark.parametrize("transform", ["none", "rrc_flip"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_dali_scaling_in_the_pipeline_equals_the_uint8_output_converted_in_torch(
        need_dali, dali_out: Path, transform: str, channels_last: bool) -> None:
    # The flip, HWC -> CHW and / 255 moved into DALI (crop_mirror_normalize): same pixels up to
    # float rounding (x * (1/255) against x / 255), same labels, shape, dtype and memory format.
    # Training: the same 16 coin flips in both (a mirror ignored or misapplied fails unless all 16 are 0).
    train, g, steps = transform == "rrc_flip", 4, 4  # 4 steps: one epoch of training, 17 // 4
    ref = _dali_uint8_then_torch(dali_out / "train.txt", transform=transform, train=train, global_batch=g, seed=7,
                                 steps=steps)
    got = list(itertools.islice(dali_loader.make_dali_loader(
        dali_out / "train.txt", global_batch=g, seed=7, train=train, transform=transform, resolution=RES,
        num_workers=1, channels_last=channels_last), steps))
    assert len(got) == len(ref) == steps
    for (x, y), (x_ref, y_ref) in zip(got, ref):
        assert x.dtype == torch.float32 and x.shape == x_ref.shape == (g, 3, RES, RES)
        assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert (x - x_ref).abs().max() <= 1e-6
        assert torch.equal(y, y_ref)


@pytest.mark.dali
def test_dali_cpu_random_resized_crop_is_torchs_resize_of_dalis_crop(need_dali, dali_out: Path) -> None:
    # On a CPU DALI picks, decodes and flips the crop and torch's uint8 kernel (transforms.resize, the
    # built-in loader's) resizes it, on 2 threads here: the loader's views equal transforms.resize of the
    # crops that DALI's decoder gives with the same seed, flipped by the same coin flips. (DALI's own
    # fn.resize differs from torch's by a level or more.)
    from nvidia.dali import fn, pipeline_def, types

    g, seed, steps = 4, 7, 4
    root, files, labels = dali_loader._read_file_list(dali_out / "train.txt")
    sampler = ShardedBatchSampler(len(files), g, seed=seed, shuffle=True, infinite=True)
    order = [i for _, epoch, ix in itertools.islice(sampler, steps) for i in ix if epoch == 0]

    def build():
        encoded, _ = fn.readers.file(file_root=root, files=[files[i] for i in order], random_shuffle=False,
                                     labels=[int(labels[i]) for i in order], pad_last_batch=True, name="reader")
        crop = fn.decoders.image_random_crop(encoded, device="cpu", output_type=types.RGB,
                                             random_area=list(rrc_scale(RES)), random_aspect_ratio=list(RRC_RATIO),
                                             num_attempts=10)
        return crop, fn.random.coin_flip(probability=0.5)

    pipe = pipeline_def(build, batch_size=g, num_threads=1, device_id=None, seed=dali_loader._seed(seed, 0, 0))()
    pipe.build()
    got = dali_loader.make_dali_loader(dali_out / "train.txt", global_batch=g, seed=seed, train=True,
                                       transform="rrc_flip", resolution=RES, num_workers=2)
    flips, sizes = [], set()
    for x, _ in itertools.islice(got, steps):
        crops, mirror = pipe.run()
        for i in range(g):
            crop = torch.from_numpy(np.array(crops.at(i))).permute(2, 0, 1)
            sizes.add(tuple(crop.shape[1:]))
            flips.append(bool(np.array(mirror.at(i))))
            ref = resize(crop, (RES, RES))
            ref = (ref.flip(-1) if flips[-1] else ref).float() / 255
            assert (x[i] - ref).abs().max() <= 1e-6, f"step sample {i}: crop {tuple(crop.shape)}"
    assert 0 < sum(flips) < len(flips) and len(sizes) > 1 and (RES, RES) not in sizes


@pytest.mark.dali
@pytest.mark.parametrize("source", ["list", "folder"])
def test_dali_file_reader_follows_the_sharding_contract_and_resumes(need_dali, tree: Path, dali_out: Path,
                                                                    source: str) -> None:
    files = _listed(tree)
    ref = _views(tree, files)
    if source == "list":
        path = dali_out / "train.txt"
    else:  # the raw tree has unreadable files: a folder of just the readable ones, in a copy
        path = dali_out.parent / "clean_train"
        if not path.exists():
            for f in files:
                (path / f).parent.mkdir(parents=True, exist_ok=True)
                (path / f).write_bytes((tree / "train" / f).read_bytes())
    g, w, steps = 4, 2, 10  # 4 steps per epoch
    seen = {}
    for rank in range(w):
        it = dali_loader.make_dali_loader(path, global_batch=g, rank=rank, world_size=w, seed=3, resolution=RES,
                                          num_workers=1)
        batches = list(itertools.islice(it, steps))
        seen[rank] = [_nearest(x, ref) for x, _ in batches]
        assert seen[rank] == _expected(len(files), global_batch=g, rank=rank, world_size=w, start_step=0,
                                       steps=steps, seed=3)
        assert all(y.tolist() == [int(files[i][len("class")]) for i in ix] for (_, y), ix in zip(batches, seen[rank]))
    for epoch in range(2):
        parts = [sum(seen[r][epoch * 4 : epoch * 4 + 4], []) for r in range(w)]
        assert not set(parts[0]) & set(parts[1]) and len(set(parts[0] + parts[1])) == 4 * g
    it = dali_loader.make_dali_loader(path, global_batch=g, rank=0, world_size=w, seed=3, start_step=6,
                                      resolution=RES, num_workers=1)
    assert [_nearest(x, ref) for x, _ in itertools.islice(it, steps - 6)] == seen[0][6:]


@pytest.mark.dali
def test_dali_webdataset_shards_split_between_ranks(need_dali, tree: Path, dali_out: Path) -> None:
    files = _listed(tree)
    ref = _views(tree, files)
    shards = dali_out / "train_shards"
    evaluated = []
    for rank in range(2):
        for x, y in dali_loader.make_dali_loader(shards, global_batch=4, rank=rank, world_size=2, train=False,
                                                 resolution=RES, num_workers=1):
            ix = _nearest(x, ref)
            assert y.tolist() == [int(files[i][len("class")]) for i in ix]  # labels parsed from .cls
            # Re-encoded images (grayscale, CMYK, PNG) are JPEG q95 copies: close, not equal.
            assert (x - ref[ix]).abs().mean() * 255 < 3
            evaluated.append(ix)
    flat = sum(evaluated, [])
    assert sorted(flat) == list(range(len(files)))  # every image once over both ranks
    # Training: each rank reads its own part of the samples (disjoint within an epoch), in an order
    # fixed by (seed, epoch); a resumed run replays the skipped batches of its epoch.
    epoch = {}
    for rank in range(2):
        it = dali_loader.make_dali_loader(shards, global_batch=4, rank=rank, world_size=2, seed=1,
                                          resolution=RES, num_workers=1)
        epoch[rank] = [_nearest(x, ref) for x, _ in itertools.islice(it, 4)]  # one epoch: 17 // 4 steps
    assert not set(sum(epoch[0], [])) & set(sum(epoch[1], [])) and len(set(sum(epoch[0] + epoch[1], []))) == 16
    it = dali_loader.make_dali_loader(shards, global_batch=4, rank=1, world_size=2, seed=1, start_step=2,
                                      resolution=RES, num_workers=1)
    assert [_nearest(x, ref) for x, _ in itertools.islice(it, 2)] == epoch[1][2:]
    it = dali_loader.make_dali_loader(shards, global_batch=4, rank=0, world_size=2, seed=1,
                                      transform="rrc_flip", resolution=24, num_workers=1, channels_last=True)
    x, y = next(it)
    assert x.shape == (2, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last) and 0.0 <= x.min() and x.max() <= 1.0


@pytest.mark.ffcv
def test_ffcv_conversion_bound_to_one_cpu_exits(need_ffcv, tree: Path, tmp_path: Path) -> None:
    """A SLURM task bound to one CPU: numba's default TBB layer never let FFCV's writer exit there, so
    data_prep picks OpenMP's unless the user chose (a hang fails on the generous time-out, not on speed)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    argv = ["taskset", "-c", "0", sys.executable, "-m", "data_prep", "ffcv", str(tree), str(tmp_path),
            "--write-mode", "raw", "--max-res", "64", "--workers", "1"]
    done = subprocess.run(argv, cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert list(tmp_path.glob("*.beton"))
