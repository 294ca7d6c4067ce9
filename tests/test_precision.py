"""run.precision = "auto": resolved once per run to the fast precision of the device, recorded, not hashed."""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from advft import checkpoint as ckpt
from advft import config as C
from advft import distributed as D
from advft import fare as T

CPU, CUDA = torch.device("cpu"), torch.device("cuda")

# two logical CPUs as /proc/cpuinfo lists them; only the flags lines matter
_CPU = ("processor\t: {i}\nvendor_id\t: GenuineIntel\nmodel name\t: Test CPU @ 2.80GHz\n"
        "flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_vnni {extra}\n\n")


def cpuinfo(*extra: str) -> str:
    """A fake /proc/cpuinfo with one processor per argument, each with those extra flags."""
    return "".join(_CPU.format(i=i, extra=e) for i, e in enumerate(extra))


@pytest.mark.parametrize("text, expected", [
    (cpuinfo("amx_bf16 amx_tile amx_int8", "amx_bf16 amx_tile amx_int8"), "bf16"),  # Sapphire Rapids
    (cpuinfo("avx512_bf16", "avx512_bf16"), "bf16"),  # Cooper Lake, Zen 4
    (cpuinfo("", ""), "fp32"),  # AVX512 without BF16 (this project's Xeon): oneDNN would emulate
    (cpuinfo("avx512_bf16", ""), "fp32"),  # not on every core: not taken
    (cpuinfo("avx512_bf16x", "xamx_bf16"), "fp32"),  # whole flags only, not substrings
    ("", "fp32"),  # unreadable or not Linux
])
def test_auto_on_a_cpu_follows_its_flags(text, expected):
    assert D.resolve_precision("auto", CPU, cpuinfo=text) == expected


@pytest.mark.parametrize("given", ["fp32", "bf16"])
def test_explicit_precisions_pass_through_unchanged(given, monkeypatch):
    def never(*a, **k):
        raise AssertionError("an explicit precision must not look at the device")

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", never)
    for text in (cpuinfo("amx_bf16"), cpuinfo("")):
        assert D.resolve_precision(given, CPU, cpuinfo=text) == given
    assert D.resolve_precision(given, CUDA) == given


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_on_cuda_asks_for_native_bf16(native, expected, monkeypatch):
    calls = []

    def fake(including_emulation: bool = True) -> bool:
        calls.append(including_emulation)
        return native if not including_emulation else True  # an emulating V100 says True when asked loosely

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", fake)
    # the CPU's flags do not matter for a CUDA run
    assert D.resolve_precision("auto", CUDA, cpuinfo=cpuinfo("" if native else "amx_bf16")) == expected
    assert calls == [False]


def test_auto_on_another_device_is_fp32():
    assert D.resolve_precision("auto", torch.device("meta"), cpuinfo=cpuinfo("amx_bf16")) == "fp32"


def test_cpuinfo_is_read_on_linux_only(monkeypatch):
    if sys.platform.startswith("linux"):
        assert D._read_cpuinfo() == Path("/proc/cpuinfo").read_text(errors="replace")
    monkeypatch.setattr(D.sys, "platform", "darwin")
    assert D._read_cpuinfo() == ""


def _expected_here() -> str:
    """What auto must pick on this machine's CPU, from /proc/cpuinfo read independently of advft."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    flags = [set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")]
    native = bool(flags) and all(f & {"amx_bf16", "avx512_bf16"} for f in flags)
    return "bf16" if sys.platform.startswith("linux") and native else "fp32"


def test_auto_on_this_cpu_matches_proc_cpuinfo():
    assert D.resolve_precision("auto", CPU) == _expected_here()


def test_unresolved_and_unknown_precisions_are_refused():
    with pytest.raises(ValueError, match="run.precision = 'bf17' is not valid; choose one of: fp32, bf16, auto"):
        D.resolve_precision("bf17", CPU)
    with pytest.raises(ValueError, match="resolve_precision"):
        D.autocast(CPU, "auto")  # would otherwise silently run fp32 where auto means bf16


def test_config_accepts_auto_and_names_the_key_for_a_typo(tmp_path):
    from advft import simclr as P

    assert C.RunConfig().precision == "auto"
    ck = tmp_path / "enc.pt"
    ck.write_bytes(b"x")
    base = [f"model.checkpoint={ck}", "data.batch_size=8", "data.synthetic_size=64"]
    assert C.validate(C.load(None, [*base, "run.precision=auto"])).run.precision == "auto"
    with pytest.raises(C.ConfigError, match=r"^run.precision = 'bf17' is not valid; choose one of: fp32, bf16, auto$"):
        C.validate(C.load(None, [*base, "run.precision=bf17"]))
    # pretraining jobs share the run section and its choices
    assert P.validate(P.load_config(None, ["run.precision=auto"])).run.precision == "auto"
    with pytest.raises(C.ConfigError, match="run.precision = 'bf17' is not valid; choose one of: fp32, bf16, auto"):
        P.validate(P.load_config(None, ["run.precision=bf17"]))


def test_auto_run_records_what_it_resolved_and_keeps_the_request(tiny_cfg):
    auto, fp32 = tiny_cfg("run.precision=auto", name="auto"), tiny_cfg("run.precision=fp32", name="fp32")
    here = _expected_here()
    T.finetune(auto)
    start = json.loads((auto.run.dir / "manifest.json").read_text())["starts"][-1]
    assert start["precision"] == f"{here} (auto)"
    # config.toml keeps what the user asked, so the run's hash does not depend on the machine it ran on
    written = C.load(auto.run.dir / "config.toml")
    assert written.run.precision == "auto" and written.hash() == auto.hash() != fp32.hash()
    if here != "fp32":
        pytest.skip(f"auto resolved to {here} on this CPU; the bit-identity with fp32 holds only where it is fp32")
    T.finetune(fp32)
    assert json.loads((fp32.run.dir / "manifest.json").read_text())["starts"][-1]["precision"] == "fp32"
    a, b = ckpt.load_latest(auto.run.dir)[1]["model"], ckpt.load_latest(fp32.run.dir)[1]["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    recs = [[{k: v for k, v in json.loads(line).items() if k != "img_per_s"}
             for line in (c.run.dir / "metrics.jsonl").read_text().splitlines()] for c in (auto, fp32)]
    assert recs[0] == recs[1]


def _agree_worker(rank: int, world: int, init_file: str, texts: list[str], out_dir: str) -> None:
    import torch.distributed as dist

    D._read_cpuinfo = lambda: texts[rank]  # this rank's CPU (a child process: nothing to restore)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        out = {"alone": D.resolve_precision("auto", CPU), "agreed": D.run_precision("auto", CPU),
               "explicit": D.run_precision("bf16", CPU)}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


@pytest.mark.dist
@pytest.mark.parametrize("texts, agreed", [([cpuinfo("amx_bf16"), cpuinfo("")], "fp32"),
                                           ([cpuinfo("amx_bf16"), cpuinfo("avx512_bf16")], "bf16")])
def test_ranks_agree_on_auto(tmp_path, texts, agreed):
    import torch.multiprocessing as mp

    init_file = tempfile.mktemp(dir=tmp_path)
    mp.spawn(_agree_worker, args=(2, init_file, texts, str(tmp_path)), nprocs=2, join=True)
    outs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [o["alone"] for o in outs] == [D.resolve_precision("auto", CPU, cpuinfo=t) for t in texts]
    assert [o["agreed"] for o in outs] == [agreed, agreed]
    assert [o["explicit"] for o in outs] == ["bf16", "bf16"]
