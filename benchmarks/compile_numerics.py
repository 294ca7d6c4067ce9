#!/usr/bin/env python
"""How far compiled and eager fp32 FARE gradients are from float64: the floor for "compiled == eager" tests.

    python benchmarks/compile_numerics.py                   # tiny encoder, 16 px, batch 4, BN train, APGD batch
    python benchmarks/compile_numerics.py --z sign          # z = x + eps * random signs
    python benchmarks/compile_numerics.py --bn eval         # BN in eval mode

For one clean batch x and a perturbed batch z (advft's own attack, or random), the gradient of the FARE
loss with respect to phi's parameters is computed three ways from the same weights: eager float64 (the
reference), eager float32 and torch.compile float32. Printed per parameter tensor: max |g - g_ref| / max
|g_ref|.

Why it matters: with BN in TRAIN mode the first stage's gradient is ill-conditioned, so fp32 lands far
from float64, compiled or eager depending on the batch, while compiled float64 equals eager float64; with
BN in EVAL mode both stay close. A compiled-vs-eager fp32 comparison is only meaningful where the quantity
is well conditioned, which is why tests/test_perf_equivalence.py compares the step with BN in eval mode.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import advft.fare.step as S  # noqa: E402
from advft import config as C  # noqa: E402
from advft.losses import Weights, training_loss  # noqa: E402
from advft.models import build_encoder  # noqa: E402


def gradients(phi: torch.nn.Module, z: torch.Tensor, x: torch.Tensor, target: torch.Tensor, alpha: float,
              dtype: torch.dtype, compiled: bool, bn_train: bool) -> dict[str, torch.Tensor]:
    """Parameter gradients of the FARE loss for a copy of phi in ``dtype`` (float64 copies for comparing)."""
    phi = copy.deepcopy(phi).to(dtype).train(bn_train).requires_grad_(True)
    fn = torch.compile(phi) if compiled else phi
    training_loss("fare", fn, z.to(dtype), x.to(dtype), target.to(dtype), Weights(alpha=alpha),
                  joint=not bn_train)["loss"].backward()
    return {n: p.grad.detach().double() for n, p in phi.named_parameters()}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(prog="benchmarks/compile_numerics.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="tiny", choices=("tiny", "resnet18", "resnet50"))
    p.add_argument("--stem", default="cifar", choices=("cifar", "imagenet"))
    p.add_argument("--res", type=int, default=16)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--bn", default="train", choices=("train", "eval"))
    p.add_argument("--z", default="apgd", choices=("apgd", "noise", "sign"),
                   help="advft's APGD batch, x + uniform noise in the eps-ball, or x + eps * random signs")
    p.add_argument("--z-seed", type=int, default=9, help="seed of the random z")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cfg = C.from_dict({}, {"model.arch": args.arch, "model.stem": args.stem, "data.resolution": args.res,
                           "data.batch_size": args.batch, "attack.steps": 3, "run.precision": "fp32",
                           "run.channels_last": False})
    torch.manual_seed(0)
    phi_org = build_encoder(args.arch, args.stem).to(device).eval().requires_grad_(False)
    phi = copy.deepcopy(phi_org)
    g = torch.Generator(device).manual_seed(5)
    x = torch.rand(args.batch, 3, args.res, args.res, device=device, generator=g)
    y = torch.zeros(args.batch, dtype=torch.long, device=device)
    with torch.no_grad():
        target = phi_org(x)
    if args.z == "apgd":
        z = S.adversarial_batch(S.StepModels(phi, phi, phi, phi_org), x, y, target, 0, S.FareSpec.of(cfg))
    else:
        u = 2 * torch.rand(x.shape, device=device, generator=torch.Generator(device).manual_seed(args.z_seed)) - 1
        z = (x + cfg.attack.eps_pixels * (u if args.z == "noise" else u.sign())).clamp(0, 1)
    alpha, bn_train = cfg.loss.alpha, args.bn == "train"
    ref = gradients(phi, z, x, target, alpha, torch.float64, False, bn_train)
    runs = {"eager_fp32": gradients(phi, z, x, target, alpha, torch.float32, False, bn_train),
            "compiled_fp32": gradients(phi, z, x, target, alpha, torch.float32, True, bn_train)}
    err = {name: {k: ((v[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-30)).item() for k in ref}
           for name, v in runs.items()}
    print(f"{args.arch} {args.stem} {args.res}px batch {args.batch}, BN {args.bn}, z = {args.z}; "
          f"max relative gradient error vs float64 eager")
    print(f"{'parameter':40s} {'eager fp32':>11s} {'compiled fp32':>14s}")
    for k in ref:
        print(f"{k:40s} {err['eager_fp32'][k]:11.1e} {err['compiled_fp32'][k]:14.1e}")
    worst = {name: max(e.values()) for name, e in err.items()}
    print(f"{'worst':40s} {worst['eager_fp32']:11.1e} {worst['compiled_fp32']:14.1e}")
    return err


if __name__ == "__main__":
    main()
