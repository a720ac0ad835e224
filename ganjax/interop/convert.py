"""Converts junyanz/pytorch-CycleGAN-and-pix2pix checkpoints to ganjax teacher checkpoints, and back.

PyTorch -> ganjax (the default, --to ganjax): writes an orbax checkpoint that a distillation config names
as `config.teacher.checkpoint` (and that `init_from` can name too):

  # pix2pix: U-Net generator (batch norm by default) and its conditional PatchGAN (6 input channels)
  python -m ganjax.interop.convert --arch unet_256 --ngf 64 --input latest_net_G.pth --output teachers/maps
  python -m ganjax.interop.convert --arch patchgan --ndf 64 --input latest_net_D.pth --output teachers/maps
  # CycleGAN: both generators (instance norm by default), then both discriminators, into one directory
  python -m ganjax.interop.convert --arch resnet_9blocks --input latest_net_G_A.pth \
      --input_b latest_net_G_B.pth --output teachers/h2z
  python -m ganjax.interop.convert --arch patchgan --input latest_net_D_A.pth \
      --input_b latest_net_D_B.pth --output teachers/h2z

DIR layout: DIR/checkpoints/0/state holds the fields of the trainers' states, named as there:
  one generator       {"g_params": params, "g_batch_stats": batch_stats or {}}       (pix2pix layout)
  --input_b           {"g_params": {"G_A": ..., "G_B": ...}, "g_batch_stats": {...}} (CycleGAN layout)
  --arch patchgan     {"d_params": ..., "d_batch_stats": ...}, with --input_b nested as {"D_A", "D_B"}
A DIR that already holds a converted checkpoint keeps the fields it has and gets the new ones (so G and D
converted one after the other make one teacher); step 0 is rewritten. DIR/conversion.json records, per
network, the arch, widths, norm, dropout, source file and its sha256, and the config values that build
the same networks. A DIR holding a training run's checkpoints (no conversion.json) is refused.

ganjax -> PyTorch (--to torch): writes one network of a ganjax checkpoint (a training run's workdir, its
checkpoints/ folder, one checkpoints/<step> folder, or a converted DIR) as a reference state_dict:

  python -m ganjax.interop.convert --to torch --arch resnet_9blocks --input runs/h2z_teacher \
      --network G_A --output latest_net_G_A.pth
  python -m ganjax.interop.convert --to torch --arch patchgan --ndf 64 --input runs/maps --output net_D.pth

The generator archs read g_params / g_batch_stats, patchgan reads d_params / d_batch_stats; --network picks
G_A / G_B (D_A / D_B) of a CycleGAN checkpoint. The reference loads the file with
`load_state_dict(strict=True)` into a network built with the same arch, ngf, norm and dropout.

Defaults as in the reference: generator norm "batch" for the U-Nets (pix2pix), "instance" for the ResNets
(CycleGAN); the discriminator's norm and input channels are read from the .pth file; ResNet dropout
(it changes the key names) is detected from the file (--dropout / --no_dropout set it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ganjax.checkpoint import Checkpointer
from ganjax.interop import torch as torch_io
from ganjax.trainers import common

CONVERSION_FILE = "conversion.json"
FORMAT = "ganjax.interop.convert/1"


class ConversionError(ValueError):
    """Bad arguments or an output directory that cannot take the conversion; the message says why."""


# ---- Writing ganjax checkpoints --------------------------------------------------------------------


def _checkpoint_dir(directory: str) -> str:
    return os.path.join(directory, "checkpoints")


def read_converted(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state tree of the latest step as numpy arrays, conversion record) of a converted DIR, or ({}, {})
    when DIR holds no checkpoint yet."""
    directory = os.path.abspath(os.path.expanduser(directory))
    ckpt_dir = _checkpoint_dir(directory)
    record_path = os.path.join(directory, CONVERSION_FILE)
    has_steps = os.path.isdir(ckpt_dir) and any(d.isdigit() for d in os.listdir(ckpt_dir))
    if not has_steps:
        return {}, {}
    if not os.path.isfile(record_path):
        raise ConversionError(
            f"{directory} holds checkpoints but no {CONVERSION_FILE}: it is not a directory written by this "
            "converter (perhaps a training run's workdir). Choose a new --output directory."
        )
    with open(record_path) as f:
        record = json.load(f)
    try:
        state_dir = common.resolve_checkpoint_step(directory, "--output")
    except FileNotFoundError as e:
        raise ConversionError(
            f"{ckpt_dir} holds no complete checkpoint; remove it or choose another --output"
        ) from e
    tree = ocp.PyTreeCheckpointer().restore(state_dir)  # numpy arrays: converter checkpoints hold only those
    return dict(tree), record


def write_converted(directory: str, fields: dict[str, Any], networks: dict[str, dict]) -> str:
    """Merges `fields` (top-level state fields such as g_params) and their `networks` records into DIR.

    The new checkpoint is written next to the old one and swapped in, so an interrupted conversion leaves
    the previous checkpoint (or none) rather than a half-written one. Returns the step folder.
    """
    directory = os.path.abspath(os.path.expanduser(directory))
    tree, record = read_converted(directory)
    tree.update(fields)
    # Networks whose fields are overwritten are dropped from the record (a pair replaced by one G, ...).
    kept = {
        name: net
        for name, net in record.get("networks", {}).items()
        if not {f.split("/")[0] for f in net["fields"]} & set(fields)
    }
    record = {
        "format": FORMAT,
        "checkpoint": "checkpoints/0",
        "fields": sorted(tree),
        "networks": {**kept, **networks},
    }
    record["config"] = _config_hints(record["networks"])

    os.makedirs(directory, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".convert-", dir=directory)
    try:
        ckpt = Checkpointer(os.path.join(staging, "checkpoints"), keep=1, async_save=False)
        ckpt.save(0, tree, None)
        ckpt.close()
        current, backup = _checkpoint_dir(directory), os.path.join(staging, "previous")
        if os.path.exists(current):
            os.rename(current, backup)
        try:
            os.rename(os.path.join(staging, "checkpoints"), current)
        except BaseException:
            if os.path.exists(backup):  # put the previous checkpoint back before the staging dir goes
                os.rename(backup, current)
            raise
        with open(os.path.join(directory, CONVERSION_FILE + ".tmp"), "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
        os.replace(
            os.path.join(directory, CONVERSION_FILE + ".tmp"), os.path.join(directory, CONVERSION_FILE)
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return os.path.join(_checkpoint_dir(directory), "0")


def _config_hints(networks: dict[str, dict]) -> dict[str, Any]:
    """The config values that build the converted networks in a distillation config (the teacher is
    config.model's architecture with config.teacher's width, norm and dropout; disc.* must match the
    discriminator for teacher.init_discriminator)."""
    hints: dict[str, Any] = {}
    for net in networks.values():
        if net["arch"] == torch_io.DISCRIMINATOR_ARCH:
            hints.update(
                {"disc.features": net["ndf"], "disc.num_layers": net["n_layers"], "disc.norm": net["norm"]}
            )
        else:
            hints.update(
                {
                    "model.generator": net["arch"],
                    "teacher.ngf": net["ngf"],
                    "teacher.norm": net["norm"],
                    "teacher.dropout": net["dropout"],
                }
            )
    return hints


# ---- PyTorch -> ganjax -----------------------------------------------------------------------------


def _count(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def to_ganjax(args) -> str:
    is_disc = args.arch == torch_io.DISCRIMINATOR_ARCH
    single = not args.input_b
    inputs = [args.input] if single else [args.input, args.input_b]
    names = ["D" if is_disc else "G"] if single else (["D_A", "D_B"] if is_disc else ["G_A", "G_B"])
    prefix = "d" if is_disc else "g"
    params, stats, networks = {}, {}, {}
    for name, path in zip(names, inputs, strict=True):
        if is_disc:
            module, variables = torch_io.load_discriminator(
                path, args.ndf or 64, args.n_layers, args.norm, input_nc=args.input_nc, key=args.key
            )
            info = {"ndf": module.ndf, "n_layers": module.num_layers, "norm": module.norm}
            info["input_nc"] = int(variables["params"]["conv_0"]["kernel"].shape[2])
        else:
            module, variables = torch_io.load_generator(
                path,
                args.arch,
                args.ngf or 64,
                args.norm,
                dropout=args.dropout,
                input_nc=args.input_nc or 3,
                output_nc=args.output_nc,
                key=args.key,
            )
            info = {"ngf": module.ngf, "norm": module.norm, "dropout": module.use_dropout}
            info.update(input_nc=args.input_nc or 3, output_nc=args.output_nc)
        params[name] = jax.tree.map(np.asarray, variables["params"])
        stats[name] = jax.tree.map(np.asarray, variables.get("batch_stats", {}))
        suffix = "" if single else f"/{name}"
        networks[name] = {
            "arch": args.arch,
            **info,
            "fields": [f"{prefix}_params{suffix}", f"{prefix}_batch_stats{suffix}"],
            "parameters": _count(variables["params"]),
            "source": os.path.abspath(path),
            "sha256": torch_io.file_sha256(path),
            "state_dict_key": args.key,
            "converted_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        print(f"{path}: {networks[name]['parameters']:,} parameters -> {name}", file=sys.stderr)
    if single:
        fields = {f"{prefix}_params": params[names[0]], f"{prefix}_batch_stats": stats[names[0]]}
    else:
        fields = {f"{prefix}_params": params, f"{prefix}_batch_stats": stats}
    step_dir = write_converted(args.output, fields, networks)
    output = os.path.abspath(args.output)
    print(f"wrote {sorted(fields)} to {step_dir}; set config.teacher.checkpoint = {output!r}")
    return step_dir


# ---- ganjax -> PyTorch -----------------------------------------------------------------------------


def read_network(path: str, prefix: str, network: str | None) -> dict[str, Any]:
    """Variables {"params", "batch_stats"} of one network of a ganjax checkpoint (prefix "g" or "d")."""
    try:
        state_dir = common.resolve_checkpoint_step(path, "--input")
    except FileNotFoundError as e:
        raise ConversionError(
            f"--input {path}: no ganjax checkpoint there (name a training run's workdir, its checkpoints/ "
            "folder, one checkpoints/<step> folder, or a directory written by this converter)."
        ) from e
    saved = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
    fields = (f"{prefix}_params", f"{prefix}_batch_stats")
    if fields[0] not in saved:
        raise ConversionError(f"{state_dir} has no {fields[0]!r} (it has {sorted(saved)}); check --arch")
    trees = {f: saved.get(f) or {} for f in fields}
    pair = {"g": ("G_A", "G_B"), "d": ("D_A", "D_B")}[prefix]
    nested = set(trees[fields[0]]) <= set(pair)
    if nested and network is None:
        raise ConversionError(
            f"{state_dir} holds networks {sorted(trees[fields[0]])}: choose one with --network"
        )
    if not nested and network is not None:
        raise ConversionError(f"{state_dir} holds one network in {fields[0]}; drop --network {network}")
    if nested:
        if network not in trees[fields[0]]:
            raise ConversionError(f"--network {network}: {state_dir} holds {sorted(trees[fields[0]])}")
        trees = {f: {network: t.get(network) or {}} for f, t in trees.items()}
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), trees)
    restored = common.restore_subtrees(path, abstract, "--input")
    if nested:
        restored = {f: t[network] for f, t in restored.items()}
    variables = {"params": restored[fields[0]]}
    if jax.tree.leaves(restored[fields[1]]):
        variables["batch_stats"] = restored[fields[1]]
    return variables


def to_torch(args) -> str:
    if args.input_b:
        raise ConversionError(
            "--input_b is for PyTorch -> ganjax; export one network per call with --network"
        )
    if args.arch == torch_io.DISCRIMINATOR_ARCH:
        variables = read_network(args.input, "d", args.network)
        torch_io.export_discriminator(
            variables, args.ndf or 64, args.n_layers, args.norm or _saved_norm(variables), args.output,
            input_nc=args.input_nc,
        )  # fmt: skip
    else:
        variables = read_network(args.input, "g", args.network)
        torch_io.export_generator(
            variables,
            args.arch,
            args.ngf or 64,
            args.norm or _saved_norm(variables),
            args.output,
            dropout=bool(args.dropout),
            input_nc=args.input_nc or 3,
            output_nc=args.output_nc,
        )
    print(f"wrote {args.output}")
    return args.output


def _saved_norm(variables) -> str:
    return "batch" if variables.get("batch_stats") else "instance"


# ---- Command line --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ganjax.interop.convert",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--to", choices=("ganjax", "torch"), default="ganjax", help="conversion direction")
    parser.add_argument("--arch", required=True, choices=torch_io.ARCHS)
    parser.add_argument(
        "--input", required=True, help="a .pth file (--to ganjax) or a ganjax checkpoint (--to torch)"
    )
    parser.add_argument("--input_b", help="the B network's .pth (G_B / D_B of a CycleGAN pair)")
    parser.add_argument(
        "--output", required=True, help="output directory (--to ganjax) or .pth file (--to torch)"
    )
    parser.add_argument("--ngf", type=int, help="generator width (default 64)")
    parser.add_argument("--ndf", type=int, help="discriminator width (default 64)")
    parser.add_argument("--n_layers", type=int, default=3, help="PatchGAN stride-2 layers (default 3)")
    parser.add_argument("--norm", choices=("batch", "instance"), help="default: see the module docstring")
    parser.add_argument(
        "--dropout", dest="dropout", action="store_true", default=None, help="ResNet blocks have dropout"
    )
    parser.add_argument(
        "--no_dropout", dest="dropout", action="store_false", help="ResNet blocks have no dropout"
    )
    parser.add_argument(
        "--input_nc", type=int, help="input channels (generators: 3; patchgan: from the file)"
    )
    parser.add_argument("--output_nc", type=int, default=3, help="generator output channels (default 3)")
    parser.add_argument(
        "--key", help="entry of the state_dict in a nested .pth file, e.g. netG or state_dict.G"
    )
    parser.add_argument("--network", help="--to torch: G_A / G_B (D_A / D_B) of a CycleGAN checkpoint")
    args = parser.parse_args(argv)
    is_disc = args.arch == torch_io.DISCRIMINATOR_ARCH
    if is_disc and args.ngf is not None:
        parser.error("--ngf is the generator width; use --ndf with --arch patchgan")
    if not is_disc and args.ndf is not None:
        parser.error("--ndf is the discriminator width; use --ngf with a generator arch")
    if args.to == "ganjax" and args.network:
        parser.error("--network is for --to torch (PyTorch -> ganjax names networks G/D or G_A/G_B itself)")
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Runs one conversion; returns the written step folder (--to ganjax) or .pth path (--to torch).
    Raises ConversionError / StateDictError / FileNotFoundError with a message naming the problem."""
    args = parse_args(argv)
    return to_torch(args) if args.to == "torch" else to_ganjax(args)


if __name__ == "__main__":
    try:
        main()
    except (ConversionError, torch_io.StateDictError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
