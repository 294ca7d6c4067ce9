"""Images per second of the data loaders on the same JPEGs with the same training transform.

    .venv/bin/python benchmarks/loaders.py --out loaders.json               # generated ImageNet-like tree
    .venv/bin/python benchmarks/loaders.py --src /data/imagenet-2k             # a tree of yours (SRC/train/<class>/*)
    .venv/bin/python benchmarks/loaders.py --device cuda                      # on a GPU: DALI decodes there (mixed)

Loaders (all: random-resized-crop to --resolution, area (0.08, 1), aspect 3/4..4/3, horizontal flip,
batches of --batch images; pixels never normalised):
- ``folder``: advft's own ``make_loader`` over ``ImageFolderDataset`` (PIL decode, torch resize, seeded
  per-sample augmentation), ``--workers`` DataLoader processes;
- ``torchvision``: the textbook baseline, ``ImageFolder`` + ``RandomResizedCrop`` + ``RandomHorizontalFlip``
  + ``ToTensor`` in a shuffled DataLoader with ``--workers`` persistent processes;
- ``ffcv``: ``make_ffcv_loader`` on the ``.beton`` of ``data_prep ffcv``'s defaults (longest side <= 500,
  half the images stored as JPEG quality 90 and half as raw pixels, the ffcv-imagenet recipe), ``--workers``
  threads; ``ffcv_jpg``: the same with every image stored as JPEG quality 90, so FFCV decodes every image
  as the others do;
- ``dali``: ``make_dali_loader`` on the file list of ``data_prep dali`` (the source JPEGs themselves),
  ``--workers`` threads; decoding on the CPU, or on the GPU (``mixed``) with ``--device cuda``.

Method. The tree is generated (or taken from ``--src``: all of it is converted and more than one epoch is
the default warm-up, so give a subset of a few thousand images, not all of ImageNet), then converted with
data_prep (timed). The images are read from the page cache after the warm-up: this measures decoding
and augmentation, not a file system. Each
measurement runs in a fresh process: build the loader, take ``--warmup-batches`` batches, then time
``--batches`` batches. Where the timed batches lie is ``--window`` (when ``--warmup-batches`` is 0):
- ``steady`` (default): the warm-up is one whole epoch and the first few batches of the second (worker
  start-up, the page cache filling, FFCV's numba compilation in its first epoch, and each loader's first
  epoch boundary stay out of the clock), and the timed batches lie inside the second epoch. This is
  what a loader sustains between epoch boundaries, i.e. nearly all of training: an ImageNet epoch is
  5,000 batches of 256. Needs ``--batches`` < the batches of one epoch (``--images`` / ``--batch``).
- ``epoch-start``: the warm-up is exactly one epoch, so the clock starts at the boundary and includes
  what a loader pays once per epoch (DALI builds a pipeline per epoch, and the previous one has already
  decoded its prefetch queue's batches beyond the end). With a small tree that cost lands on a few
  timed batches, thousands of times more often than on ImageNet; use it to see the cost, not the rate.
The JSON and the output give how many epoch boundaries the timed batches include.
Measurements are interleaved: repeat r runs
every loader once, in an order rotated by r, so a change in the machine's load (shared cores) spreads
over all loaders instead of landing on one. Per loader: median, min and max of the repeats; ratios
are medians of the per-repeat ratios (each from measurements taken close together), with their range.
CPU seconds (the process and its worker processes, from /proc) per image are reported too: unlike
images/s, they barely depend on what else runs on the machine. The JSON holds every measurement,
the machine (CPU model, cores, load before each measurement, ``uptime`` before and after), versions,
git commit and the command line.

Exit status: 0, or 1 when a measurement failed (the JSON then holds its error).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: advft and data_prep live in the repository root
    sys.path.insert(0, str(ROOT))

LOADERS = ("folder", "torchvision", "ffcv", "ffcv_jpg", "dali")
NEEDS = {"ffcv": "ffcv", "ffcv_jpg": "ffcv", "dali": "dali"}
SPLIT = "train"
RESULT_PREFIX = "RESULT "  # marks the measuring process's result line among library output
TREE_RECORD = "tree.json"


# ---------------------------------------------------------------- the generated tree


def synthetic_photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A uint8 (height, width, 3) image with some of a photo's structure: smooth colour gradients,
    a few flat shapes with sharp edges, mid-frequency texture and sensor-like noise. Saved as JPEG
    quality 90 it takes about as many bytes per pixel as an ImageNet photo, so decoding costs about
    as much."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(-width // 4, width)), int(rng.integers(-height // 4, height))
        x1, y1 = x0 + int(rng.integers(width // 10, width // 2)), y0 + int(rng.integers(height // 10, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse([x0, y0, x1, y1], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], fill=colour)
        else:
            corners = rng.integers(0, [width, height], (int(rng.integers(3, 7)), 2))
            draw.polygon([(int(x), int(y)) for x, y in corners], fill=colour)
    coarse = rng.normal(0, 40, (max(1, height // 4), max(1, width // 4), 3))
    texture = np.asarray(Image.fromarray((coarse + 128).clip(0, 255).astype(np.uint8)).resize((width, height)),
                         np.float32) - 128
    pixels = np.asarray(img, np.float32) + 0.5 * texture + rng.normal(0, 16, (height, width, 3))
    return pixels.clip(0, 255).astype(np.uint8)


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width): landscape 400..500 x 330..375 pixels, one in five portrait (ImageNet-like)."""
    long_side, short_side = int(rng.integers(400, 501)), int(rng.integers(330, 376))
    return (long_side, short_side) if rng.random() < 0.2 else (short_side, long_side)


def _write_image(task: tuple[Path, int, int]) -> None:
    path, seed, index = task
    from PIL import Image

    rng = np.random.default_rng([seed, index])  # image i depends on (seed, i) only, not on the worker count
    Image.fromarray(synthetic_photo(rng, *_image_size(rng))).save(path, format="JPEG", quality=90)


def generate_tree(root: Path, images: int, classes: int, seed: int, workers: int) -> dict[str, Any]:
    """``root/train/class<k>/img<i>.JPEG``, image i in class i mod ``classes``; a pure function of
    (images, classes, seed). Kept and reused when ``root`` holds a tree of the same settings."""
    settings = {"images": images, "classes": classes, "seed": seed, "generator": "synthetic_photo v1"}
    record_path = root / TREE_RECORD
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("settings") == settings:
            return {**record, "reused": True}
    if (root / SPLIT).exists():
        shutil.rmtree(root / SPLIT)
    t0 = time.perf_counter()
    tasks = []
    for i in range(images):
        folder = root / SPLIT / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        tasks.append((folder / f"img{i:05d}.JPEG", seed, i))
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            pool.map(_write_image, tasks, chunksize=16)
    else:
        for task in tasks:
            _write_image(task)
    record = {"settings": settings, "seconds": round(time.perf_counter() - t0, 2)}
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return {**record, "reused": False}


def describe_tree(split_dir: Path, sample: int = 200) -> dict[str, Any]:
    """Image count, classes, and the mean file size and pixel size of up to ``sample`` images."""
    from PIL import Image

    from advft.data.folder_scan import IMAGE_EXTENSIONS

    files = sorted(p for p in split_dir.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS))
    picked = files[:: max(1, len(files) // sample)][:sample]
    sizes = []
    for p in picked:
        with Image.open(p) as im:
            sizes.append(im.size)
    return {
        "path": str(split_dir),
        "images": len(files),
        "classes": sum(1 for p in split_dir.iterdir() if p.is_dir()),
        "mean_bytes": round(float(np.mean([p.stat().st_size for p in picked]))) if picked else 0,
        "mean_width": round(float(np.mean([w for w, _ in sizes]))) if sizes else 0,
        "mean_height": round(float(np.mean([h for _, h in sizes]))) if sizes else 0,
    }


# ---------------------------------------------------------------- conversion


def convert(src: Path, work: Path, loaders: list[str], workers: int) -> dict[str, dict[str, Any]]:
    """The inputs FFCV and DALI read, made by data_prep in ``work``; {loader: path, seconds, ...}.
    Outputs already there with the same settings are reused (data_prep skips them: seconds ~ 0)."""
    from data_prep.dali_prep import DALISettings, prepare
    from data_prep.ffcv_prep import FFCVSettings
    from data_prep.ffcv_prep import convert as ffcv_convert
    from data_prep.outputs import read_json

    made: dict[str, dict[str, Any]] = {}
    for name in loaders:
        t0 = time.perf_counter()
        if name in ("ffcv", "ffcv_jpg"):
            settings = FFCVSettings(split=SPLIT) if name == "ffcv" else FFCVSettings(split=SPLIT, write_mode="jpg")
            path = ffcv_convert(src, work / "ffcv", settings, workers=workers)
            meta = read_json(path.with_suffix(".json")) or {}
            made[name] = {"path": str(path), "bytes": path.stat().st_size, "stored": meta.get("stored"),
                          "settings": meta.get("settings")}
        elif name == "dali":
            paths = prepare(src, work / "dali", DALISettings(split=SPLIT), workers=workers)
            meta = read_json(paths.sidecar) or {}
            made[name] = {"path": str(paths.file_list), "settings": meta.get("settings")}
        else:
            continue
        made[name]["seconds"] = round(time.perf_counter() - t0, 2)
        made[name]["num_samples"] = meta.get("num_samples")
        made[name]["data_prep_seconds"] = meta.get("seconds")  # of the run that wrote it (maybe an earlier one)
    return made


# ---------------------------------------------------------------- one measurement (in its own process)


def _textbook_loader(split_dir: Path, batch: int, resolution: int, workers: int, seed: int,
                     device: Any, channels_last: bool = False) -> Iterator[tuple[Any, Any]]:
    """torchvision's ImageFolder example: PIL decode, RandomResizedCrop, flip, ToTensor in the workers.
    With ``channels_last`` each batch is converted in the training process, as PyTorch's channels-last
    tutorial does (``x.to(memory_format=torch.channels_last)``)."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    view = transforms.Compose([transforms.RandomResizedCrop(resolution), transforms.RandomHorizontalFlip(),
                               transforms.ToTensor()])
    loader = DataLoader(datasets.ImageFolder(str(split_dir), transform=view), batch_size=batch, shuffle=True,
                        num_workers=workers, drop_last=True, persistent_workers=workers > 0,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    while True:
        for x, y in loader:
            yield x.to(device, non_blocking=True, memory_format=memory_format), y.to(device, non_blocking=True)


def build_loader(name: str, plan: dict[str, Any]) -> Iterator[tuple[Any, Any]]:
    """The infinite training stream of loader ``name`` with the settings of ``plan``."""
    import torch

    device = torch.device(plan["device"])
    common = {"global_batch": plan["batch"], "seed": plan["seed"], "train": True, "transform": "rrc_flip",
              "resolution": plan["resolution"], "num_workers": plan["workers"], "device": device,
              "channels_last": plan.get("channels_last", False)}
    if name == "folder":
        from advft.data.datasets import ImageFolderDataset
        from advft.data.loader import make_loader

        dataset = ImageFolderDataset(plan["tree"], SPLIT, resolution=plan["resolution"])
        return make_loader(dataset, **common)
    if name == "torchvision":
        return _textbook_loader(Path(plan["tree"]) / SPLIT, plan["batch"], plan["resolution"], plan["workers"],
                                plan["seed"], device, common["channels_last"])
    if name in ("ffcv", "ffcv_jpg"):
        from advft.data.ffcv_loader import make_ffcv_loader

        return make_ffcv_loader(plan["inputs"][name]["path"], **common)
    if name == "dali":
        from advft.data.dali_loader import make_dali_loader

        return make_dali_loader(plan["inputs"][name]["path"], **common)
    raise ValueError(f"unknown loader {name!r}; known: {LOADERS}")


def cpu_seconds(pid: int | None = None) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads) and of its live child processes
    (DataLoader workers), from /proc; None where there is no /proc."""
    pid = os.getpid() if pid is None else pid
    tick = os.sysconf("SC_CLK_TCK")
    total, found = 0, False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, ...
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
            found = True
    return total / tick if found else None


def measure(name: str, plan: dict[str, Any]) -> dict[str, Any]:
    """Builds loader ``name``, warms it up, and times ``plan["batches"]`` batches."""
    import torch

    # FFCV sets this to its worker count whatever we do; the same for everyone keeps the main
    # process's share (the float conversion of each batch) comparable.
    torch.set_num_threads(plan["workers"])
    cuda = plan["device"].startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    stream = build_loader(name, plan)
    x, _ = next(stream)
    sync()
    first_batch_s = time.perf_counter() - t0
    expected = (plan["batch"], 3, plan["resolution"], plan["resolution"])
    memory_format = torch.channels_last if plan.get("channels_last") else torch.contiguous_format
    if (tuple(x.shape) != expected or x.dtype != torch.float32 or not x.is_contiguous(memory_format=memory_format)
            or not 0.0 <= float(x.min()) <= float(x.max()) <= 1.0):
        raise RuntimeError(f"{name} gave x of shape {tuple(x.shape)}, {x.dtype}, strides {x.stride()}, range "
                           f"[{float(x.min())}, {float(x.max())}]; expected {expected}, float32, {memory_format}, [0, 1]")
    for _ in range(plan["warmup_batches"] - 1):
        next(stream)
    sync()
    warmup_s = time.perf_counter() - t0
    cpu0, t1 = cpu_seconds(), time.perf_counter()
    for _ in range(plan["batches"]):
        next(stream)
    sync()
    seconds = time.perf_counter() - t1
    cpu1 = cpu_seconds()
    images = plan["batches"] * plan["batch"]
    cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    return {
        "images_per_s": images / seconds,
        "seconds": seconds,
        "images": images,
        "cpu_s": cpu,
        "images_per_cpu_s": images / cpu if cpu else None,
        "first_batch_s": first_batch_s,
        "warmup_s": warmup_s,
    }


# ---------------------------------------------------------------- the run


WINDOWS = ("steady", "epoch-start")


def timing_window(per_epoch: int, batches: int, warmup_batches: int = 0, window: str = "steady") -> dict[str, int]:
    """Where the timed batches lie: ``warmup_batches`` (the batches taken before the clock starts) and
    ``epoch_boundaries`` (how many timed batches are the first of an epoch, so that they carry what a
    loader does once per epoch). ``warmup_batches`` 0 means the ``window``'s choice (see the module
    docstring). Raises ValueError when a steady window does not fit inside one epoch."""
    if window not in WINDOWS:
        raise ValueError(f"--window {window!r}: valid are {', '.join(WINDOWS)}")
    if per_epoch < 1 or batches < 1 or warmup_batches < 0:
        raise ValueError(f"need per_epoch >= 1, batches >= 1, warmup_batches >= 0 (got {per_epoch}, {batches}, "
                         f"{warmup_batches})")
    if not warmup_batches:
        if window == "epoch-start":
            warmup_batches = per_epoch
        elif batches >= per_epoch:
            raise ValueError(f"--batches {batches} do not fit inside one epoch of {per_epoch} batches after its "
                             f"first: give more --images (one epoch is --images / --batch batches), fewer "
                             f"--batches, or --window epoch-start")
        else:
            # past the first boundary, then the timed batches centred in what is left of the second epoch
            warmup_batches = per_epoch + max(1, (per_epoch - batches) // 2)
    boundaries = sum(1 for b in range(warmup_batches, warmup_batches + batches) if b % per_epoch == 0)
    return {"warmup_batches": warmup_batches, "epoch_boundaries": boundaries}


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Writes a benchmark's report (its folder made if needed) and says where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")


def interleaved(loaders: list[str], repeats: int) -> list[tuple[int, str]]:
    """(repeat, loader) in run order: every repeat runs each loader once, its order rotated by one."""
    n = len(loaders)
    return [(r, loaders[(r + k) % n]) for r in range(repeats) for k in range(n)]


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: list[dict[str, Any]], loaders: list[str], baselines: tuple[str, ...] = ("folder", "torchvision"),
              ) -> dict[str, Any]:
    """Per loader: n and the median/min/max of images/s and of images per CPU second. Per pair
    (loader vs baseline) and metric: the median and range of the ratios of the two measurements of
    each repeat (``ratios``: images/s; ``cpu_ratios``: images per CPU second)."""
    ok = [r for r in runs if "images_per_s" in r]
    by = {name: [r for r in ok if r["loader"] == name] for name in loaders}
    summary: dict[str, Any] = {"loaders": {}, "ratios": {}, "cpu_ratios": {}}
    for name, rs in by.items():
        if not rs:
            continue
        entry: dict[str, Any] = {"n": len(rs), "images_per_s": _spread([r["images_per_s"] for r in rs])}
        per_cpu = [r["images_per_cpu_s"] for r in rs if r.get("images_per_cpu_s")]
        if per_cpu:
            entry["images_per_cpu_s"] = _spread(per_cpu)
        entry["warmup_s"] = _spread([r["warmup_s"] for r in rs])
        summary["loaders"][name] = entry
    for key, metric in (("ratios", "images_per_s"), ("cpu_ratios", "images_per_cpu_s")):
        for base in baselines:
            base_of = {r["repeat"]: r[metric] for r in by.get(base, []) if r.get(metric)}
            if not base_of:
                continue
            ratios = {}
            for name, rs in by.items():
                paired = [r[metric] / base_of[r["repeat"]] for r in rs
                          if name != base and r["repeat"] in base_of and r.get(metric)]
                if paired:
                    ratios[name] = {"n": len(paired), **_spread(paired)}
            summary[key][f"vs_{base}"] = ratios
    return summary


def _available(name: str) -> str | None:
    """None when loader ``name`` can run here, else why not."""
    need = NEEDS.get(name)
    if need == "ffcv":
        from advft.data import ffcv_loader as module
    elif need == "dali":
        from advft.data import dali_loader as module
    else:
        return None
    return None if module.available() else f"{need} cannot be imported: {module.INSTALL_HINT}"


def _run_text(*argv: str) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10, cwd=ROOT).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, Any]:
    cpu_model = ""
    try:
        cpu_model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu_model = platform.processor()
    versions = {"python": platform.python_version()}
    import importlib.metadata

    for dist in ("torch", "torchvision", "numpy", "pillow", "ffcv", "numba", "opencv-python",
                 "nvidia-dali-cuda120", "nvidia-dali-cuda130"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return {
        "host": socket.gethostname(),
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": _run_text("nvidia-smi", "--query-gpu=name", "--format=csv,noheader") or None,
        "versions": versions,
        "git_commit": _run_text("git", "rev-parse", "HEAD") or None,
        "git_dirty": bool(_run_text("git", "status", "--porcelain", "--untracked-files=no")),
    }


def _measure_in_subprocess(name: str, plan_path: Path, timeout_s: float) -> dict[str, Any]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--measure", name, "--plan", str(plan_path)]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"no result within {timeout_s:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-2000:]}"}
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def _table(summary: dict[str, Any], unavailable: dict[str, str]) -> str:
    """Medians [min, max]; the ratios are per-repeat pairs (see ``summarize``), "-" for a loader and itself."""

    def ratio(key: str, base: str, name: str) -> str:
        r = summary[key].get(f"vs_{base}", {}).get(name)
        return f"{r['median']:5.2f} [{r['min']:.2f}, {r['max']:.2f}]" if r else f"{'-':>18}"

    rows = [(f"{'loader':<12} {'n':>2}  {'images/s':<24} {'x folder':<18} {'x torchvision':<18} "
             f"{'images/CPU-s':<24} {'CPU-s x folder':<18}")]
    for name, e in summary["loaders"].items():
        s = e["images_per_s"]
        c = e.get("images_per_cpu_s")
        per_cpu = f"{c['median']:7.1f} [{c['min']:.1f}, {c['max']:.1f}]" if c else "-"
        rows.append(f"{name:<12} {e['n']:>2}  {s['median']:7.1f} [{s['min']:.1f}, {s['max']:.1f}]".ljust(42)
                    + f"{ratio('ratios', 'folder', name):<18} {ratio('ratios', 'torchvision', name):<18} "
                    + f"{per_cpu:<24} {ratio('cpu_ratios', 'folder', name):<18}")
    rows += [f"{name:<12} unavailable: {why}" for name, why in unavailable.items()]
    return "\n".join(rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", help="an ImageFolder tree SRC/train/<class>/<image> to read instead of generating one")
    p.add_argument("--work", help="folder for the generated tree and the FFCV/DALI files; kept and reused "
                                  "(default: a temporary folder, deleted at the end)")
    p.add_argument("--images", type=int, default=2048, help="images to generate")
    p.add_argument("--classes", type=int, default=10, help="classes to generate")
    p.add_argument("--loaders", default=",".join(LOADERS), help=f"comma-separated subset of {','.join(LOADERS)}")
    p.add_argument("--batch", type=int, default=64, help="images per batch")
    p.add_argument("--batches", type=int, default=16, help="batches timed per measurement")
    p.add_argument("--warmup-batches", type=int, default=0, help="batches before timing (0: as --window says)")
    p.add_argument("--window", choices=WINDOWS, default="steady",
                   help="with --warmup-batches 0: time batches inside the second epoch (steady, default) or "
                        "from its first batch on, including what a loader pays per epoch (epoch-start)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per loader, interleaved")
    p.add_argument("--workers", type=int, default=2, help="worker processes (folder, torchvision) or threads")
    p.add_argument("--resolution", type=int, default=224, help="crop size")
    p.add_argument("--channels-last", action="store_true",
                   help="every loader delivers channels-last batches, as advft's engine asks by default "
                        "(run.channels_last); the textbook loader converts each batch as PyTorch's tutorial does")
    p.add_argument("--device", default="cpu", help="where batches end up: cpu, or cuda (DALI then decodes there)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="seconds one measurement may take")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement, in a child process
    p.add_argument("--plan", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.measure:
        plan = json.loads(Path(args.plan).read_text())
        print(RESULT_PREFIX + json.dumps(measure(args.measure, plan)), flush=True)
        return 0

    loaders = [s for s in args.loaders.split(",") if s]
    unknown = sorted(set(loaders) - set(LOADERS))
    if unknown or not loaders:
        print(f"error: unknown loaders {unknown}; known: {', '.join(LOADERS)}", file=sys.stderr)
        return 2
    if min(args.batch, args.batches, args.repeats, args.workers) < 1 or args.warmup_batches < 0:
        print("error: --batch, --batches, --repeats and --workers must be >= 1, --warmup-batches >= 0", file=sys.stderr)
        return 2
    if not args.src:  # a generated tree: check the window before generating anything
        try:
            timing_window(max(1, args.images // args.batch), args.batches, args.warmup_batches, args.window)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    command = " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(["loaders.py", *argv])
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="advft-bench-loaders-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, loaders, work, command)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, loaders: list[str], work: Path, command: str) -> int:
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    uptime_before = _run_text("uptime")
    unavailable = {name: why for name in loaders if (why := _available(name))}
    loaders = [name for name in loaders if name not in unavailable]

    if args.src:
        tree, generated = Path(args.src).expanduser().resolve(), None
    else:
        tree = work / "tree"
        print(f"generating {args.images} images in {tree} ...", file=sys.stderr)
        generated = generate_tree(tree, args.images, args.classes, args.seed, args.workers)
        if not generated["reused"]:
            # data_prep would take the files of an earlier tree at the same path as done.
            for stale in ("ffcv", "dali"):
                shutil.rmtree(work / stale, ignore_errors=True)
    data = describe_tree(tree / SPLIT)
    print(f"converting with data_prep ({', '.join(n for n in loaders if n in NEEDS) or 'nothing to convert'}) ...",
          file=sys.stderr)
    inputs = convert(tree, work, loaders, args.workers)
    differ = {name: made["num_samples"] for name, made in inputs.items() if made["num_samples"] != data["images"]}
    if differ:
        print(f"error: the converted files hold {differ} images, the tree {data['images']} (unreadable images, or "
              f"files of another tree in {work}: delete {work}/ffcv and {work}/dali)", file=sys.stderr)
        return 2
    per_epoch = data["images"] // args.batch
    if per_epoch < 1:
        print(f"error: {data['images']} images are fewer than one batch of {args.batch}", file=sys.stderr)
        return 2
    try:
        window = timing_window(per_epoch, args.batches, args.warmup_batches, args.window)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = {"tree": str(tree), "inputs": inputs, "batch": args.batch, "batches": args.batches,
            "warmup_batches": window["warmup_batches"], "workers": args.workers, "channels_last": args.channels_last,
            "resolution": args.resolution, "device": args.device, "seed": args.seed}
    plan_path = work / "plan.json"
    plan_path.write_text(json.dumps(plan, indent=1))

    runs: list[dict[str, Any]] = []
    for repeat, name in interleaved(loaders, args.repeats):
        load = os.getloadavg()
        result = _measure_in_subprocess(name, plan_path, args.timeout)
        runs.append({"repeat": repeat, "loader": name, "load_before": [round(v, 2) for v in load], **result})
        shown = f"{result['images_per_s']:.1f} images/s" if "images_per_s" in result else result["error"][-300:]
        print(f"repeat {repeat} {name:<12} {shown}  (load {load[0]:.2f})", file=sys.stderr)

    summary = summarize(runs, loaders)
    report = {
        "benchmark": "loaders",
        "command": command,
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "uptime_before": uptime_before,
        "uptime_after": _run_text("uptime"),
        "machine": machine(),
        "settings": {k: plan[k] for k in ("batch", "batches", "warmup_batches", "workers", "resolution", "device",
                                          "seed", "channels_last")} | {"repeats": args.repeats, "transform": "rrc_flip",
                                                      "window": args.window if not args.warmup_batches else "given",
                                                      "batches_per_epoch": per_epoch,
                                                      "epoch_boundaries_timed": window["epoch_boundaries"]},
        "data": {**data, "generated": generated},
        "prep": inputs,
        "unavailable": unavailable,
        **summary,
        "runs": runs,
    }
    print(_table(summary, unavailable))
    print(f"timed: batches {plan['warmup_batches']}..{plan['warmup_batches'] + args.batches - 1} ({per_epoch} per "
          f"epoch), {window['epoch_boundaries']} epoch boundaries among them")
    if inputs:
        print("data_prep: " + ", ".join(f"{name} {made['seconds']:.1f} s" for name, made in inputs.items()))
    print(f"{report['machine']['cpu_model']}, {report['machine']['cpus_usable']} usable CPUs; "
          f"uptime before: {uptime_before}; after: {report['uptime_after']}")
    if args.out:
        write_json(Path(args.out), report)
    return 1 if any("error" in r for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
