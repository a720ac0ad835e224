"""Numerical parity of ganjax with the PyTorch reference (junyanz/pytorch-CycleGAN-and-pix2pix), per network.

    python -m benchmarks.parity [--size 256] [--ngf 64] [--step_size 256] [--step_ngf 16] [--json OUT]

For each generator (resnet_9blocks, resnet_6blocks, unet_256, unet_128, with the reference's default norm:
instance for the ResNets, batch for the U-Nets) and the PatchGAN (pix2pix's: batch norm, 6 input channels;
CycleGAN's: instance norm, 3 channels) the PyTorch build of the reference network
(`ganjax.interop.torch_reference`, N(0, 0.02) init, random BatchNorm statistics) is converted through its
state_dict (`ganjax.interop.torch`) and both frameworks run on the same float32 images in [-1, 1]:

  forward   eval mode at --size px (rounded up to what the U-Net needs), width --ngf; max / mean |difference|
            of the outputs (generators: tanh images; PatchGAN: logits)
  step      one pix2pix step at --step_size px (the generator with its default norm and the conditional
            PatchGAN with batch norm, both of width --step_ngf; Adam 2e-4, betas (0.5, 0.999); BCE GAN loss
            + 100 L1): the reference's `optimize_parameters` in PyTorch vs `ganjax.trainers.pix2pix
            .train_step`. Reported: the largest loss difference, max / mean |update difference| over all
            parameters and how many updates differ by more than 1e-6 (0.5% of the learning rate); the JSON
            adds the max over parameters whose gradient is not numerically zero. Adam's first step is
            lr * g / (|g| + eps) ~ lr * sign(g), so a gradient that is zero up to rounding (e.g. of conv
            biases before InstanceNorm, whose exact gradient is 0, or of long sums that cancel) can move its
            weight by up to +-lr in either framework. The step is therefore also run by PyTorch in float64,
            and each framework's float32 update is compared with that exact one: the "vs f64" counts show
            how many weights each moves differently from it. The PatchGAN row reports the discriminator's
            updates over all the generator steps.

Generator dropout is off in the step (the frameworks draw different masks).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax

from ganjax.interop import parity
from ganjax.interop import torch_reference as tr
from ganjax.models.generators import GENERATOR_ARCHS

_DOWNS = {"resnet_9blocks": 2, "resnet_6blocks": 2, "unet_256": 8, "unet_128": 7}


def _round_size(arch: str, size: int) -> int:
    factor = 2 ** _DOWNS[arch]
    return max(factor, -(-size // factor) * factor)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.1e}"


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=256, help="forward: image size (px)")
    parser.add_argument(
        "--ngf", type=int, default=64, help="forward: generator width ngf (and the PatchGAN's ndf)"
    )
    parser.add_argument("--step_size", type=int, default=256, help="training step: image size (px)")
    parser.add_argument("--step_ngf", type=int, default=16, help="training step: ngf of G and ndf of D")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--archs", default=",".join(GENERATOR_ARCHS), help="comma-separated generators")
    parser.add_argument("--no_step", action="store_true", help="forward passes only")
    parser.add_argument("--no_float64", action="store_true", help="skip the float64 PyTorch step")
    parser.add_argument("--conv_impl", default="fast", choices=("auto", "reference", "fast", "winograd"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON here")
    args = parser.parse_args(argv)
    archs = [a for a in args.archs.split(",") if a]
    for arch in archs:
        if arch not in GENERATOR_ARCHS:
            parser.error(f"unknown generator {arch!r}; choose from {GENERATOR_ARCHS}")

    results = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
        },
        "backend": jax.default_backend(),
        "device": str(jax.local_devices()[0]),
        "jax_version": jax.__version__,
        "torch_version": tr.torch.__version__,
        "torch_threads": tr.torch.get_num_threads(),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "rows": [],
    }
    print(
        f"jax {jax.__version__} ({jax.default_backend()}, conv_impl={args.conv_impl}) vs torch "
        f"{tr.torch.__version__} (CPU, {tr.torch.get_num_threads()} threads); forward at {args.size} px, "
        f"ngf {args.ngf}; step at {args.step_size} px, ngf = ndf = {args.step_ngf}; batch {args.batch}"
    )
    columns = ("|y| max", "fwd max", "fwd mean", "loss max", "upd max", "upd mean")
    header = f"{'network':<26} " + " ".join(f"{c:>8}" for c in columns)
    header += f" {'differ':>14} {'vs f64: jax':>12} {'torch':>6}"
    print(header)
    print("-" * len(header))

    def emit(row):
        results["rows"].append(row)
        fwd, step = row["forward"], row.get("step") or {}
        values = (
            fwd["scale"],
            fwd["max"],
            fwd["mean"],
            step.get("loss_max"),
            step.get("max"),
            step.get("mean"),
        )
        line = f"{row['network']:<26} " + " ".join(f"{_fmt(v):>8}" for v in values)
        line += f" {step['differ']:>7}/{step['params']:<6}" if step else f" {'-':>14}"
        exact = step.get("vs_float64")
        line += (
            f" {exact['jax']['differ']:>12} {exact['torch']['differ']:>6}"
            if exact
            else f" {'-':>12} {'-':>6}"
        )
        print(line)
        sys.stdout.flush()

    def step_row(updates, **extra):
        """Sums / maxima of `_compare_updates` entries (one per step) for the table."""
        row = {
            "max": max(u["max"] for u in updates),
            "mean": sum(u["mean"] * u["params"] for u in updates) / sum(u["params"] for u in updates),
            "max_where_grad_not_tiny": max(u["max_where_grad_not_tiny"] for u in updates),
            "differ": sum(u["differ"] for u in updates),
            "params": sum(u["params"] for u in updates),
            **extra,
        }
        if all("vs_float64" in u for u in updates):
            row["vs_float64"] = {
                fw: {"differ": sum(u["vs_float64"][fw]["differ"] for u in updates)} for fw in ("jax", "torch")
            }
        return row

    d_updates = []
    for arch in archs:
        t0 = time.perf_counter()
        size = _round_size(arch, args.size)
        forward = parity.generator_forward(
            arch, args.ngf, size, batch=args.batch, seed=args.seed, conv_impl=args.conv_impl
        )
        row = {"network": f"{arch} ({'instance' if arch.startswith('resnet') else 'batch'})", "arch": arch}
        row["forward"] = {**forward, "size": size, "ngf": args.ngf}
        if not args.no_step:
            step_size = _round_size(arch, args.step_size)
            step = parity.pix2pix_step(
                arch,
                args.step_ngf,
                step_size,
                ndf=args.step_ngf,
                batch=args.batch,
                seed=args.seed,
                conv_impl=args.conv_impl,
                float64_reference=not args.no_float64,
            )
            row["step"] = step_row(
                [step["g_update"]],
                loss_max=max(step["losses"].values()),
                losses=step["losses"],
                losses_torch=step["losses_torch"],
                batch_stats_max=step["g_stats"]["max"],
                size=step_size,
                ngf=args.step_ngf,
            )
            d_updates.append({**step["d_update"], "batch_stats_max": step["d_stats"]["max"], "with": arch})
        row["seconds"] = time.perf_counter() - t0
        emit(row)

    for norm, input_nc in (("batch", 6), ("instance", 3)):
        forward = parity.discriminator_forward(
            args.ngf,
            args.size,
            norm=norm,
            input_nc=input_nc,
            batch=args.batch,
            seed=args.seed,
            conv_impl=args.conv_impl,
        )
        row = {"network": f"patchgan ({norm}, {input_nc} ch)", "arch": "patchgan", "forward": forward}
        if norm == "batch" and d_updates:  # the steps' discriminator is pix2pix's
            row["step"] = step_row(d_updates, per_generator=d_updates)
        emit(row)
    print(
        "|y| max: largest output; fwd: |torch - jax| of the outputs in eval mode. Step (one pix2pix G+D "
        "step, Adam lr 2e-4; the PatchGAN row sums its D over the generators' steps): loss max = largest "
        "|difference| of the D, GAN, L1 and total G losses; upd = |difference| of the parameter updates "
        "(max, mean); differ = updates that differ by > 1e-6 (0.5% of lr) / parameters; vs f64 = the same "
        "count for each framework's float32 update against PyTorch's float64 step."
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
