"""PyTorch state_dicts of the junyanz/pytorch-CycleGAN-and-pix2pix networks <-> ganjax Flax variables.

Reading (`load_generator`, `load_discriminator`) takes the files the reference writes
(`latest_net_G.pth`, `latest_net_G_A.pth`, `latest_net_D.pth`, ...) and returns `(flax module, variables)`
with variables = {"params": ..., "batch_stats": ...} ("batch_stats" only with norm="batch"), float32.
Writing (`export_generator`, `export_discriminator`) produces a state_dict that the reference class loads
with `load_state_dict(strict=True)`. Files are read with `torch.load(path, map_location="cpu",
weights_only=True)`: plain state_dicts, DataParallel / torch.compile prefixes ("module.", "_orig_mod.")
and state_dicts nested in a dict ({"state_dict": ...}, {"netG": ..., "netD": ...}, ...; pick one with
`key=` when the choice is ambiguous). Anything else (a pickled nn.Module, custom classes) is refused
rather than unpickled, since unpickling can run arbitrary code.

Key mapping. State_dict keys are the reference's module paths, so they are derived from its module
indices (the layer order of `models/networks.py`; `ganjax.interop.torch_reference` builds the same modules):

  ResnetGenerator (n blocks; d = 1 when the blocks have dropout, else 0)
    model.1 stem_conv, model.2 stem_norm, model.4 / model.7 down_{0,1}_conv,
    model.5 / model.8 down_{0,1}_norm,
    model.{10+j}.conv_block.{1, 2, 5+d, 6+d} block_j/{conv_0, norm_0, conv_1, norm_1},
    model.{10+n}, model.{11+n} up_0_conv, up_0_norm; model.{13+n}, model.{14+n} up_1_conv, up_1_norm;
    model.{17+n} head_conv                      (resnet_9blocks: model.19, 20, 22, 23, 26)
  UnetGenerator (num_downs levels; level 0 is outermost)
    level 0: model.model.0 down_0_conv, model.model.3 up_0_conv; its submodule is model.model.1
    level 0 < i < num_downs - 1, prefix P = model.model.1(.model.3)^(i-1).model:
             P.1 down_i_conv, P.2 down_i_norm, P.5 up_i_conv, P.6 up_i_norm; its submodule is P.3
    innermost level: P.1 down_conv, P.3 up_conv, P.4 up_norm
  NLayerDiscriminator (n_layers L)
    model.0 conv_0; model.{3k-1} conv_k, model.{3k} norm_k (k = 1..L); model.{3L+2} conv_{L+1}

  Leaves: Conv2d weight (C_out, C_in, kh, kw) <-> kernel (kh, kw, C_in, C_out); ConvTranspose2d weight
  (C_in, C_out, kh, kw) <-> kernel (kh, kw, C_out, C_in) (the layout of ganjax.models.layers: both are
  `weight.transpose(2, 3, 1, 0)`); bias <-> bias; BatchNorm2d weight, bias <-> params scale, bias and
  running_mean, running_var <-> batch_stats mean, var. `num_batches_tracked` is ignored on reading and
  written as 0 (it only matters for BatchNorm momentum=None, which the reference does not use); with
  instance norm, stray running_mean / running_var / num_batches_tracked at norm positions (files of
  PyTorch < 0.4) are ignored, as the reference's own loader drops them.

Every tensor is checked against the Flax module's variables: a missing key, an unexpected key or a wrong
shape raises `StateDictError` naming the first offending key (expected and found shapes) and, when the file
looks like another known configuration, the arguments that would match it.

Defaults follow the reference: generator norm "batch" for the U-Nets (pix2pix) and "instance" for the
ResNets (CycleGAN); the discriminator's norm and input channels (6 for pix2pix's conditional D, 3 for
CycleGAN's) are read from the file unless given; ResNet dropout (which shifts key indices) is detected from
the keys unless given.

torch is needed only by the functions that read or write files (the [test] extra, or `pip install torch`).
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import os
import re
import tempfile
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ganjax.models.discriminators import PatchDiscriminator
from ganjax.models.generators import GENERATOR_ARCHS, build_generator
from ganjax.models.layers import NORMS

DISCRIMINATOR_ARCH = "patchgan"
ARCHS = (*GENERATOR_ARCHS, DISCRIMINATOR_ARCH)

# The reference's defaults: pix2pix (U-Net) trains with batch norm, CycleGAN (ResNet) with instance norm.
DEFAULT_GENERATOR_NORM = {
    "resnet_9blocks": "instance",
    "resnet_6blocks": "instance",
    "unet_256": "batch",
    "unet_128": "batch",
}
# pix2pix's default is dropout on (`--no_dropout` off); the U-Net's key names do not reveal it.
DEFAULT_UNET_DROPOUT = True

_NUM_BLOCKS = {"resnet_9blocks": 9, "resnet_6blocks": 6}
_NUM_DOWNS = {"unet_256": 8, "unet_128": 7}

# Nested state_dicts are looked for under these keys, in this order (role-specific names first). Pairs such
# as netG_A / netG_B are deliberately absent: the caller must say which one (key=...).
_WRAPPER_KEYS = {
    "generator": ("netG", "net_G", "G", "generator", "gen"),
    "discriminator": ("netD", "net_D", "D", "discriminator", "disc"),
}
_GENERIC_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "params")
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile

_FLAX_TO_TORCH_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_LEAF_ORDER = (("params", "kernel"), ("params", "scale"), ("params", "bias"), ("batch_stats", "mean"),
               ("batch_stats", "var"))  # fmt: skip


class StateDictError(ValueError):
    """A PyTorch file that cannot be read or does not match the requested network; the message names the
    first offending key and what was expected."""


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            "Reading or writing PyTorch .pth files needs PyTorch: pip install torch (CPU wheels suffice), or "
            "install ganjax with its test extra: pip install -e '.[test]'."
        ) from e
    return torch


# ---- Key tables ---------------------------------------------------------------------------------


class Entry(NamedTuple):
    """One tensor of the state_dict: its key, where it lives in the Flax variables, the torch shape."""

    key: str  # e.g. "model.10.conv_block.1.weight"
    collection: str  # "params" or "batch_stats"
    path: tuple[str, ...]  # Flax path inside the collection, e.g. ("block_0", "conv_0", "kernel")
    shape: tuple[int, ...]  # the tensor's shape in PyTorch layout


class KeyTable(NamedTuple):
    """Everything needed to move one network between the two frameworks."""

    description: str  # e.g. "resnet_9blocks (ngf=64, norm=instance, dropout=False, 3 -> 3 channels)"
    entries: list[Entry]  # in the reference's state_dict order
    ignored: frozenset[str]  # keys that may be present and are skipped (num_batches_tracked, ...)
    bn_prefixes: list[str]  # BatchNorm2d modules, for num_batches_tracked on export
    # Flax paths of the convs whose output goes straight into a norm (the reference gives them a bias only
    # with instance norm; that bias's exact gradient is 0, since the norm subtracts each channel's mean).
    normalized_convs: frozenset[str]


def _resnet_layers(num_blocks: int, dropout: bool) -> list[tuple[str, str]]:
    """(Flax layer path, torch module prefix) in state_dict order; norms included whatever the norm."""
    d = int(dropout)
    layers = [("stem_conv", "model.1"), ("stem_norm", "model.2")]
    layers += [("down_0_conv", "model.4"), ("down_0_norm", "model.5")]
    layers += [("down_1_conv", "model.7"), ("down_1_norm", "model.8")]
    for j in range(num_blocks):
        block = f"model.{10 + j}.conv_block"
        layers += [(f"block_{j}/conv_0", f"{block}.1"), (f"block_{j}/norm_0", f"{block}.2")]
        layers += [(f"block_{j}/conv_1", f"{block}.{5 + d}"), (f"block_{j}/norm_1", f"{block}.{6 + d}")]
    u = 10 + num_blocks  # after the blocks: convT, norm, ReLU, convT, norm, ReLU, pad, conv, tanh
    layers += [("up_0_conv", f"model.{u}"), ("up_0_norm", f"model.{u + 1}")]
    layers += [("up_1_conv", f"model.{u + 3}"), ("up_1_norm", f"model.{u + 4}")]
    layers += [("head_conv", f"model.{u + 7}")]
    return layers


def _unet_layers(num_downs: int) -> list[tuple[str, str]]:
    """(Flax layer path, torch module prefix) in state_dict order (a depth-first walk of the levels)."""

    def level(i: int, prefix: str) -> list[tuple[str, str]]:
        if i == 0:  # [down conv, submodule, ReLU, up conv, tanh]
            return [
                ("down_0_conv", f"{prefix}.0"),
                *level(1, f"{prefix}.1.model"),
                ("up_0_conv", f"{prefix}.3"),
            ]
        if i == num_downs - 1:  # [LeakyReLU, down conv, ReLU, up conv, up norm]
            return [
                (f"down_{i}_conv", f"{prefix}.1"),
                (f"up_{i}_conv", f"{prefix}.3"),
                (f"up_{i}_norm", f"{prefix}.4"),
            ]
        # [LeakyReLU, down conv, down norm, submodule, ReLU, up conv, up norm, (Dropout)]
        return [
            (f"down_{i}_conv", f"{prefix}.1"),
            (f"down_{i}_norm", f"{prefix}.2"),
            *level(i + 1, f"{prefix}.3.model"),
            (f"up_{i}_conv", f"{prefix}.5"),
            (f"up_{i}_norm", f"{prefix}.6"),
        ]

    return level(0, "model.model")


def _patchgan_layers(n_layers: int) -> list[tuple[str, str]]:
    layers = [("conv_0", "model.0")]  # then LeakyReLU at model.1
    for k in range(1, n_layers + 1):  # conv, norm, LeakyReLU
        layers += [(f"conv_{k}", f"model.{3 * k - 1}"), (f"norm_{k}", f"model.{3 * k}")]
    return layers + [(f"conv_{n_layers + 1}", f"model.{3 * n_layers + 2}")]


def _key_table(description: str, layers, shapes: Mapping[str, Any], norm: str) -> KeyTable:
    """Entries for every variable of `shapes` (the module's `init` tree), in the order of `layers`."""

    def lookup(collection, layer):
        node = shapes.get(collection, {})
        for part in layer.split("/"):
            node = node.get(part) if isinstance(node, Mapping) else None
            if node is None:
                return {}
        return node

    def is_norm(layer):
        name = layer.rsplit("/", 1)[-1]
        return name.endswith("_norm") or name.startswith("norm_")

    # `layers` lists each norm right after the conv that feeds it.
    normalized = {a for (a, _), (b, _) in itertools.pairwise(layers) if not is_norm(a) and is_norm(b)}
    entries, ignored, bn_prefixes, covered = [], set(), [], set()
    for layer, prefix in layers:
        if is_norm(layer):
            ignored.add(f"{prefix}.num_batches_tracked")
            if norm == "instance":  # PyTorch < 0.4 saved (unused) InstanceNorm2d running statistics
                ignored.update({f"{prefix}.running_mean", f"{prefix}.running_var"})
                continue
            bn_prefixes.append(prefix)
        # The order of a torch module's state_dict: weight, bias, running_mean, running_var.
        for collection, leaf_name in _LEAF_ORDER:
            leaf = lookup(collection, layer).get(leaf_name)
            if leaf is not None:
                shape = tuple(leaf.shape)
                if len(shape) == 4:  # (kh, kw, a, b) -> (b, a, kh, kw), see the module docstring
                    shape = (shape[3], shape[2], shape[0], shape[1])
                path = (*layer.split("/"), leaf_name)
                entries.append(
                    Entry(f"{prefix}.{_FLAX_TO_TORCH_LEAF[collection, leaf_name]}", collection, path, shape)
                )
                covered.add((collection, path))
    # Every variable of the Flax module must have a torch counterpart (guards the tables above).
    for collection, tree in shapes.items():
        for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = tuple(p.key for p in path)
            if (collection, names) not in covered:
                raise RuntimeError(f"no PyTorch key for {collection}/{'/'.join(names)} of {description}")
    return KeyTable(description, entries, frozenset(ignored), bn_prefixes, frozenset(normalized))


def _module_shapes(module: nn.Module, size: int, channels: int):
    return jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, size, size, channels), jnp.float32))


def resolve_generator_norm(arch: str, norm: str | None) -> str:
    if arch not in GENERATOR_ARCHS:
        raise ValueError(f"unknown generator arch {arch!r}; choose one of {GENERATOR_ARCHS}")
    norm = DEFAULT_GENERATOR_NORM[arch] if norm is None else norm
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


def generator_table(
    arch: str, ngf: int = 64, norm: str | None = None, *, dropout: bool = False, input_nc=3, output_nc=3
) -> tuple[nn.Module, KeyTable]:
    """The Flax generator and its state_dict key table (norm None = the reference default for `arch`)."""
    norm = resolve_generator_norm(arch, norm)
    module = build_generator(arch, ngf, norm=norm, use_dropout=dropout, output_nc=output_nc)
    if arch in _NUM_BLOCKS:
        layers, size = _resnet_layers(_NUM_BLOCKS[arch], dropout), 64
    else:
        layers, size = _unet_layers(_NUM_DOWNS[arch]), 2 ** _NUM_DOWNS[arch]
    description = f"{arch} (ngf={ngf}, norm={norm}, dropout={dropout}, {input_nc} -> {output_nc} channels)"
    return module, _key_table(description, layers, _module_shapes(module, size, input_nc), norm)


def discriminator_table(ndf: int = 64, n_layers: int = 3, norm: str = "batch", *, input_nc: int = 3):
    """The Flax PatchGAN and its state_dict key table."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    module = PatchDiscriminator(ndf=ndf, num_layers=n_layers, norm=norm)
    description = f"patchgan (ndf={ndf}, n_layers={n_layers}, norm={norm}, {input_nc} input channels)"
    shapes = _module_shapes(module, 2**n_layers * 4, input_nc)
    return module, _key_table(description, _patchgan_layers(n_layers), shapes, norm)


# ---- Reading files --------------------------------------------------------------------------------


def _is_tensor_dict(obj, torch) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj, key: str | None, role: str, source: str, torch):
    """The state_dict inside `obj`: `key` (dot-separated) if given, else a plain or wrapped one."""
    if key:
        for part in key.split("."):
            if not isinstance(obj, Mapping) or part not in obj:
                available = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
                raise StateDictError(f"{source}: no entry {part!r} (of key={key!r}); it holds {available}")
            obj = obj[part]
        if not _is_tensor_dict(obj, torch):
            raise StateDictError(f"{source}: entry {key!r} is not a state_dict of tensors")
        return obj
    for _ in range(4):  # a few levels of wrapping, e.g. {"state_dict": {"netG": {...}}}
        if _is_tensor_dict(obj, torch):
            return obj
        if not isinstance(obj, Mapping):
            raise StateDictError(
                f"{source} holds a {type(obj).__name__}, not a state_dict; save one with "
                "torch.save(net.state_dict(), path)."
            )
        nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
        preferred = [k for k in (*_WRAPPER_KEYS[role], *_GENERIC_WRAPPER_KEYS) if k in nested]
        if preferred:
            obj = obj[preferred[0]]
        elif len(nested) == 1:
            obj = obj[nested[0]]
        else:
            raise StateDictError(
                f"{source} is a dict with {len(nested)} nested entries {sorted(map(str, nested))} and no "
                f"state_dict at its top level; choose one with key=... (--key on the command line)."
            )
    raise StateDictError(f"{source}: no state_dict found within 4 levels of nesting; name it with key=...")


def _strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    keys = list(state_dict)
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if keys and all(k.startswith(prefix) for k in keys):
                keys = [k[len(prefix) :] for k in keys]
                changed = True
    return dict(zip(keys, state_dict.values(), strict=True))


def read_state_dict(path: str, *, key: str | None = None, role: str = "generator") -> dict[str, np.ndarray]:
    """{key: array} of the state_dict in a .pth file, wrappers and prefixes removed (see module docstring).

    Floating tensors come back as float32 numpy copies, others (num_batches_tracked) in their own dtype.
    `role` ("generator" or "discriminator") picks among wrapper names such as netG / netD.
    """
    torch = _import_torch()
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist (expected a PyTorch .pth file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, KeyError, ... for unreadable files
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:
            detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(e))
            why = detail.group(1).strip() if detail else f"{type(e).__name__}: {e}"
            raise StateDictError(f"{path} could not be read as a PyTorch file: {why}") from e
        raise StateDictError(
            f"{path} holds pickled Python objects other than tensors (found {found.group(1)}), so "
            "torch.load(weights_only=True) refuses it: unpickling them could run arbitrary code. Only "
            "state_dicts are read. If you trust the file, re-save its weights in PyTorch: "
            "torch.save(net.state_dict(), 'net.pth')."
        ) from e
    state_dict = _strip_prefixes(_unwrap(obj, key, role, path, torch))
    out = {}
    for k, t in state_dict.items():
        t = t.detach().cpu()
        if t.is_floating_point():
            t = t.to(torch.float32)
        out[k] = np.array(t.numpy())  # a copy, never a view of torch's storage
    return out


# ---- Matching ---------------------------------------------------------------------------------------


def guess_configuration(state_dict: Mapping[str, Any]) -> str | None:
    """Command-line arguments that a state_dict's keys and shapes look like, or None (error hints only)."""
    sd = state_dict

    def has(k):
        return k in sd

    if has("model.model.0.weight"):  # a U-Net: count the nested levels
        ngf, levels, prefix = sd["model.model.0.weight"].shape[0], 1, "model.model.1.model"
        while has(f"{prefix}.1.weight"):
            levels += 1
            prefix += ".3.model"
        arch = {8: "unet_256", 7: "unet_128"}.get(levels, f"a {levels}-level U-Net")
        norm = "batch" if has("model.model.1.model.2.weight") else "instance"
        return f"--arch {arch} --ngf {ngf} --norm {norm}"
    if has("model.1.weight") and has("model.10.conv_block.1.weight"):  # a ResNet: count the blocks
        blocks = 0
        while has(f"model.{10 + blocks}.conv_block.1.weight"):
            blocks += 1
        arch = {9: "resnet_9blocks", 6: "resnet_6blocks"}.get(blocks, f"a {blocks}-block ResNet")
        norm = "batch" if has("model.2.weight") else "instance"
        dropout = " --dropout" if not has("model.10.conv_block.5.weight") else ""
        return f"--arch {arch} --ngf {sd['model.1.weight'].shape[0]} --norm {norm}{dropout}"
    if has("model.0.weight") and np.ndim(sd["model.0.weight"]) == 4:  # a PatchGAN
        convs = sorted(int(m.group(1)) for k in sd if (m := re.fullmatch(r"model\.(\d+)\.weight", k)))
        norm = "batch" if has("model.3.weight") and np.ndim(sd["model.3.weight"]) == 1 else "instance"
        ndf, input_nc = sd["model.0.weight"].shape[:2]
        n_layers = (convs[-1] - 2) // 3
        return f"--arch patchgan --ndf {ndf} --n_layers {n_layers} --norm {norm} --input_nc {input_nc}"
    return None


def _shape(x) -> tuple[int, ...]:
    return tuple(np.shape(x))


def _check(state_dict: Mapping[str, Any], table: KeyTable, source: str) -> None:
    """Raises StateDictError naming the first missing or misshapen key (in state_dict order), else the first
    unexpected one, with the counts of each kind of problem."""
    missing, wrong = [], []  # in state_dict order
    for e in table.entries:
        if e.key not in state_dict:
            missing.append(f"key {e.key!r} is missing (expected shape {e.shape})")
        elif _shape(state_dict[e.key]) != e.shape:
            wrong.append(
                f"key {e.key!r} has shape {_shape(state_dict[e.key])} in the file, expected {e.shape}"
            )
    known = {e.key for e in table.entries} | table.ignored
    unexpected = [
        f"unexpected key {k!r} (shape {_shape(v)})" for k, v in state_dict.items() if k not in known
    ]
    if not (missing or wrong or unexpected):
        return
    position = {e.key: i for i, e in enumerate(table.entries)}
    first = (
        min(missing + wrong, key=lambda m: position[m.split("'")[1]]) if missing or wrong else unexpected[0]
    )
    counts = [
        (len(missing), "missing"),
        (len(wrong), "with the wrong shape"),
        (len(unexpected), "unexpected"),
    ]
    summary = ", ".join(f"{n} {what}" for n, what in counts if n)
    guess = guess_configuration(state_dict)
    hint = f" The file looks like {guess}." if guess else ""
    raise StateDictError(f"{source} does not match {table.description}: {summary}; first: {first}.{hint}")


def variables_from_state_dict(state_dict: Mapping[str, Any], table: KeyTable, source: str = "state_dict"):
    """Flax variables {"params", ("batch_stats")} (jax float32 arrays) from a checked state_dict."""
    _check(state_dict, table, source)
    variables: dict[str, Any] = {}
    for e in table.entries:
        value = np.asarray(state_dict[e.key], np.float32)
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        node = variables.setdefault(e.collection, {})
        for part in e.path[:-1]:
            node = node.setdefault(part, {})
        node[e.path[-1]] = jnp.asarray(value)
    return variables


def state_dict_from_variables(variables: Mapping[str, Any], table: KeyTable) -> dict[str, np.ndarray]:
    """The reference's state_dict (numpy arrays, state_dict order) from Flax variables; checks that the
    variables have exactly the table's leaves and shapes."""
    leaves = {}
    for collection in ("params", "batch_stats"):
        tree = variables.get(collection) or {}
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            leaves[(collection, tuple(p.key for p in path))] = leaf
    flax_sd = {}
    for e in table.entries:
        where = f"{e.collection}/{'/'.join(e.path)}"
        if (e.collection, e.path) not in leaves:
            raise StateDictError(f"the variables have no {where!r}, which {table.description} needs")
        value = np.asarray(jax.device_get(leaves.pop((e.collection, e.path))), np.float32)
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        if value.shape != e.shape:
            raise StateDictError(
                f"{where!r} has shape {_flax_shape(value.shape)}, but {table.description} expects "
                f"{_flax_shape(e.shape)}"
            )
        flax_sd[e.key] = np.ascontiguousarray(value)
    if leaves:
        collection, path = next(iter(leaves))
        raise StateDictError(
            f"the variables have {'/'.join((collection, *path))!r}, which {table.description} does not have"
        )
    out: dict[str, np.ndarray] = collections.OrderedDict()
    bn = set(table.bn_prefixes)
    for key, value in flax_sd.items():
        out[key] = value
        prefix = key.rsplit(".", 1)[0]
        if prefix in bn and key.endswith(".running_var"):  # BatchNorm2d's last buffer
            out[f"{prefix}.num_batches_tracked"] = np.zeros((), np.int64)
    return out


def _flax_shape(torch_shape):
    """A shape in Flax layout, for messages about Flax variables."""
    s = tuple(torch_shape)
    return (s[2], s[3], s[1], s[0]) if len(s) == 4 else s


def _resnet_dropout_from_keys(state_dict: Mapping[str, Any]) -> bool:
    """With dropout the blocks' second conv is conv_block.6 and conv_block.5 has no parameters."""
    w6 = state_dict.get("model.10.conv_block.6.weight")
    return "model.10.conv_block.5.weight" not in state_dict and w6 is not None and np.ndim(w6) == 4


# ---- Public API -------------------------------------------------------------------------------------


def load_generator(
    path: str,
    arch: str,
    ngf: int = 64,
    norm: str | None = None,
    *,
    dropout: bool | None = None,
    input_nc: int = 3,
    output_nc: int = 3,
    key: str | None = None,
):
    """(Flax generator, variables) from a reference `net_G*.pth` file.

    norm None: the reference default for `arch` (U-Net "batch", ResNet "instance"). dropout None: detected
    from the keys for the ResNets; DEFAULT_UNET_DROPOUT (pix2pix's default) for the U-Nets, where it only
    sets the returned module's `use_dropout`. key: the state_dict's entry in a nested file (see
    `read_state_dict`). Raises StateDictError when the file does not match.
    """
    state_dict = read_state_dict(path, key=key, role="generator")
    if dropout is None:
        dropout = _resnet_dropout_from_keys(state_dict) if arch in _NUM_BLOCKS else DEFAULT_UNET_DROPOUT
    module, table = generator_table(arch, ngf, norm, dropout=dropout, input_nc=input_nc, output_nc=output_nc)
    return module, variables_from_state_dict(state_dict, table, source=str(path))


def load_discriminator(
    path: str,
    ndf: int = 64,
    n_layers: int = 3,
    norm: str | None = None,
    *,
    input_nc: int | None = None,
    key: str | None = None,
):
    """(Flax PatchDiscriminator, variables) from a reference `net_D*.pth` file (`NLayerDiscriminator`).

    norm None: read from the file (BatchNorm weights present -> "batch", else "instance"); input_nc None:
    read from the first conv (6 for pix2pix's conditional D, 3 for CycleGAN's).
    """
    state_dict = read_state_dict(path, key=key, role="discriminator")
    first = state_dict.get("model.0.weight")
    if input_nc is None:
        if first is None or np.ndim(first) != 4:
            raise StateDictError(
                f"{path} has no 'model.0.weight' conv: not an NLayerDiscriminator state_dict"
            )
        input_nc = int(np.shape(first)[1])
    if norm is None:
        norm = "batch" if "model.3.running_mean" in state_dict else "instance"
    module, table = discriminator_table(ndf, n_layers, norm, input_nc=input_nc)
    return module, variables_from_state_dict(state_dict, table, source=str(path))


def _save(state_dict: Mapping[str, np.ndarray], path: str) -> None:
    torch = _import_torch()
    tensors = collections.OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in state_dict.items())
    path = os.path.abspath(os.path.expanduser(str(path)))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    os.close(fd)
    try:
        torch.save(tensors, tmp)
        os.replace(tmp, path)  # never a half-written .pth
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export_generator(
    variables: Mapping[str, Any],
    arch: str,
    ngf: int = 64,
    norm: str | None = None,
    path: str = "net_G.pth",
    *,
    dropout: bool = False,
    input_nc: int = 3,
    output_nc: int = 3,
) -> dict[str, np.ndarray]:
    """Writes Flax generator variables as a reference state_dict (`ResnetGenerator` / `UnetGenerator` with
    the same arch, ngf, norm and, for the ResNets, use_dropout load it with strict=True). Returns the
    state_dict as numpy arrays."""
    _, table = generator_table(arch, ngf, norm, dropout=dropout, input_nc=input_nc, output_nc=output_nc)
    state_dict = state_dict_from_variables(variables, table)
    _save(state_dict, path)
    return state_dict


def export_discriminator(
    variables: Mapping[str, Any],
    ndf: int = 64,
    n_layers: int = 3,
    norm: str = "batch",
    path: str = "net_D.pth",
    *,
    input_nc: int | None = None,
) -> dict[str, np.ndarray]:
    """Writes PatchDiscriminator variables as a reference `NLayerDiscriminator` state_dict; input_nc None:
    taken from the variables' first conv. Returns the state_dict as numpy arrays."""
    if input_nc is None:
        input_nc = int(np.shape(variables["params"]["conv_0"]["kernel"])[2])
    _, table = discriminator_table(ndf, n_layers, norm, input_nc=input_nc)
    state_dict = state_dict_from_variables(variables, table)
    _save(state_dict, path)
    return state_dict


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
