"""Tests of advft.data: synthetic set, datasets, deterministic transforms and the sharded loader.

All data is made here (small synthetic sets, a tiny image tree, a fake CIFAR-10 root), so the file
runs offline on a CPU in well under a minute.
"""

from __future__ import annotations

import itertools
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from advft.data import synthetic
from advft.data.datasets import CIFAR10, DataError, ImageFolderDataset, build_dataset
from advft.data.loader import ShardedBatchSampler, SeededSubset, make_loader, subset
from advft.data.synthetic import SyntheticShapes
from advft.data.transforms import center_crop, random_resized_crop_flip, resize, rrc_scale, sample_crop, sample_rng

RES = 32


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def small(cache: Path) -> SyntheticShapes:
    return SyntheticShapes("train", size=96, resolution=RES, seed=0, cache_dir=cache)


def take(it, k):
    return list(itertools.islice(it, k))


# ---------------------------------------------------------------- synthetic


def test_synthetic_is_a_pure_function_of_its_settings(tmp_path: Path) -> None:
    a = SyntheticShapes("train", size=64, seed=3, cache_dir=tmp_path / "a")
    b = SyntheticShapes("train", size=64, seed=3, cache_dir=tmp_path / "b")  # no shared cache
    c = SyntheticShapes("train", size=64, seed=4, cache_dir=tmp_path / "a")
    t = SyntheticShapes("test", size=64, seed=3, cache_dir=tmp_path / "a")
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    assert not np.array_equal(a.images, t.images)
    # No image of the test split appears in the train split.
    train_rows = {x.tobytes() for x in a.images}
    assert not any(x.tobytes() in train_rows for x in t.images)


def test_synthetic_items_follow_the_dataset_contract(small: SyntheticShapes) -> None:
    assert small.images.shape == (96, RES, RES, 3) and small.images.dtype == np.uint8
    assert small.labels.dtype == np.int64 and len(small) == 96
    x, y = small[5]
    assert x.dtype == torch.uint8 and x.shape == (3, RES, RES)
    assert torch.equal(x, torch.from_numpy(small.images[5]).permute(2, 0, 1))
    assert isinstance(y, int) and y == small.labels[5]
    assert len(small.classes) == 10 and len(set(small.classes)) == 10


def test_synthetic_smaller_set_is_a_prefix_of_a_larger_one() -> None:
    big_x, big_y = synthetic.generate("train", synthetic.CHUNK + 100, 16, seed=1)
    x, y = synthetic.generate("train", synthetic.CHUNK + 7, 16, seed=1)
    assert np.array_equal(x, big_x[: len(x)]) and np.array_equal(y, big_y[: len(y)])


def test_synthetic_classes_are_balanced() -> None:
    _, y = synthetic.generate("test", 1200, 16, seed=0)
    counts = np.bincount(y, minlength=10)
    assert counts.min() >= 110 and counts.max() <= 130, counts


def test_synthetic_cache_hit_does_not_regenerate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = SyntheticShapes("test", size=40, resolution=24, seed=7, cache_dir=tmp_path)
    assert first.cache_file.is_file() and first.cache_file.parent == tmp_path / "synthetic"
    assert [p.name for p in first.cache_file.parent.iterdir()] == [first.cache_file.name]  # no temp left

    def boom(*args, **kwargs):
        raise AssertionError("generated again despite a cache file")

    monkeypatch.setattr(synthetic, "generate", boom)
    second = SyntheticShapes("test", size=40, resolution=24, seed=7, cache_dir=tmp_path)
    assert np.array_equal(first.images, second.images) and np.array_equal(first.labels, second.labels)
    with pytest.raises(AssertionError, match="generated again"):  # other settings: a different file
        SyntheticShapes("test", size=40, resolution=24, seed=8, cache_dir=tmp_path)


def test_synthetic_damaged_cache_is_regenerated(tmp_path: Path) -> None:
    ref = SyntheticShapes("train", size=20, resolution=16, seed=0, cache_dir=tmp_path)
    ref.cache_file.write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="unreadable synthetic cache"):
        again = SyntheticShapes("train", size=20, resolution=16, seed=0, cache_dir=tmp_path)
    assert np.array_equal(ref.images, again.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten file loads cleanly
        SyntheticShapes("train", size=20, resolution=16, seed=0, cache_dir=tmp_path)


def _ridge_accuracy(f_train: torch.Tensor, y_train: torch.Tensor, f_test: torch.Tensor, y_test: torch.Tensor) -> float:
    """Test accuracy of a closed-form ridge classifier on standardised features."""
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    ones = torch.ones(len(f_train), 1, dtype=f_train.dtype)
    a = torch.cat([(f_train - mu) / sd, ones], 1)
    b = torch.cat([(f_test - mu) / sd, ones[: len(f_test)]], 1)
    targets = F.one_hot(y_train, 10).to(a.dtype)
    w = torch.linalg.solve(a.T @ a + 10 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ targets)
    return ((b @ w).argmax(1) == y_test).double().mean().item()


def test_synthetic_is_learnable_but_not_from_colour(cache: Path) -> None:
    train = SyntheticShapes("train", size=2000, resolution=RES, seed=0, cache_dir=cache)
    test = SyntheticShapes("test", size=1000, resolution=RES, seed=0, cache_dir=cache)

    def pixels(ds: SyntheticShapes) -> torch.Tensor:
        return torch.from_numpy(ds.images).permute(0, 3, 1, 2).double() / 255

    xtr, xte = pixels(train), pixels(test)
    ytr, yte = torch.from_numpy(train.labels), torch.from_numpy(test.labels)
    # Random 5x5 filters + ReLU + global max/mean pooling: a frozen "encoder" with no training.
    filters = torch.randn(128, 3, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    filters -= filters.mean((1, 2, 3), keepdim=True)

    def features(x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x - x.mean((2, 3), keepdim=True), filters, padding=2).relu_()
        return torch.cat([h.amax((2, 3)), h.mean((2, 3))], 1)

    learned = _ridge_accuracy(features(xtr), ytr, features(xte), yte)
    colour = _ridge_accuracy(xtr.mean((2, 3)), ytr, xte.mean((2, 3)), yte)
    assert learned > 0.4, learned  # chance is 0.1; measured ~0.64
    assert colour < 0.2, colour  # the mean colour carries no label: the nuisances work


# ---------------------------------------------------------------- transforms


def test_center_crop_resizes_shorter_side_then_crops_centre() -> None:
    img = torch.randint(0, 256, (3, 37, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    # 37 = round(32 / 0.875): no resize, only the centre crop.
    assert torch.equal(center_crop(img, 32), img[:, 2:34, 9:41])
    tall = center_crop(torch.zeros(3, 300, 100, dtype=torch.uint8), 64)
    assert tall.shape == (3, 64, 64)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("src, size", [((3, 371, 429), (224, 224)), ((3, 120, 97), (224, 224)),
                                       ((3, 300, 180), (171, 99)), ((3, 40, 60), (32, 32))])
def test_resize_is_the_float_antialiased_bilinear_within_one(channels_last: bool, src: tuple, size: tuple) -> None:
    # The uint8 kernel against the float32 one rounded: shrinking (antialiased) and enlarging, both
    # layouts, a crop view as the random-resized crop passes it. A swapped axis, a missing antialias
    # filter or another interpolation would be off by far more than 1.
    g = torch.Generator().manual_seed(sum(src) + sum(size))
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, src[1] // 8 + 2, src[2] // 8 + 2, generator=g) * 255,
                                             size=src[1:], mode="bicubic", align_corners=False)
    img = (smooth[0] + torch.randint(-40, 41, src, generator=g)).clamp(0, 255).to(torch.uint8)  # edges + noise
    if channels_last:
        img = img.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # as ImageFolderDataset.full_image gives it
    view = img[:, 3:, 2:]
    out = resize(view, size)
    ref = torch.nn.functional.interpolate(view[None].float(), size=size, mode="bilinear", antialias=True,
                                          align_corners=False)[0].round().clamp(0, 255)
    assert out.dtype == torch.uint8 and out.shape == (3, *size)
    assert (out.float() - ref).abs().max() <= 1 and (out.float() - ref).abs().mean() < 0.5
    assert torch.equal(resize(img, tuple(img.shape[1:])), img)
    with pytest.raises(TypeError, match="uint8"):
        resize(img.float(), size)


def test_random_resized_crop_is_keyed_and_bounded() -> None:
    img = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    a = random_resized_crop_flip(img, 32, seed=0, epoch=1, index=5)
    b = random_resized_crop_flip(img, 32, seed=0, epoch=1, index=5)
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8 and torch.equal(a, b)
    keys = [(1, 1, 5), (0, 2, 5), (0, 1, 6)]  # another seed, epoch, index
    others = [random_resized_crop_flip(img, 32, seed=s, epoch=e, index=i) for s, e, i in keys]
    assert all(not torch.equal(a, o) for o in others)
    for k in range(200):
        top, left, h, w = sample_crop(40, 60, sample_rng(0, 0, k), rrc_scale(32))
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60 and h > 0 and w > 0
    assert rrc_scale(32) == (0.35, 1.0) and rrc_scale(224) == (0.08, 1.0)


# ---------------------------------------------------------------- sampler


def test_sampler_ranks_partition_the_global_batch() -> None:
    n, g = 50, 12  # 4 steps per epoch, 2 samples dropped per epoch
    single = take(ShardedBatchSampler(n, g, seed=3), 10)
    ranks = [take(ShardedBatchSampler(n, g, rank=r, world_size=3, seed=3), 10) for r in range(3)]
    for s in range(10):
        parts = [ranks[r][s][2] for r in range(3)]
        assert all(len(p) == g // 3 for p in parts)
        assert sum(parts, []) == single[s][2]  # rank order concatenation == one process
        assert all(ranks[r][s][:2] == single[s][:2] for r in range(3))  # same (step, epoch)


def test_sampler_epochs_are_fresh_permutations() -> None:
    sampler = ShardedBatchSampler(50, 12, seed=0)
    assert sampler.steps_per_epoch == 4
    batches = take(sampler, 8)
    assert [b[1] for b in batches] == [0] * 4 + [1] * 4
    e0 = sum((b[2] for b in batches[:4]), [])
    e1 = sum((b[2] for b in batches[4:]), [])
    assert len(set(e0)) == 48 and len(set(e1)) == 48  # no repeats inside an epoch
    assert e0 != e1
    assert take(ShardedBatchSampler(50, 12, seed=1), 1)[0][2] != batches[0][2]


def test_sampler_resumes_exactly() -> None:
    full = take(ShardedBatchSampler(50, 12, rank=1, world_size=2, seed=5), 11)
    resumed = take(ShardedBatchSampler(50, 12, rank=1, world_size=2, seed=5, start_step=6), 5)
    assert resumed == full[6:]


def test_sampler_single_pass_keeps_the_last_batch() -> None:
    one = list(ShardedBatchSampler(23, 8, shuffle=False, infinite=False))
    assert [b[2] for b in one] == [list(range(0, 8)), list(range(8, 16)), list(range(16, 23))]
    parts = [list(ShardedBatchSampler(23, 8, rank=r, world_size=4, shuffle=False, infinite=False)) for r in range(4)]
    assert all(len(p) == 3 for p in parts) and len(ShardedBatchSampler(23, 8, infinite=False)) == 3
    covered = sorted(i for p in parts for _, _, idx in p for i in idx)
    assert covered == list(range(23))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n=50, global_batch=10, world_size=4), "global_batch 10 is not divisible by world_size 4"),
        (dict(n=50, global_batch=8, rank=2, world_size=2), "rank 2"),
        (dict(n=5, global_batch=8), "smaller than one global batch"),
    ],
)
def test_sampler_rejects_bad_settings(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ShardedBatchSampler(**kwargs)


# ---------------------------------------------------------------- loader


def test_loader_yields_float_pixels_on_device(small: SyntheticShapes) -> None:
    x, y = next(make_loader(small, global_batch=16, world_size=2, rank=1, seed=0))
    assert x.shape == (8, 3, RES, RES) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1
    idx = take(ShardedBatchSampler(len(small), 16, world_size=2, rank=1, seed=0), 1)[0][2]
    expected = torch.from_numpy(small.images[idx]).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(x, expected) and torch.equal(y, torch.from_numpy(small.labels[idx]))
    xc, _ = next(make_loader(small, global_batch=16, channels_last=True))
    assert xc.is_contiguous(memory_format=torch.channels_last)


def test_loader_ranks_concatenate_to_the_single_process_batch(small: SyntheticShapes) -> None:
    kw = dict(global_batch=12, seed=2, transform="rrc_flip", start_step=7)
    single = take(make_loader(small, **kw), 2)
    ranks = [take(make_loader(small, rank=r, world_size=2, **kw), 2) for r in range(2)]
    for s in range(2):
        assert torch.equal(torch.cat([ranks[0][s][0], ranks[1][s][0]]), single[s][0])
        assert torch.equal(torch.cat([ranks[0][s][1], ranks[1][s][1]]), single[s][1])


def test_rrc_flip_is_deterministic_across_workers_and_resume(small: SyntheticShapes) -> None:
    kw = dict(global_batch=16, seed=1, transform="rrc_flip")
    ref = take(make_loader(small, num_workers=0, **kw), 8)  # 6 steps per epoch: crosses an epoch
    workers = take(make_loader(small, num_workers=2, **kw), 8)
    resumed = take(make_loader(small, start_step=5, **kw), 3)
    for (xa, ya), (xb, yb) in zip(ref, workers):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for (xa, ya), (xb, yb) in zip(ref[5:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    plain = take(make_loader(small, global_batch=16, seed=1), 1)[0][0]
    assert not torch.equal(plain, ref[0][0])  # the augmentation does something


def test_eval_loader_is_one_ordered_pass(small: SyntheticShapes) -> None:
    batches = list(make_loader(small, global_batch=40, train=False))
    assert [len(y) for _, y in batches] == [40, 40, 16]
    assert torch.equal(torch.cat([y for _, y in batches]), torch.from_numpy(small.labels))


def test_loader_rejects_bad_settings(small: SyntheticShapes) -> None:
    with pytest.raises(ValueError, match="global_batch 10 is not divisible by world_size 3"):
        make_loader(small, global_batch=10, world_size=3)
    with pytest.raises(ValueError, match="unknown transform 'flip'"):
        make_loader(small, global_batch=8, transform="flip")
    with pytest.raises(ValueError, match="resolution 32"):
        make_loader(small, global_batch=8, resolution=64)


def test_subset_is_seeded_and_fixed(small: SyntheticShapes) -> None:
    a, b, c = subset(small, 30, seed=0), subset(small, 30, seed=0), subset(small, 30, seed=1)
    assert isinstance(a, SeededSubset) and len(a) == 30
    assert np.array_equal(a.indices, b.indices) and not np.array_equal(a.indices, c.indices)
    assert len(set(a.indices.tolist())) == 30 and a.classes == small.classes
    x, y = a[3]
    assert torch.equal(x, small[int(a.indices[3])][0]) and np.array_equal(a.labels, small.labels[a.indices])
    assert subset(small, 96, seed=0) is small and subset(small, 1000, seed=0) is small
    assert len(list(make_loader(a, global_batch=8, train=False))) == 4


# ---------------------------------------------------------------- image folder


def _write(path: Path, img: Image.Image, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)

    def noise(h: int, w: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))

    _write(root / "train" / "n01" / "a.JPEG", noise(40, 60))
    _write(root / "train" / "n01" / "gray.JPEG", noise(50, 45).convert("L"))
    _write(root / "train" / "n02" / "cmyk.JPEG", noise(33, 70).convert("CMYK"))
    _write(root / "train" / "n02" / "b.png", noise(64, 64))
    _write(root / "train" / "n03" / "rgba.png", noise(20, 90).convert("RGBA"))
    _write(root / "val" / "n01" / "c.JPEG", noise(36, 36))
    return root


def test_folder_loads_every_image_kind_with_labels(folder: Path) -> None:
    ds = build_dataset("folder", str(folder), "train", resolution=RES)
    assert isinstance(ds, ImageFolderDataset) and ds.classes == ["n01", "n02", "n03"]
    assert [Path(f).name for f, _ in ds.samples] == ["a.JPEG", "gray.JPEG", "b.png", "cmyk.JPEG", "rgba.png"]
    assert ds.labels.tolist() == [0, 0, 1, 1, 2]
    sizes = [(40, 60), (50, 45), (64, 64), (33, 70), (20, 90)]
    for i, (h, w) in enumerate(sizes):
        full, label = ds.full_image(i)
        x, y = ds[i]
        assert full.shape == (3, h, w) and full.dtype == torch.uint8
        assert x.shape == (3, RES, RES) and x.dtype == torch.uint8 and y == label == ds.labels[i]
    gray = ds.full_image(1)[0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert len(build_dataset("folder", str(folder), "val", resolution=RES)) == 1


def test_folder_loader_none_is_centre_crop_and_rrc_sees_the_full_image(folder: Path) -> None:
    ds = build_dataset("folder", str(folder), "train", resolution=RES)
    x, y = next(make_loader(ds, global_batch=5, train=False))
    expected = torch.stack([center_crop(ds.full_image(i)[0], RES) for i in range(5)]).float() / 255
    assert torch.equal(x, expected) and y.tolist() == [0, 0, 1, 1, 2]
    xr, yr = next(make_loader(ds, global_batch=5, train=True, transform="rrc_flip", seed=0))
    # The training crop is taken from the full decoded image, not from the centre-cropped view.
    order = ShardedBatchSampler(len(ds), 5, seed=0).order(0).tolist()
    full = [random_resized_crop_flip(ds.full_image(i)[0], RES, seed=0, epoch=0, index=i) for i in order]
    assert torch.equal(xr, torch.stack(full).float() / 255) and yr.tolist() == ds.labels[order].tolist()
    assert not torch.equal(xr, x[order])


# ---------------------------------------------------------------- CIFAR-10


class _Py2Array:
    """Pickles a uint8 array the way Python 2 numpy did: its bytes as a (latin1) str, no _codecs."""

    def __init__(self, a: np.ndarray) -> None:
        self.a = a

    def __reduce__(self):
        reconstruct = np.empty(0).__reduce__()[0]
        state = (1, self.a.shape, self.a.dtype, False, self.a.tobytes().decode("latin1"))
        return reconstruct, (np.ndarray, (0,), "b"), state


def _fake_cifar(root: Path, per_batch: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Writes cifar-10-batches-py like torchvision's download; returns the HWC images per split.

    The training batches imitate the original Python 2 pickles; the test batch is written by
    Python 3 (protocol 2), as a re-pickled copy would be. Both must load.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written: dict[str, tuple[list[np.ndarray], list[int]]] = {"train": ([], []), "test": ([], [])}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        hwc = rng.integers(0, 256, (per_batch, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        flat = hwc.transpose(0, 3, 1, 2).reshape(per_batch, 3072)  # CIFAR rows: R plane, G, B
        data = flat if name == "test_batch" else _Py2Array(flat)
        names = [f"{j}.png" for j in range(per_batch)]
        entry = {"batch_label": name, "labels": labels, "data": data, "filenames": names}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        split = "test" if name == "test_batch" else "train"
        written[split][0].append(hwc)
        written[split][1].extend(labels)
    meta = {"label_names": [f"class{k}" for k in range(10)], "num_cases_per_batch": per_batch}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {s: (np.concatenate(x), y) for s, (x, y) in written.items()}


def test_cifar10_reads_torchvision_layout(tmp_path: Path) -> None:
    written = _fake_cifar(tmp_path)
    train = build_dataset("cifar10", str(tmp_path), "train", resolution=32)
    test = build_dataset("cifar10", str(tmp_path), "test", resolution=32)
    assert isinstance(train, CIFAR10) and len(train) == 20 and len(test) == 4
    assert train.classes == [f"class{k}" for k in range(10)]
    assert np.array_equal(train.images, written["train"][0]) and train.labels.tolist() == written["train"][1]
    x, y = test[2]
    assert torch.equal(x, torch.from_numpy(written["test"][0][2]).permute(2, 0, 1)) and y == written["test"][1][2]
    direct = CIFAR10(tmp_path / "cifar-10-batches-py", "test")  # the batches folder itself also works
    assert np.array_equal(direct.images, test.images)
    big = build_dataset("cifar10", str(tmp_path), "test", resolution=40)
    assert big[0][0].shape == (3, 40, 40) and big.full_image(0)[0].shape == (3, 32, 32)


def test_cifar10_refuses_code_in_pickles(tmp_path: Path) -> None:
    _fake_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(DataError, match="builtins.print"):
        build_dataset("cifar10", str(tmp_path), "test", resolution=32)


# ---------------------------------------------------------------- errors


def test_data_errors_name_the_problem(tmp_path: Path, folder: Path) -> None:
    here, nope = str(tmp_path), str(tmp_path / "nope")
    cases = [
        (lambda: build_dataset("lmdb", "x", "train", resolution=32), "unknown data format 'lmdb'"),
        (lambda: build_dataset("folder", nope, "train", resolution=32), re.escape(nope)),
        (lambda: build_dataset("folder", str(folder), "test", resolution=32), "folders under .*'train', 'val'"),
        (lambda: build_dataset("cifar10", here, "train", resolution=32), f"CIFAR-10 not found at {re.escape(here)}"),
        (lambda: build_dataset("cifar10", str(tmp_path), "val", resolution=32), "split 'val'"),
        (lambda: build_dataset("synthetic", "", "val", resolution=32), "synthetic split 'val'"),
        (lambda: build_dataset("synthetic", str(tmp_path), "train", resolution=4), "resolution must be >= 8"),
    ]
    empty = tmp_path / "empty"
    (empty / "train" / "n01").mkdir(parents=True)
    (empty / "train" / "n01" / "notes.txt").write_text("not an image")
    cases.append((lambda: build_dataset("folder", str(empty), "train", resolution=32), "no images under"))
    for make, message in cases:
        with pytest.raises(DataError, match=message):
            make()
    assert issubclass(DataError, ValueError)
