#!/usr/bin/env python
"""Images/s of advft's FARE step and of its APGD attack alone, against the report-style baseline, in ONE run.

    python benchmarks/throughput.py --arch resnet50 --stem imagenet --res 224 --batch 8 --out r.json
    python benchmarks/throughput.py ... --ablate                # each switch off (or on) alone, from advft's config

Both implementations start from the same randomly initialised encoder (the cost of a step does not depend
on the weights) and see the same batch of [0, 1] pixels and the same attack start noise:

- ``baseline`` (benchmarks/baseline.py): fp32, eager, NCHW, full backward in the attack, gradient at the
  last iterate, host syncs, separate clean and adversarial forwards, plain AdamW;
- ``advft``: the engine's own ``advft.fare.step.fare_step`` (and, for the attack alone, ``adversarial_batch``,
  the attack that step runs) with the switches given here: precision (``auto`` = bf16 where the device
  does bf16 in hardware, else fp32), channels_last, torch.compile, fused AdamW.

Repeats are interleaved (baseline, advft, advft, baseline, ...) so that load from other processes hits both
alike; we report median, min/max and IQR of images/s over the repeats, after ``--warmup`` untimed calls
(which include torch.compile's compilation), and the per-repeat ratio. The step's matmul/conv FLOPs are
counted with torch's FlopCounterMode (eager, fp32, at batch 2, scaled per image: those FLOPs are linear in
the batch) and turned into achieved FLOP/s and a fraction of a bf16 (fp32 when the advft precision is
fp32) matmul peak measured in the same run.

Not implemented: CUDA-graph capture of the attack iterations. It cannot be measured on a machine without
a GPU, so it is not claimed; the GPU run of this script is where it would be tried.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import advft.fare.step as S  # noqa: E402
from advft import config as C  # noqa: E402
from advft.distributed import autocast  # noqa: E402
from benchmarks import common  # noqa: E402
from benchmarks.baseline import baseline_apgd, baseline_fare_step  # noqa: E402

SWITCHES = ("bf16", "channels_last", "compile", "fused", "concat", "input_grads")
SWITCH_HELP = {
    "bf16": "bf16 autocast <-> fp32",
    "channels_last": "channels_last <-> NCHW",
    "compile": "torch.compile <-> eager",
    "fused": "fused AdamW <-> for-loop AdamW",
    "concat": "one forward of [z; x] -> two forwards (the baseline's way)",
    "input_grads": "attack with frozen parameters and input gradients only -> full backward (the baseline's way)",
}


# ----------------------------------------------------------------------------------------- implementations


class Impl:
    """One implementation under test: ``step()`` runs one FARE step, ``attack()`` one APGD attack alone.

    Every call uses the next global step index, so the attack's start noise changes as in training.
    """

    def __init__(self, name: str, step: Callable[[int], Any], attack: Callable[[int], Any]) -> None:
        self.name, self._step, self._attack, self.i = name, step, attack, 0

    def step(self) -> None:
        self._step(self.i)
        self.i += 1

    def attack(self) -> None:
        self._attack(self.i)
        self.i += 1


def make_advft(name: str, base, cfg: C.Config, x: torch.Tensor, device: torch.device, **route: Any) -> Impl:
    """advft's step and attack; ``route``: FareSpec's switches of how the same step is computed
    (``attack_grads``, ``join_forwards``), default the engine's."""
    models, opt = common.advft_models(base, cfg, device)
    y = torch.zeros(x.shape[0], dtype=torch.long, device=device)
    with torch.no_grad(), autocast(device, cfg.run.precision):
        target = models.phi_org(x).float()
    spec = dataclasses.replace(S.FareSpec.of(cfg), **route)
    return Impl(name, lambda i: S.fare_step(models, opt, x, y, i, spec),
                lambda i: S.adversarial_batch(models, x, y, target, i, spec))


def make_baseline(base, cfg: C.Config, x: torch.Tensor, device: torch.device) -> Impl:
    phi, phi_org, opt = common.baseline_models(base, cfg, device)
    with torch.no_grad():
        target = phi_org(x)

    def init(i: int) -> torch.Tensor:  # the start noise advft's step i draws
        return S.attack_init(cfg.run.seed, i, x.shape, 0, 1, device)

    def attack(i: int) -> torch.Tensor:
        phi.eval()
        return baseline_apgd(phi, x, target, eps=cfg.attack.eps_pixels, n_iter=cfg.attack.steps, init=init(i))

    return Impl("baseline", lambda i: baseline_fare_step(phi, phi_org, opt, x, init(i), i, cfg), attack)


def ablation_variants(base, cfg: C.Config, x: torch.Tensor, device: torch.device,
                      switches: list[str]) -> list[Impl]:
    """advft as configured, then one variant per switch with only that switch flipped."""
    out = [make_advft("advft", base, cfg, x, device)]
    flips = {"bf16": {"run.precision": "fp32" if cfg.run.precision == "bf16" else "bf16"},
             "channels_last": {"run.channels_last": not cfg.run.channels_last},
             "compile": {"run.compile": not cfg.run.compile},
             "fused": {"optim.fused": not cfg.optim.fused}}
    routes = {"concat": {"join_forwards": False}, "input_grads": {"attack_grads": "full_backward"}}
    for s in switches:
        if s in flips:
            out.append(make_advft(f"flip:{s}", base, C.replace(cfg, **flips[s]), x, device))
        else:
            out.append(make_advft(f"flip:{s}", base, cfg, x, device, **routes[s]))
    return out


# ------------------------------------------------------------------------------------------------ measuring


def interleaved(impls: list[Impl], what: str, steps: int, repeats: int, batch: int,
                device: torch.device) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Images per wall-clock second and per CPU second of ``what`` ('step' | 'attack'), per implementation,
    one list entry per repeat.

    Each repeat runs every implementation once, in forward order on even repeats and backward on odd ones,
    so that slow drifts of the machine's load average out between them.
    """
    wall: dict[str, list[float]] = {m.name: [] for m in impls}
    cpu: dict[str, list[float]] = {m.name: [] for m in impls}
    for r in range(repeats):
        for m in (impls if r % 2 == 0 else impls[::-1]):
            fn = getattr(m, what)

            def run() -> None:
                for _ in range(steps):
                    fn()

            w, c = common.timed_wall_cpu(run, device)
            wall[m.name].append(steps * batch / w)
            cpu[m.name].append(steps * batch / c)
            print(f"  {what:6s} repeat {r + 1}/{repeats} {m.name:18s} {wall[m.name][-1]:9.3f} img/s "
                  f"({cpu[m.name][-1]:.3f} img per CPU s)", flush=True)
    return wall, cpu


def compare(rates: dict[str, list[float]], ref: str) -> dict[str, Any]:
    """Summaries per implementation and the ratio to ``ref`` (median of the per-repeat paired ratios)."""
    out: dict[str, Any] = {}
    for name, v in rates.items():
        out[name] = common.summary(v)
        if name != ref:
            out[name]["ratio_to_" + ref] = common.summary([a / b for a, b in zip(v, rates[ref])])
    return out


def flop_counts(base, cfg: C.Config, device: torch.device, res: int) -> dict[str, float]:
    """Matmul/conv FLOPs per image of the baseline and advft step and attack (eager fp32, batch 2)."""
    small = C.replace(cfg, **{"data.batch_size": 2, "run.compile": False, "run.precision": "fp32"})
    x = torch.rand(2, 3, res, res, device=device, generator=torch.Generator(device).manual_seed(1))
    b, a = make_baseline(base, small, x, device), make_advft("advft", base, small, x, device)
    return {"baseline_step": common.count_flops(b.step) / 2, "baseline_attack": common.count_flops(b.attack) / 2,
            "advft_step": common.count_flops(a.step) / 2, "advft_attack": common.count_flops(a.attack) / 2}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/throughput.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--arch", default="resnet50", choices=("resnet50", "resnet18", "tiny"))
    p.add_argument("--stem", default="imagenet", choices=("imagenet", "cifar"))
    p.add_argument("--res", type=int, default=224, help="image side in pixels")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=1, help="timed calls (FARE steps or attacks) per repeat")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per implementation, interleaved")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per implementation first (compiles)")
    p.add_argument("--attack-steps", type=int, default=10, help="APGD iterations")
    p.add_argument("--alpha", type=float, default=0.1, help="weight of the clean term")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="advft's precision; auto = bf16 where the device does bf16 in hardware, else fp32")
    p.add_argument("--compile", default="on", choices=("on", "off"))
    p.add_argument("--channels-last", default="on", choices=("on", "off"))
    p.add_argument("--fused", default="on", choices=("on", "off"))
    p.add_argument("--what", default="step,attack", help="comma list of: step, attack")
    p.add_argument("--ablate", nargs="?", const=",".join(SWITCHES), default=None,
                   help="time advft's FARE step with each switch flipped alone instead of the baseline comparison; "
                        "optional comma list of: " + ", ".join(f"{k} ({v})" for k, v in SWITCH_HELP.items()))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (it runs one eager step at batch 2)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.what = [w for w in args.what.split(",") if w]
    if not set(args.what) <= {"step", "attack"}:
        p.error("--what takes a comma list of step, attack")
    if args.ablate is not None:
        args.ablate = [s for s in args.ablate.split(",") if s]
        if not set(args.ablate) <= set(SWITCHES):
            p.error(f"--ablate takes a comma list of: {', '.join(SWITCHES)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    # several compiled variants of one module: keep dynamo from giving up on recompiles and running eagerly
    torch._dynamo.config.recompile_limit = 64
    precision = args.precision if args.precision != "auto" else ("bf16" if common.native_bf16(device) else "fp32")
    cfg = common.bench_config(arch=args.arch, stem=args.stem, res=args.res, batch=args.batch,
                              attack_steps=args.attack_steps, alpha=args.alpha, precision=precision,
                              compile=args.compile == "on", channels_last=args.channels_last == "on",
                              fused=args.fused == "on", device=device)
    C.validate(cfg, check_paths=False)
    base = common.fresh_encoder(args.arch, args.stem)
    x = torch.rand(args.batch, 3, args.res, args.res, device=device, generator=torch.Generator(device).manual_seed(0))

    env = common.environment(device)
    print(f"device {device} | {env.get('gpu', env['cpu'])} | torch {env['torch']} | threads {env['torch_threads']}")
    print(f"model {args.arch} ({args.stem} stem) {args.res}px batch {args.batch}, APGD-{args.attack_steps}, "
          f"alpha {args.alpha}; advft: {precision}, compile={cfg.run.compile}, channels_last={cfg.run.channels_last}, "
          f"fused={cfg.optim.fused}; {args.repeats} repeats x {args.steps} after {args.warmup} warm-up")
    result: dict[str, Any] = {"command": " ".join([sys.executable, *sys.argv]), "env": env, "args": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "advft_config": {"precision": precision, "compile": cfg.run.compile, "channels_last": cfg.run.channels_last,
                         "fused": cfg.optim.fused, "attack_steps": args.attack_steps, "alpha": args.alpha}}

    if args.ablate is not None:
        impls = ablation_variants(base, cfg, x, device, args.ablate)
        what = ["step"]
    else:
        impls = [make_baseline(base, cfg, x, device), make_advft("advft", base, cfg, x, device)]
        what = args.what
    for m in impls:
        for _ in range(args.warmup):
            for w in what:
                getattr(m, w)()
        common.sync(device)
    ref = "baseline" if args.ablate is None else "advft"
    result["images_per_s"], result["images_per_cpu_s"] = {}, {}
    for w in what:
        wall, cpu = interleaved(impls, w, args.steps, args.repeats, args.batch, device)
        result["images_per_s"][w] = compare(wall, ref)
        if device.type == "cpu" and torch.get_num_threads() == 1:  # CPU time is throughput only then
            result["images_per_cpu_s"][w] = compare(cpu, ref)

    if not args.no_flops:
        flops = flop_counts(base, cfg, device, args.res)
        peak = common.matmul_peak(device, torch.bfloat16 if precision == "bf16" else torch.float32)
        result["flops_per_image"] = flops
        result["matmul_peak"] = peak
        # per CPU second where that was measured (a 1-thread CPU run), as the CPU peak is
        clock = "images_per_cpu_s" if result["images_per_cpu_s"] else "images_per_s"
        achieved: dict[str, Any] = {"rates_from": clock}
        for w, per in result[clock].items():
            for name, s in per.items():
                if name not in ("baseline", "advft"):  # the ablation variants do other work per image
                    continue
                n = flops[("baseline_" if name == "baseline" else "advft_") + w]
                achieved[f"{name}_{w}"] = {"flop_per_s": n * s["median"], "fraction_of_peak":
                                           n * s["median"] / peak["flop_per_s"]}
        result["achieved"] = achieved
    report(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


def report(result: dict[str, Any]) -> None:
    for key, title in (("images_per_s", "images per wall-clock second"),
                       ("images_per_cpu_s", "images per CPU second of this process (1 thread: the work, without "
                                            "the waits for a shared core)")):
        if not result.get(key):
            continue
        print(f"\n{title}: median [min, max] (IQR q1-q3), n repeats; ratio: median [min, max] of paired repeats")
        for w, per in result[key].items():
            for name, s in per.items():
                line = (f"  {w:6s} {name:18s} {s['median']:9.3f} [{s['min']:.3f}, {s['max']:.3f}] "
                        f"({s['q1']:.3f}-{s['q3']:.3f}) n={s['n']}")
                for k, r in s.items():
                    if k.startswith("ratio_to_"):
                        line += f"   x{r['median']:.2f} vs {k[9:]} [{r['min']:.2f}, {r['max']:.2f}]"
                print(line)
    if "flops_per_image" in result:
        f, peak = result["flops_per_image"], result["matmul_peak"]
        print(f"FLOPs per image (torch's FlopCounterMode formulas, matmul+conv, fwd+bwd): "
              f"step baseline {f['baseline_step'] / 1e9:.1f} G, "
              f"advft {f['advft_step'] / 1e9:.1f} G; attack baseline {f['baseline_attack'] / 1e9:.1f} G, "
              f"advft {f['advft_attack'] / 1e9:.1f} G")
        print(f"matmul peak measured: {peak['flop_per_s'] / 1e12:.3f} TFLOP/s ({peak['dtype']}, n={peak['n']})")
        print(f"achieved (from {result['achieved']['rates_from']}):")
        for k, a in result["achieved"].items():
            if k != "rates_from":
                print(f"  {k:28s} {a['flop_per_s'] / 1e12:8.3f} TFLOP/s = {100 * a['fraction_of_peak']:5.1f} % of peak")


if __name__ == "__main__":
    main()
