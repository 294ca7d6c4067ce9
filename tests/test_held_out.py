"""The probe's test images are never among its training images, for every data format; a config that
cannot guarantee it is refused at validation with one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from advft import config as C
from advft.data import DataError, eval_data


def _cfg(tmp_path, fmt: str, path: str, val_path: str = "", **sets: str) -> C.Config:
    return C.load(None, [f"data.format={fmt}", f"data.path={path}", f"data.val_path={val_path}",
                         f"model.checkpoint={tmp_path / 'enc.pt'}", *[f"{k}={v}" for k, v in sets.items()]])


@pytest.mark.parametrize("fmt", ["ffcv", "dali"])
def test_empty_val_path_is_refused(tmp_path, monkeypatch, fmt):
    monkeypatch.setattr(C, "_check_extra", lambda fmt: None)  # the refusal must not depend on the extras
    cfg = _cfg(tmp_path, fmt, str(tmp_path / "train.beton"))
    with pytest.raises(C.ConfigError) as e:
        C.validate(cfg, check_paths=False)
    msg = str(e.value)
    assert "\n" not in msg and "data.val_path is empty" in msg and "held-out" in msg
    # the loaders' side refuses too, before reading anything: no caller can test on the training file
    with pytest.raises(DataError, match="data.val_path is empty"):
        eval_data(cfg, torch.device("cpu"))


@pytest.mark.parametrize("fmt", ["ffcv", "dali"])
def test_val_path_that_is_the_training_file_is_refused(tmp_path, monkeypatch, fmt):
    monkeypatch.setattr(C, "_check_extra", lambda fmt: None)
    train = tmp_path / "train.txt"
    train.write_text("a.jpg 0\n")
    link = tmp_path / "val.txt"
    link.symlink_to(train)  # another name for the same file
    (tmp_path / "enc.pt").write_bytes(b"x")
    for val in (train, link):
        with pytest.raises(C.ConfigError, match="is data.path: the probe would be tested on its training images"):
            C.validate(_cfg(tmp_path, fmt, str(train), str(val)))


def test_dali_lists_sharing_images_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "_check_extra", lambda fmt: None)
    (tmp_path / "enc.pt").write_bytes(b"x")
    (tmp_path / "train.txt").write_text("img/a.jpg 0\nimg/b.jpg 1\n")
    (tmp_path / "val.txt").write_text("img/c.jpg 0\nimg/b.jpg 1\n")
    (tmp_path / "val_ok.txt").write_text("img/c.jpg 0\nimg/d.jpg 1\n")
    with pytest.raises(C.ConfigError, match=r"shares 1 images with data.path .* \(e.g. .*b.jpg\)"):
        C.validate(_cfg(tmp_path, "dali", str(tmp_path / "train.txt"), str(tmp_path / "val.txt")))
    C.validate(_cfg(tmp_path, "dali", str(tmp_path / "train.txt"), str(tmp_path / "val_ok.txt")))


def _images(batches) -> set[bytes]:
    out = set()
    for x, _ in batches():
        for img in (x * 255).round().to(torch.uint8):
            out.add(img.numpy().tobytes())
    return out


def test_builtin_formats_never_test_on_probe_images(tmp_path):
    """synthetic: independent streams; folder: <path>/train vs <path>/val (here the val images are the
    train images' mirror, so equal pixels could only come from reading the training folder)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            (tmp_path / "tree" / split / f"c{c}").mkdir(parents=True)
    for i in range(6):
        arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / "tree" / "train" / f"c{i % 2}" / f"{i}.png")
        Image.fromarray(arr[:, ::-1].copy()).save(tmp_path / "tree" / "val" / f"c{i % 2}" / f"{i}.png")
    for fmt, path in (("synthetic", str(tmp_path / "cache")), ("folder", str(tmp_path / "tree"))):
        cfg = _cfg(tmp_path, fmt, path, **{"data.resolution": "16", "eval.probe_train_size": "64",
                                          "eval.test_size": "32", "data.synthetic_size": "256",
                                          "data.batch_size": "16"})
        probe, test = eval_data(cfg, torch.device("cpu"))
        train_imgs, test_imgs = _images(probe), _images(test)
        assert train_imgs and test_imgs
        assert not train_imgs & test_imgs, fmt
