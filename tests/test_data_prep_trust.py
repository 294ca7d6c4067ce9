"""data_prep outputs that never lie: "done" only when written, verified when asked and made from the source
as it is now; hostile trees (link loops, FIFOs, sockets, devices); unwritable outputs found before the work;
one rule for alpha channels.

Every tree is made here, a few tiny images. Tests that need FFCV or DALI fail instead of skipping under
ADVFT_REQUIRE_EXTRAS=1 (CI).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.__main__ import main
from data_prep.images import read_rgb
from data_prep.sources import resolve

ROOT = Path(__file__).resolve().parent.parent
RAW = ["--write-mode", "raw", "--max-res", "0", "--workers", "1"]
BETON = "train_full_0.50_90_raw.beton"


def _image(path: Path, seed: int, size: tuple[int, int] = (20, 28)) -> None:
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]]
    a = np.stack([xx * 9 + seed * 17, yy * 11, 0 * xx + 40 * seed], -1) % 256
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a.astype(np.uint8)).save(path, quality=95)


def _tree(root: Path, per_class: int = 3) -> Path:
    """``root/train/{cat,dog}/{0..per_class-1}.jpg``."""
    for c, name in enumerate(("cat", "dog")):
        for k in range(per_class):
            _image(root / "train" / name / f"{k}.jpg", 10 * c + k)
    return root


def _meta(path: Path) -> dict:
    return json.loads(path.read_text())


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("data_prep:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


# ---------------------------------------------------------------- 1. done = written, verified, current


@pytest.mark.ffcv
def test_ffcv_sidecar_only_after_verification_and_a_rerun_with_verify_verifies(need_ffcv, tmp_path, monkeypatch,
                                                                              capsys) -> None:
    import data_prep.ffcv_prep as F
    from data_prep.sources import PrepError

    src, out = _tree(tmp_path / "src"), tmp_path / "out"

    def failing(*_a, **_k):
        raise PrepError("verification failed here")

    monkeypatch.setattr(F, "verify_beton", failing)
    assert main(["ffcv", str(src), str(out), *RAW, "--verify"]) == 2
    assert "verification failed here" in capsys.readouterr().err
    assert not (out / BETON).with_suffix(".json").exists()  # not "done": the next run rebuilds
    monkeypatch.undo()
    assert main(["ffcv", str(src), str(out), *RAW, "--verify"]) == 0
    assert _meta((out / BETON).with_suffix(".json"))["complete"]
    # A rerun with --verify reads it back again (and fails on damage; see the next test).
    monkeypatch.setattr(F, "verify_beton", failing)
    assert main(["ffcv", str(src), str(out), *RAW, "--verify"]) == 2
    assert not (out / BETON).with_suffix(".json").exists()


@pytest.mark.ffcv
def test_ffcv_rerun_with_verify_fails_on_damaged_bytes_of_the_same_size(need_ffcv, tmp_path, capsys) -> None:
    src, out = _tree(tmp_path / "src"), tmp_path / "out"
    assert main(["ffcv", str(src), str(out), *RAW]) == 0
    beton = out / BETON
    data = bytearray(beton.read_bytes())
    table_end = len(data) - 64  # somewhere in the sample data, not the header or the allocation table
    data[table_end // 2 : table_end // 2 + 8] = bytes(255 - b for b in data[table_end // 2 : table_end // 2 + 8])
    beton.write_bytes(bytes(data))
    assert main(["ffcv", str(src), str(out), *RAW, "--verify"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(beton) in line and "damaged" in line
    assert not beton.with_suffix(".json").exists()
    assert main(["ffcv", str(src), str(out), *RAW, "--verify"]) == 0  # rebuilt, and right
    assert beton.with_suffix(".json").exists()


@pytest.mark.ffcv
def test_ffcv_changed_source_rebuilds(need_ffcv, tmp_path) -> None:
    src, out = _tree(tmp_path / "src"), tmp_path / "out"
    sidecar = (out / BETON).with_suffix(".json")
    assert main(["ffcv", str(src), str(out), *RAW]) == 0
    assert _meta(sidecar)["num_samples"] == 6
    _image(src / "train" / "dog" / "new.jpg", 99)
    assert main(["ffcv", str(src), str(out), *RAW]) == 0
    assert _meta(sidecar)["num_samples"] == 7
    (src / "train" / "cat" / "0.jpg").unlink()
    assert main(["ffcv", str(src), str(out), *RAW]) == 0
    assert _meta(sidecar)["num_samples"] == 6
    before = _meta(sidecar)["sha256"]
    _image(src / "train" / "cat" / "1.jpg", 55, size=(20, 30))  # same name, other pixels
    assert main(["ffcv", str(src), str(out), *RAW, "--verify"]) == 0
    assert _meta(sidecar)["sha256"] != before


@pytest.mark.dali
def test_dali_changed_source_rebuilds_and_damaged_list_fails_verify(tmp_path, need_dali, capsys) -> None:
    src, out = _tree(tmp_path / "src"), tmp_path / "out"
    assert main(["dali", str(src), str(out), "--workers", "1"]) == 0
    (src / "train" / "cat" / "2.jpg").unlink()
    _image(src / "train" / "dog" / "9.jpg", 77)
    assert main(["dali", str(src), str(out), "--workers", "1", "--verify"]) == 0
    listed = [line.split()[0] for line in (out / "train.txt").read_text().splitlines()]
    assert "cat/2.jpg" not in listed and "dog/9.jpg" in listed and len(listed) == 6
    # Damage of the same size that the list itself cannot show: a label changed.
    text = (out / "train.txt").read_text()
    (out / "train.txt").write_text(text.replace("cat/0.jpg 0", "cat/0.jpg 1"))
    assert main(["dali", str(src), str(out), "--workers", "1", "--verify"]) == 2
    assert "train.txt" in _one_error_line(capsys.readouterr().err)
    assert main(["dali", str(src), str(out), "--workers", "1", "--verify"]) == 0  # rebuilt
    assert "cat/0.jpg 0" in (out / "train.txt").read_text()


# ---------------------------------------------------------------- 2. link loops; 4. special files


def test_links_are_followed_once_per_real_folder_and_file(tmp_path) -> None:
    src = _tree(tmp_path / "src", per_class=4)
    split = src / "train"
    (split / "cat" / "loop").symlink_to("..")  # back up the tree: would multiply the data
    (split / "dog" / "cats").symlink_to("../cat")  # another class's folder
    (split / "dog" / "same.jpg").symlink_to("0.jpg")  # a second name of a file already read
    elsewhere = _tree(tmp_path / "elsewhere", per_class=1) / "train" / "cat"
    (split / "bird").symlink_to(elsewhere)  # a class folder that is a link: read
    s = resolve(src, "train")
    assert s.classes == ["bird", "cat", "dog"]
    assert s.files == ["bird/0.jpg", *(f"cat/{k}.jpg" for k in range(4)), *(f"dog/{k}.jpg" for k in range(4))]
    assert s.labels.tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert sorted(e["path"] for e in s.excluded) == ["cat/loop", "dog/cats", "dog/same.jpg"]


def test_dali_links_count_each_real_file_once(tmp_path) -> None:
    src = _tree(tmp_path / "src", per_class=4)
    (src / "train" / "cat" / "loop").symlink_to("..")
    assert main(["dali", str(src), str(tmp_path / "out"), "--workers", "1"]) == 0
    assert len((tmp_path / "out" / "train.txt").read_text().splitlines()) == 8
    assert _meta(tmp_path / "out" / "train.json")["num_samples"] == 8


@pytest.mark.ffcv
def test_ffcv_links_count_each_real_file_once(need_ffcv, tmp_path) -> None:
    src = _tree(tmp_path / "src", per_class=4)
    (src / "train" / "cat" / "loop").symlink_to("..")
    assert main(["ffcv", str(src), str(tmp_path / "out"), *RAW, "--verify"]) == 0
    meta = _meta((tmp_path / "out" / BETON).with_suffix(".json"))
    assert meta["num_samples"] == 8 and [s["path"] for s in meta["skipped"]] == ["cat/loop"]


def test_special_files_are_never_opened(tmp_path) -> None:
    src = _tree(tmp_path / "src")
    cat = src / "train" / "cat"
    os.mkfifo(cat / "fifo.jpg")  # reading it would wait forever for a writer
    sock = socket.socket(socket.AF_UNIX)
    here = os.getcwd()
    try:
        os.chdir(cat)  # a relative name: a socket path must be short
        sock.bind("sock.jpg")
    finally:
        os.chdir(here)
    (cat / "dev.jpg").symlink_to("/dev/zero")
    (cat / "gone.jpg").symlink_to("no-such-file.jpg")
    s = resolve(src, "train")
    assert all(f.split("/")[1][0].isdigit() for f in s.files) and len(s.files) == 6
    assert sorted(e["path"] for e in s.excluded) == ["cat/dev.jpg", "cat/fifo.jpg", "cat/gone.jpg", "cat/sock.jpg"]
    # The whole command, in its own process: on a FIFO an open() would hang, so it is given a (generous) limit.
    r = subprocess.run([sys.executable, "-m", "data_prep", "dali", str(src), str(tmp_path / "out"), "--workers", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    sock.close()
    assert r.returncode == 0, r.stderr[-2000:]
    skipped = {e["path"]: e["error"] for e in _meta(tmp_path / "out" / "train.json")["skipped"]}
    assert set(skipped) == {"cat/dev.jpg", "cat/fifo.jpg", "cat/gone.jpg", "cat/sock.jpg"}
    assert "not a regular file" in skipped["cat/fifo.jpg"]


# ---------------------------------------------------------------- 5. unwritable outputs, before the work


@pytest.fixture
def read_only_fs(tmp_path):
    mnt = tmp_path / "ro"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not root'}); /proc and a file parent still run")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_read_only_output_is_refused_before_the_work(tmp_path, read_only_fs, monkeypatch, capsys) -> None:
    import data_prep.dali_prep as D
    import data_prep.ffcv_prep as F

    src = _tree(tmp_path / "src")
    for module in (D, F):
        monkeypatch.setattr(module, "resolve", lambda *a: pytest.fail("the source was read before the output check"))
    for cmd in ("dali", "ffcv"):
        assert main([cmd, str(src), str(read_only_fs / "out")]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert str(read_only_fs / "out") in line and "Read-only file system" in line


# ---------------------------------------------------------------- 6. alpha: one rule everywhere


def _rgba(path: Path) -> np.ndarray:
    """A noisy RGBA PNG whose alpha varies from 0 to 255; returns its RGBA pixels."""
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (24, 30, 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, 30).astype(np.uint8)[None, :]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, "RGBA").save(path)
    return rgba


@pytest.mark.ffcv
def test_rgba_png_is_stored_and_verified_as_pil_convert_rgb(need_ffcv, tmp_path) -> None:
    from advft.data.datasets import _decode_rgb
    from data_prep.ffcv_read import stored_samples

    src = _tree(tmp_path / "src", per_class=1)
    rgba = _rgba(src / "train" / "cat" / "alpha.png")
    rule = np.asarray(Image.open(src / "train" / "cat" / "alpha.png").convert("RGB"))
    assert np.array_equal(rule, rgba[..., :3])  # the rule: alpha dropped, no blending
    assert np.array_equal(read_rgb(src / "train" / "cat" / "alpha.png"), rule)
    assert np.array_equal(np.asarray(_decode_rgb(str(src / "train" / "cat" / "alpha.png"))), rule)
    for mode in ("raw", "jpg"):
        out = tmp_path / mode
        assert main(["ffcv", str(src), str(out), "--write-mode", mode, "--max-res", "0", "--workers", "1",
                     "--verify"]) == 0
        if mode == "raw":
            (beton,) = out.glob("*.beton")
            img, _, _ = list(stored_samples(beton))[1]  # cat/0.jpg, cat/alpha.png, dog/0.jpg
            assert np.array_equal(img, rule)


@pytest.mark.dali
def test_rgba_png_reads_the_same_in_dali(need_dali, tmp_path) -> None:
    from nvidia.dali import fn, pipeline_def, types

    src = _tree(tmp_path / "src", per_class=1)
    rgba = _rgba(src / "train" / "cat" / "alpha.png")
    assert main(["dali", str(src), str(tmp_path / "out"), "--shards", "1", "--workers", "1", "--verify"]) == 0

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        encoded, _ = fn.readers.file(files=[str(src / "train" / "cat" / "alpha.png")])
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    (out,) = p.run()
    assert np.array_equal(np.asarray(out.at(0)), rgba[..., :3])


# ---------------------------------------------------------------- 3. temporary files of dead writers


def test_only_temporary_files_of_dead_writers_on_this_host_are_removed(tmp_path) -> None:
    from data_prep.outputs import remove_dead_tmp, tmp_name

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped: its pid names no process now
    mine = tmp_name(tmp_path / "a.beton")  # this live process
    theirs = mine.with_name(mine.name.rsplit("-", 1)[0] + f"-{dead.pid}")
    other_host = tmp_path / f".a.beton.tmp-otherhost-{dead.pid}"
    for f in (mine, theirs, other_host):
        f.write_bytes(b"partial")
    assert remove_dead_tmp(tmp_path) == [theirs.name]
    assert mine.exists() and other_host.exists() and not theirs.exists()
