"""data_prep outputs that never lie: "done" only when written, verified when asked and made from the source
as it is now; hostile trees (link loops, FIFOs, sockets, devices); unwritable outputs found before the work;
one rule for alpha channels.

Every tree is made here, a few tiny images. Tests that need FFCV or DALI fail instead of skipping under
ADVFT_REQUIRE_EXTRAS=1 (CI). Each test records what it observed for RELIABILITY.md (tests/faults/record.py)
before it asserts.
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
from faults.record import record

ROOT = Path(__file__).resolve().parent.parent
RAW = ["--write-mode", "raw", "--max-res", "0", "--workers", "1"]
BETON = "train_full_0.50_90_raw.beton"
TRUSTED = "data_prep output trusted only when right"
LOOP = "symlink loop in the source"


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


def _error_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("data_prep:")]


def _one_error_line(err: str) -> str:
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _said(err: str) -> str:
    """The last line the command said, for the report."""
    return (_error_lines(err) or err.strip().splitlines() or ["-"])[-1]


# ---------------------------------------------------------------- 1. done = written, verified, current


@pytest.mark.ffcv
def test_ffcv_sidecar_only_after_verification_and_a_rerun_with_verify_verifies(need_ffcv, tmp_path, monkeypatch,
                                                                              capsys) -> None:
    import data_prep.ffcv_prep as F
    from data_prep.sources import PrepError

    src, out = _tree(tmp_path / "src"), tmp_path / "out"
    sidecar = (out / BETON).with_suffix(".json")

    def failing(*_a, **_k):
        raise PrepError("verification failed here")

    monkeypatch.setattr(F, "verify_beton", failing)
    rc_failed = main(["ffcv", str(src), str(out), *RAW, "--verify"])
    err = capsys.readouterr().err
    sidecar_after_failure = sidecar.exists()
    monkeypatch.undo()
    rc_rerun = main(["ffcv", str(src), str(out), *RAW, "--verify"])
    complete = sidecar.exists() and _meta(sidecar).get("complete") is True
    # A rerun with --verify reads it back again (and fails on damage; see the next test).
    monkeypatch.setattr(F, "verify_beton", failing)
    rc_again = main(["ffcv", str(src), str(out), *RAW, "--verify"])
    sidecar_after_second = sidecar.exists()
    ok = rc_failed == 2 and "verification failed here" in err and not sidecar_after_failure and rc_rerun == 0 \
        and complete and rc_again == 2 and not sidecar_after_second
    record(TRUSTED, "ffcv: --verify fails, then reruns",
           f"failed check: exit {rc_failed}, sidecar left: {sidecar_after_failure}; rerun: exit {rc_rerun}, "
           f"complete: {complete}; a later rerun with --verify verified again: exit {rc_again}", ok,
           f"sidecar after the second failure: {sidecar_after_second}")
    assert rc_failed == 2
    assert "verification failed here" in err
    assert not sidecar_after_failure  # not "done": the next run rebuilds
    assert rc_rerun == 0
    assert complete
    assert rc_again == 2
    assert not sidecar_after_second


@pytest.mark.ffcv
def test_ffcv_rerun_with_verify_fails_on_damaged_bytes_of_the_same_size(need_ffcv, tmp_path, capsys) -> None:
    src, out = _tree(tmp_path / "src"), tmp_path / "out"
    assert main(["ffcv", str(src), str(out), *RAW]) == 0
    beton = out / BETON
    data = bytearray(beton.read_bytes())
    table_end = len(data) - 64  # somewhere in the sample data, not the header or the allocation table
    data[table_end // 2 : table_end // 2 + 8] = bytes(255 - b for b in data[table_end // 2 : table_end // 2 + 8])
    beton.write_bytes(bytes(data))
    size_kept = beton.stat().st_size == len(data)
    rc_damaged = main(["ffcv", str(src), str(out), *RAW, "--verify"])
    err = capsys.readouterr().err
    lines = _error_lines(err)
    named = len(lines) == 1 and "Traceback" not in err and str(beton) in lines[0] and "damaged" in lines[0]
    sidecar_left = beton.with_suffix(".json").exists()
    rc_rebuilt = main(["ffcv", str(src), str(out), *RAW, "--verify"])  # rebuilt, and right
    rebuilt = beton.with_suffix(".json").exists()
    record(TRUSTED, "ffcv: 8 bytes of the .beton inverted, same size, rerun --verify",
           f"exit {rc_damaged}: {_said(err)}; the next rerun: exit {rc_rebuilt}",
           size_kept and rc_damaged == 2 and named and not sidecar_left and rc_rebuilt == 0 and rebuilt,
           f"same size: {size_kept}; sidecar removed: {not sidecar_left}; rebuilt and verified: {rebuilt}")
    assert rc_damaged == 2
    line = _one_error_line(err)
    assert str(beton) in line and "damaged" in line
    assert not sidecar_left
    assert rc_rebuilt == 0
    assert rebuilt


@pytest.mark.ffcv
def test_ffcv_changed_source_rebuilds(need_ffcv, tmp_path) -> None:
    src, out = _tree(tmp_path / "src"), tmp_path / "out"
    sidecar = (out / BETON).with_suffix(".json")

    def convert(*extra: str) -> tuple[int, int, str]:
        rc = main(["ffcv", str(src), str(out), *RAW, *extra])
        meta = _meta(sidecar) if sidecar.exists() else {}
        return rc, meta.get("num_samples", -1), meta.get("sha256", "")

    first = convert()
    _image(src / "train" / "dog" / "new.jpg", 99)
    added = convert()
    (src / "train" / "cat" / "0.jpg").unlink()
    removed = convert()
    _image(src / "train" / "cat" / "1.jpg", 55, size=(20, 30))  # same name, other pixels
    changed = convert("--verify")
    steps = [first, added, removed, changed]
    ok = [s[0] for s in steps] == [0] * 4 and [s[1] for s in steps[:3]] == [6, 7, 6] and changed[2] != removed[2]
    record(TRUSTED, "ffcv: an image added, one removed, one changed in the source",
           f"samples {first[1]} -> {added[1]} -> {removed[1]}; changed image: .beton digest "
           f"{'changed' if changed[2] != removed[2] else 'unchanged'}", ok, f"exits {[s[0] for s in steps]}")
    assert [s[0] for s in steps] == [0] * 4
    assert first[1] == 6
    assert added[1] == 7
    assert removed[1] == 6
    assert changed[2] != removed[2]


@pytest.mark.dali
def test_dali_changed_source_rebuilds_and_damaged_list_fails_verify(tmp_path, need_dali, capsys) -> None:
    src, out = _tree(tmp_path / "src"), tmp_path / "out"
    args = ["dali", str(src), str(out), "--workers", "1"]
    rc_first = main(args)
    (src / "train" / "cat" / "2.jpg").unlink()
    _image(src / "train" / "dog" / "9.jpg", 77)
    rc_changed = main([*args, "--verify"])
    listed = [line.split()[0] for line in (out / "train.txt").read_text().splitlines()]
    current = "cat/2.jpg" not in listed and "dog/9.jpg" in listed and len(listed) == 6
    record(TRUSTED, "dali: an image removed and one added in the source",
           f"exits {rc_first}, {rc_changed}; the list names {len(listed)} files, the removed one: "
           f"{'cat/2.jpg' in listed}, the added one: {'dog/9.jpg' in listed}",
           rc_first == 0 and rc_changed == 0 and current)
    assert rc_first == 0 and rc_changed == 0
    assert current, listed
    # Damage of the same size that the list itself cannot show: a label changed.
    text = (out / "train.txt").read_text()
    (out / "train.txt").write_text(text.replace("cat/0.jpg 0", "cat/0.jpg 1"))
    rc_damaged = main([*args, "--verify"])
    err = capsys.readouterr().err
    lines = _error_lines(err)
    named = len(lines) == 1 and "Traceback" not in err and "train.txt" in lines[0]
    rc_rebuilt = main([*args, "--verify"])  # rebuilt
    restored = "cat/0.jpg 0" in (out / "train.txt").read_text()
    record(TRUSTED, "dali: a label in train.txt changed (same size), rerun --verify",
           f"exit {rc_damaged}: {_said(err)}; the next rerun: exit {rc_rebuilt}, label restored: {restored}",
           rc_damaged == 2 and named and rc_rebuilt == 0 and restored)
    assert rc_damaged == 2
    assert "train.txt" in _one_error_line(err)
    assert rc_rebuilt == 0
    assert restored


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
    want = ["bird/0.jpg", *(f"cat/{k}.jpg" for k in range(4)), *(f"dog/{k}.jpg" for k in range(4))]
    skipped = sorted(e["path"] for e in s.excluded)
    ok = s.classes == ["bird", "cat", "dog"] and s.files == want and \
        s.labels.tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2] and skipped == ["cat/loop", "dog/cats", "dog/same.jpg"]
    record(LOOP, "data_prep's scan: a loop up the tree, a link to another class, a second name of a file, a "
                 "linked class folder", f"{len(s.files)} files of 9 real ones, classes {s.classes}", ok,
           f"skipped and recorded: {skipped}")
    assert s.classes == ["bird", "cat", "dog"]
    assert s.files == want
    assert s.labels.tolist() == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert skipped == ["cat/loop", "dog/cats", "dog/same.jpg"]


def test_dali_links_count_each_real_file_once(tmp_path) -> None:
    src = _tree(tmp_path / "src", per_class=4)
    (src / "train" / "cat" / "loop").symlink_to("..")
    rc = main(["dali", str(src), str(tmp_path / "out"), "--workers", "1"])
    listed = len((tmp_path / "out" / "train.txt").read_text().splitlines()) if rc == 0 else -1
    samples = _meta(tmp_path / "out" / "train.json")["num_samples"] if rc == 0 else -1
    record(LOOP, "dali: ln -s .. SRC/train/cat/loop", f"exit {rc}; {listed} files listed, {samples} samples",
           rc == 0 and listed == 8 and samples == 8, "8 real images")
    assert rc == 0
    assert listed == 8
    assert samples == 8


@pytest.mark.ffcv
def test_ffcv_links_count_each_real_file_once(need_ffcv, tmp_path) -> None:
    src = _tree(tmp_path / "src", per_class=4)
    (src / "train" / "cat" / "loop").symlink_to("..")
    rc = main(["ffcv", str(src), str(tmp_path / "out"), *RAW, "--verify"])
    meta = _meta((tmp_path / "out" / BETON).with_suffix(".json")) if rc == 0 else {}
    skipped = [s["path"] for s in meta.get("skipped", [])]
    record(LOOP, "ffcv --verify: ln -s .. SRC/train/cat/loop", f"exit {rc}; {meta.get('num_samples')} samples",
           rc == 0 and meta.get("num_samples") == 8 and skipped == ["cat/loop"], f"8 real images; skipped: {skipped}")
    assert rc == 0
    assert meta["num_samples"] == 8 and skipped == ["cat/loop"]


def test_training_folder_loaders_read_the_files_data_prep_converts(tmp_path) -> None:
    from advft.data.dali_loader import _scan_folder
    from advft.data.datasets import build_dataset

    src = _tree(tmp_path / "src", per_class=4)
    split = src / "train"
    (split / "cat" / "loop").symlink_to("..")
    (split / "dog" / "same.jpg").symlink_to("0.jpg")
    os.mkfifo(split / "dog" / "fifo.jpg")  # listed by name, decoding it would wait forever
    ds = build_dataset("folder", str(src), "train", resolution=16)
    folder = [Path(f).relative_to(split).as_posix() for f, _ in ds.samples]
    _, dali, dali_labels = _scan_folder(split)
    prep = resolve(src, "train")
    same_files = folder == dali == prep.files and len(prep.files) == 8
    same_labels = ds.labels.tolist() == dali_labels.tolist() == prep.labels.tolist()
    record(LOOP, "the training loaders (folder dataset, DALI reading a folder): ln -s .. SRC/train/cat/loop, a "
                 "second name of a file, a FIFO", f"folder dataset {len(folder)} samples, DALI's folder scan "
           f"{len(dali)}, data_prep {len(prep.files)}", same_files and same_labels,
           f"8 real images; the same files and labels as data_prep: {same_files and same_labels}")
    assert len(folder) == 8, folder[:12]
    assert folder == dali == prep.files
    assert same_labels
    assert ds[7][0].shape == (3, 16, 16)


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
    special = ["cat/dev.jpg", "cat/fifo.jpg", "cat/gone.jpg", "cat/sock.jpg"]
    excluded = sorted(e["path"] for e in s.excluded)
    # The whole command, in its own process: on a FIFO an open() would hang, so it is given a (generous) limit.
    try:
        r = subprocess.run([sys.executable, "-m", "data_prep", "dali", str(src), str(tmp_path / "out"), "--workers",
                            "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        rc, err = r.returncode, r.stderr
    except subprocess.TimeoutExpired:
        rc, err = None, "hung (no exit within the limit)"
    finally:
        sock.close()
    skipped = {e["path"]: e["error"] for e in _meta(tmp_path / "out" / "train.json")["skipped"]} if rc == 0 else {}
    images_only = all(f.split("/")[1][0].isdigit() for f in s.files) and len(s.files) == 6
    ok = images_only and excluded == special and rc == 0 and sorted(skipped) == special \
        and "not a regular file" in skipped.get("cat/fifo.jpg", "")
    record("special files in the source", "a FIFO, a socket, a link to /dev/zero, a dangling link, all *.jpg (dali)",
           f"exit {rc}; {len(s.files)} regular images read; skipped: {sorted(skipped)}", ok,
           f"the FIFO's record: {skipped.get('cat/fifo.jpg', '-')}; {_said(err) if rc else ''}")
    assert images_only
    assert excluded == special
    assert rc == 0, err[-2000:]
    assert set(skipped) == set(special)
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
        rc = main([cmd, str(src), str(read_only_fs / "out")])
        err = capsys.readouterr().err
        lines = _error_lines(err)
        clear = len(lines) == 1 and "Traceback" not in err and str(read_only_fs / "out") in lines[0] \
            and "Read-only file system" in lines[0]
        record("unwritable output", f"{cmd}: the output folder on a read-only file system", f"exit {rc}: {_said(err)}",
               rc == 2 and clear, "refused before the source was read (reading it fails the test)")
        assert rc == 2
        line = _one_error_line(err)
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
    dropped = np.array_equal(rule, rgba[..., :3])  # the rule: alpha dropped, no blending
    prep_reads = np.array_equal(read_rgb(src / "train" / "cat" / "alpha.png"), rule)
    loader_reads = np.array_equal(np.asarray(_decode_rgb(str(src / "train" / "cat" / "alpha.png"))), rule)
    rcs, stored = {}, False
    for mode in ("raw", "jpg"):
        out = tmp_path / mode
        rcs[mode] = main(["ffcv", str(src), str(out), "--write-mode", mode, "--max-res", "0", "--workers", "1",
                          "--verify"])
        if mode == "raw" and rcs[mode] == 0:
            (beton,) = out.glob("*.beton")
            img, _, _ = list(stored_samples(beton))[1]  # cat/0.jpg, cat/alpha.png, dog/0.jpg
            stored = np.array_equal(img, rule)
    ok = dropped and prep_reads and loader_reads and rcs == {"raw": 0, "jpg": 0} and stored
    record("alpha channel", "an RGBA PNG (alpha 0..255) through ffcv raw and jpg with --verify",
           f"--verify exits {rcs}; stored raw pixels == convert('RGB'): {stored}", ok,
           f"convert('RGB') drops alpha: {dropped}; data_prep reads it so: {prep_reads}; the folder loader: "
           f"{loader_reads}")
    assert dropped
    assert prep_reads
    assert loader_reads
    assert rcs == {"raw": 0, "jpg": 0}
    assert stored


@pytest.mark.dali
def test_rgba_png_reads_the_same_in_dali(need_dali, tmp_path) -> None:
    from nvidia.dali import fn, pipeline_def, types

    src = _tree(tmp_path / "src", per_class=1)
    rgba = _rgba(src / "train" / "cat" / "alpha.png")
    rc = main(["dali", str(src), str(tmp_path / "out"), "--shards", "1", "--workers", "1", "--verify"])

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        encoded, _ = fn.readers.file(files=[str(src / "train" / "cat" / "alpha.png")])
        return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    (out,) = p.run()
    same = np.array_equal(np.asarray(out.at(0)), rgba[..., :3])
    record("alpha channel", "the RGBA PNG through dali --shards 1 --verify and DALI's decoder",
           f"--verify exit {rc}; DALI's RGB == alpha dropped: {same}", rc == 0 and same)
    assert rc == 0
    assert same


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
    removed = remove_dead_tmp(tmp_path)
    kept = mine.exists() and other_host.exists()
    record("data_prep writer fault", "temporary files of a dead writer, this live process and another host",
           f"removed {removed}", removed == [theirs.name] and kept and not theirs.exists(),
           f"this process's and the other host's kept: {kept}")
    assert removed == [theirs.name]
    assert mine.exists() and other_host.exists() and not theirs.exists()
