"""The scikit-learn digits source (the demo's data) and the demo job files that use it."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits  # the demo extra, which scripts/setup.sh installs

from advft import config as C
from advft import simclr as P
from advft.data import build_dataset, eval_data, make_loader
from advft.data.datasets import DataError
from advft.data.digits import HELD_OUT, Digits, split_indices
from launch import base_encoder

ROOT = Path(__file__).resolve().parent.parent
N = 1797  # images in load_digits()


@pytest.fixture(scope="module")
def splits() -> dict[str, Digits]:
    return {s: Digits(s, resolution=16, seed=0) for s in ("train", "test")}


def test_items_follow_the_dataset_contract(splits: dict[str, Digits]) -> None:
    train, test = splits["train"], splits["test"]
    assert (len(train), len(test)) == (N - HELD_OUT, HELD_OUT)
    x, y = test[5]
    assert x.dtype == torch.uint8 and x.shape == (3, 16, 16) and isinstance(y, int)
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # grey on all three channels
    for ds in (train, test):
        assert ds.images.shape == (len(ds), 16, 16, 3) and ds.images.dtype == np.uint8
        assert ds.images.min() == 0 and ds.images.max() == 255  # ink 0-16 spans the whole range
        assert ds.classes == [str(d) for d in range(10)] and ds.resolution == 16
        assert sorted(set(ds.labels.tolist())) == list(range(10))


def test_native_resolution_is_the_scans_scaled_to_255() -> None:
    bunch = load_digits()
    ds = Digits("test", resolution=8, seed=0)
    want = np.rint(bunch.images[ds.indices] * 255 / 16).astype(np.uint8)
    assert np.array_equal(ds.images[..., 0], want)
    assert np.array_equal(ds.labels, bunch.target[ds.indices])


def test_split_is_disjoint_complete_and_fixed_by_the_seed() -> None:
    a = split_indices(N, 0)
    assert not set(a["train"]) & set(a["test"])
    assert sorted([*a["train"], *a["test"]]) == list(range(N))
    b = split_indices(N, 0)
    assert all(np.array_equal(a[s], b[s]) for s in a)
    assert not np.array_equal(a["test"], split_indices(N, 1)["test"])


def test_same_settings_give_the_same_images(splits: dict[str, Digits]) -> None:
    again = Digits("train", resolution=16, seed=0)
    assert np.array_equal(again.images, splits["train"].images)
    assert np.array_equal(again.labels, splits["train"].labels)
    assert not np.array_equal(Digits("train", resolution=16, seed=1).indices, again.indices)


def test_the_probe_never_sees_a_test_image() -> None:
    cfg = C.load(ROOT / "jobs" / "demo.toml")
    probe, test = eval_data(cfg, torch.device("cpu"))
    seen = {x.numpy().tobytes() for xb, _ in probe() for x in xb}
    tested = [x.numpy().tobytes() for xb, _ in test() for x in xb]
    assert len(tested) == HELD_OUT and len(seen) == N - HELD_OUT
    assert not any(t in seen for t in tested)


def test_loader_gives_unnormalised_pixels_in_0_1() -> None:
    ds = build_dataset("digits", "", "test", resolution=16, seed=0)
    x, y = next(make_loader(ds, global_batch=64, train=False))
    assert x.dtype == torch.float32 and x.shape == (64, 3, 16, 16) and y.dtype == torch.int64
    assert float(x.min()) == 0.0 and float(x.max()) <= 1.0 and float(x.max()) > 0.9


def test_bad_split_and_missing_scikit_learn_are_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="digits split 'val'"):
        build_dataset("digits", "", "val", resolution=16)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(DataError, match=r"scikit-learn.*\.\[demo\]"):
        build_dataset("digits", "", "train", resolution=16)
    with pytest.raises(C.ConfigError, match=r"data.format = 'digits' needs the scikit-learn package"):
        C.validate(C.load(ROOT / "jobs" / "demo.toml"), check_paths=False)


def test_demo_jobs_load_validate_and_agree() -> None:
    cfg = base_encoder.validate(C.load(ROOT / "jobs" / "demo.toml"), made_here=True)  # and model.pretrain's job
    pcfg = P.validate(P.load_config(ROOT / "jobs" / "demo_pretrain.toml"))
    assert cfg.data.format == pcfg.data.format == "digits"
    assert cfg.data.resolution == pcfg.data.resolution
    # every evaluation tests on the whole held-out split; the probe trains on the whole training split
    assert cfg.eval.test_size >= HELD_OUT and pcfg.eval.test_size >= HELD_OUT
    assert cfg.eval.probe_train_size >= N - HELD_OUT
    assert cfg.model.bn == "eval"  # the clean and adversarial terms share no batch statistics
