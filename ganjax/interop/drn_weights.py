"""fyu/drn's Cityscapes DRN segmenter (GAN Compression's mIoU model) -> a ganjax FCN-score segmenter.

  python -m ganjax.interop.drn_weights --weights drn-d-105_ms_cityscapes.pth --output drn105.jaxexport

(options: --size H W, default 256 256; --arch drn_d_105 (default) | auto | drn_d_22 | ...), then evaluate
with `--config.eval.segmenter=drn105.jaxexport` (and config.eval.segmentation_labels, see
`ganjax.evaluation.segmentation`).

The weights. GAN Compression (mit-han-lab/gan-compression, README "Cityscapes Dataset") computes the mIoU
of its Cityscapes generators with "a pre-trained DRN model drn-d-105_ms_cityscapes.pth from
http://go.yf.io/drn-cityscapes-models" (fyu/drn's model zoo; its scripts pass it as
`--drn_path drn-d-105_ms_cityscapes.pth`). Download it once on a machine with internet access and pass
its local path; nothing is downloaded here. It is the state_dict of fyu/drn `DRNSeg("drn_d_105", 19)`
(gan-compression loads it with `util.load_network`: `torch.load` + strict `load_state_dict`):

  base.{n}.{3j}.weight, base.{n}.{3j+1}.{weight, bias, running_mean, running_var}     conv groups
  base.{n}.{j}.{conv1, bn1, conv2, bn2, conv3, bn3, downsample.0, downsample.1}.*      residual blocks
  seg.weight (19, 512, 1, 1), seg.bias (19,), up.weight (19, 1, 16, 16)

n indexes DRN's layer0..layer8 (`DRNSeg.base` = the DRN's children without avgpool and fc), j the conv
or block. Mapping (`torch_key_map`, derived from `ganjax.models.drn.DRNSeg`'s own variables): every 4-D
weight -> kernel = weight.transpose(2, 3, 1, 0) (Conv2d (O, I, kh, kw) -> (kh, kw, I, O); the grouped
ConvTranspose2d `up` (C, 1, k, k) -> (k, k, 1, C)); BatchNorm weight, bias -> params scale, bias;
running_mean, running_var -> batch_stats mean, var; `num_batches_tracked` is ignored. Every key and shape
is checked: `WeightsError` lists the missing, unexpected and misshapen keys and, when the file looks like
another DRN, the --arch that matches it. Files are read with `torch.load(map_location="cpu",
weights_only=True)` (`ganjax.interop.torch.read_state_dict`: "module." prefixes and {"state_dict": ...}
wrappers are undone), so reading needs torch; the exported file does not.

The segmenter (`DRNSegmenter`, and the exported function) follows GAN Compression's evaluation
(metric/__init__.py `get_mIoU`, metric/mIoU_score.py `SegList` and `test`): photos in [-1, 1] -> uint8 as
`util.tensor2im` (truncated) -> / 255 -> Cityscapes mean/std -> DRNSeg -> LogSoftmax -> argmax over the
19 train ids. GAN Compression feeds the generators' outputs at their own size (256 x 256 for pix2pix
Cityscapes, `datasets/prepare_cityscapes_dataset.py`), so the default export size is 256 x 256. One
difference stays with the caller: GAN Compression then resizes the log-probabilities (bilinear) to
2048 x 1024 and scores them against the full-resolution gtFine train-id maps, while
`ganjax.evaluation.segmentation` scores at the photos' size against label maps resized (nearest) to it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ganjax.evaluation import batching
from ganjax.models import drn

WEIGHTS_FILENAME = "drn-d-105_ms_cityscapes.pth"
WEIGHTS_PAGE = "http://go.yf.io/drn-cityscapes-models"
DEFAULT_ARCH = "drn_d_105"
DEFAULT_SIZE = (256, 256)  # GAN Compression's pix2pix Cityscapes images (height, width)
_IGNORED_SUFFIX = ".num_batches_tracked"
_LEAF_NAMES = {  # Flax (collection, leaf) -> torch parameter / buffer name
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_BLOCK_MODULES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_MAX_LISTED = 12


class WeightsError(ValueError):
    """The state_dict does not match the requested DRN segmenter (wrong keys or shapes, or not a DRN)."""


def _download_hint() -> str:
    return (
        f"GAN Compression's Cityscapes segmenter is fyu/drn's {WEIGHTS_FILENAME} (DRN-D-105, 19 classes): "
        f"download it from {WEIGHTS_PAGE} (linked from the READMEs of fyu/drn and "
        "mit-han-lab/gan-compression) on a machine with internet access and pass its local path."
    )


# ---- Key mapping ----------------------------------------------------------------------------------


def _torch_module_path(modules: Sequence[str], base_index: Mapping[str, int]) -> str:
    """Flax module path (e.g. ("layer3", "block_0", "downsample_conv")) -> torch module path
    (base.3.0.downsample.0)."""
    head, *rest = modules
    if head in ("seg", "up"):
        return head
    parts = ["base", str(base_index[head])]
    if rest and rest[0].startswith(("conv_", "bn_")):  # conv groups: Sequential(conv, BN, ReLU, ...)
        kind, j = rest[0].split("_")
        parts.append(str(3 * int(j) + (0 if kind == "conv" else 1)))
    elif rest:  # residual layers: Sequential(block, ...), block modules by name
        parts.append(rest[0].split("_")[1])
        parts.append(_BLOCK_MODULES.get(rest[1], rest[1]))
    return ".".join(parts)


def torch_key_map(model: drn.DRNSeg) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """torch state_dict key -> (Flax variable path, torch shape), for every variable of `model`."""
    base_index = {
        spec.name: n for n, spec in enumerate(drn.layer_plan(model.layers, model.channels, model.block))
    }
    mapping = {}
    for path, leaf in traverse_util.flatten_dict(drn.variable_shapes(model)).items():
        collection, *modules, name = path
        key = f"{_torch_module_path(modules, base_index)}.{_LEAF_NAMES[(collection, name)]}"
        shape = tuple(leaf.shape)
        if len(shape) == 4:  # (kh, kw, I, O) <- (O, I, kh, kw)
            shape = (shape[3], shape[2], shape[0], shape[1])
        mapping[key] = (path, shape)
    return {k: mapping[k] for k in sorted(mapping, key=_natural_key)}


_MODULE_ORDER = ("base", "seg", "up", "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample")
_LEAF_ORDER = ("weight", "bias", "running_mean", "running_var")


def _natural_key(key: str):
    """Orders keys as DRNSeg's state_dict lists them (modules in definition order, indices numerically)."""
    *modules, leaf = key.split(".")
    return [int(m) if m.isdigit() else _MODULE_ORDER.index(m) for m in modules], _LEAF_ORDER.index(leaf)


# ---- Reading the architecture off a state_dict ------------------------------------------------------


def infer_model(state_dict: Mapping[str, np.ndarray], **kwargs) -> drn.DRNSeg:
    """The `DRNSeg` whose variables a state_dict holds, read from its keys and shapes (block type,
    layers, channels, num_classes). kwargs go to DRNSeg (e.g. precision). Raises WeightsError when the
    keys are not those of a DRN-D DRNSeg with all nine layers (every fyu/drn drn_d_* has them)."""
    groups: dict[int, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        found = re.fullmatch(r"base\.(\d+)\.(.+)", key)
        if found:
            groups.setdefault(int(found.group(1)), {})[found.group(2)] = value
    if "seg.weight" not in state_dict or sorted(groups) != list(range(9)):
        raise WeightsError(
            f"Not a DRN-D segmenter state_dict with nine base layers (base.0 .. base.8, seg, up): found base "
            f"groups {sorted(groups)} and {'a' if 'seg.weight' in state_dict else 'no'} seg.weight. "
            + _download_hint()
        )
    layers, channels, blocks, found_kinds = [], [], set(), ""
    for n in range(9):
        sub = groups[n]
        residual = sorted({int(k.split(".")[0]) for k in sub if re.fullmatch(r"\d+\.conv1\.weight", k)})
        convs = sorted(
            int(k.split(".")[0]) for k in sub if re.fullmatch(r"\d+\.weight", k) and np.ndim(sub[k]) == 4
        )
        if residual:  # Sequential of blocks: count them, planes = conv1's output width
            blocks.add("bottleneck" if any(re.fullmatch(r"\d+\.conv3\.weight", k) for k in sub) else "basic")
            layers.append(len(residual))
            channels.append(int(np.shape(sub[f"{residual[0]}.conv1.weight"])[0]))
            found_kinds += "r"
        elif convs:  # Sequential(conv, BN, ReLU, ...): count the convs
            layers.append(len(convs))
            channels.append(int(np.shape(sub[f"{convs[0]}.weight"])[0]))
            found_kinds += "c"
        else:
            raise WeightsError(f"base.{n} holds neither convs nor residual blocks: {sorted(sub)[:5]}")
    kinds = "cccrrrrcc"  # layer0..layer2 conv groups, layer3..layer6 residual, layer7..layer8 conv groups
    if found_kinds != kinds or len(blocks) != 1 or layers[0] != 1 or channels[0] != channels[1]:
        raise WeightsError(
            f"base.0 .. base.8 are not DRN-D's layer0 .. layer8 (conv groups c and residual layers r: "
            f"{found_kinds}, expected {kinds}; blocks {sorted(blocks)}). " + _download_hint()
        )
    return drn.DRNSeg(
        layers=tuple(layers[1:]),
        channels=(channels[0], *channels[2:]),
        num_classes=int(np.shape(state_dict["seg.weight"])[0]),
        block=blocks.pop(),
        **kwargs,
    )


def _describe(model: drn.DRNSeg) -> str:
    name = model.arch
    what = name if name else f"DRN-D block={model.block} layers={model.layers} channels={model.channels}"
    return f"{what}, {model.num_classes} classes"


# ---- Conversion ---------------------------------------------------------------------------------------


def convert_state_dict(state_dict: Mapping[str, np.ndarray], model: drn.DRNSeg) -> dict:
    """A DRNSeg state_dict (name -> array) -> {"params": ..., "batch_stats": ...} float32 numpy for `model`.

    Raises WeightsError listing every missing key, unexpected key and shape mismatch (the first
    12 of each), with the --arch the file matches when it is another DRN.
    """
    mapping = torch_key_map(model)
    arrays = {k: np.asarray(v) for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIX)}
    missing = [k for k in mapping if k not in arrays]
    unexpected = [k for k in arrays if k not in mapping]
    misshapen = [
        f"{k} {tuple(arrays[k].shape)} (expected {shape})"
        for k, (_, shape) in mapping.items()
        if k in arrays and tuple(arrays[k].shape) != shape
    ]
    if missing or unexpected or misshapen:
        problems = []
        for label, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("with a wrong shape", misshapen),
        ):
            if items:
                more = f", ... ({len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
                problems.append(f"{len(items)} {label}: {', '.join(items[:_MAX_LISTED])}{more}")
        summary = "; ".join(problems)
        raise WeightsError(
            f"The state_dict does not match DRNSeg {_describe(model)}. {summary}. {_hint(arrays)}"
        )
    flat = {}
    for key, (path, _) in mapping.items():
        value = arrays[key].astype(np.float32)
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        flat[path] = np.ascontiguousarray(value)
    return traverse_util.unflatten_dict(flat)


def _hint(arrays: Mapping[str, np.ndarray]) -> str:
    if "fc.weight" in arrays or any(k.startswith("layer0.") for k in arrays):
        return (
            "It looks like a DRN ImageNet classifier (layer0.* / fc.* keys, e.g. drn_d_105-12b40979.pth), "
            "not the Cityscapes segmenter. " + _download_hint()
        )
    try:
        found = infer_model(arrays)
    except (WeightsError, ValueError, KeyError, IndexError):
        return _download_hint()
    arch = found.arch
    if arch:
        return f"The file holds DRNSeg {_describe(found)}: pass --arch {arch} (or --arch auto)."
    return f"The file holds DRNSeg {_describe(found)}, no fyu/drn drn_d_* preset: pass --arch auto."


def load_state_dict(weights_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state_dict of a .pth file as float32 numpy arrays; FileNotFoundError says where to get it."""
    path = os.path.expanduser(os.fspath(weights_path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DRN segmenter weights not found at {path}. " + _download_hint())
    from ganjax.interop import torch as torch_io  # needs torch only when called

    return torch_io.read_state_dict(path)


def load(
    weights_path: str | os.PathLike, arch: str | drn.DRNSeg = DEFAULT_ARCH, *, num_classes: int | None = None
) -> tuple[drn.DRNSeg, dict]:
    """(model, variables) from a .pth. arch: a fyu/drn name (drn_d_105, ...; num_classes default 19), a
    DRNSeg, or "auto" (architecture and num_classes read from the file, `infer_model`)."""
    state_dict = load_state_dict(weights_path)
    if isinstance(arch, drn.DRNSeg):
        model = arch
    elif arch == "auto":
        model = infer_model(state_dict)
    else:
        model = drn.DRNSeg.from_arch(arch, num_classes=num_classes or drn.CITYSCAPES_CLASSES)
    if num_classes is not None and model.num_classes != num_classes:
        raise WeightsError(f"num_classes={num_classes}, but the model has {model.num_classes} classes")
    return model, convert_state_dict(state_dict, model)


# ---- The segmenter -----------------------------------------------------------------------------------


class DRNSegmenter:
    """A `ganjax.evaluation.segmentation` segmenter: `num_classes` and
    `__call__(photos float32 (N, H, W, 3) in [-1, 1]) -> int32 (N, H, W)` train ids, computed as
    GAN Compression's mIoU does (`drn.log_probabilities`: uint8 quantisation unless quantize=False,
    Cityscapes mean/std, DRNSeg, argmax), `batch_size` photos per call (the last batch is padded)."""

    def __init__(self, model: drn.DRNSeg, variables, *, batch_size: int = 8, quantize: bool = True):
        self.model, self.num_classes = model, model.num_classes
        self.variables = jax.device_put(variables)
        self.batch_size, self.quantize = batch_size, quantize
        self._log_probs = jax.jit(lambda v, x: drn.log_probabilities(model, v, x, quantize))
        self._labels = jax.jit(lambda v, x: jnp.argmax(self._log_probs(v, x), axis=-1).astype(jnp.int32))

    def _batched(self, fn, photos: np.ndarray) -> np.ndarray:
        photos = np.asarray(photos, np.float32)
        if photos.ndim != 4 or photos.shape[-1] != 3:
            raise ValueError(f"photos must be (N, H, W, 3), got {photos.shape}")
        return batching.batched(lambda batch: fn(self.variables, batch), (photos,), self.batch_size)

    def log_probabilities(self, photos: np.ndarray) -> np.ndarray:
        """float32 (N, H, W, num_classes): DRNSeg's LogSoftmax output for the photos."""
        return self._batched(self._log_probs, photos)

    def __call__(self, photos: np.ndarray) -> np.ndarray:
        return self._batched(self._labels, photos)


def build_segmenter(
    weights_path: str | os.PathLike,
    arch: str | drn.DRNSeg = DEFAULT_ARCH,
    *,
    batch_size: int = 8,
    quantize: bool = True,
) -> DRNSegmenter:
    """The `DRNSegmenter` of a DRNSeg .pth (default: GAN Compression's drn-d-105_ms_cityscapes.pth)."""
    model, variables = load(weights_path, arch)
    return DRNSegmenter(model, variables, batch_size=batch_size, quantize=quantize)


def segment_function(model: drn.DRNSeg, variables, *, quantize: bool = True):
    """photos float32 (b, H, W, 3) in [-1, 1] -> float32 (b, H, W, K) log-probabilities, the variables
    baked in (the function `export` writes)."""
    constants = jax.tree.map(jnp.asarray, variables)

    def segment(photos):
        return drn.log_probabilities(model, constants, photos, quantize)

    return segment


def export(
    weights_path: str | os.PathLike,
    output: str | os.PathLike,
    *,
    height: int = DEFAULT_SIZE[0],
    width: int = DEFAULT_SIZE[1],
    arch: str | drn.DRNSeg = DEFAULT_ARCH,
    quantize: bool = True,
    platforms: tuple[str, ...] = ("cpu", "cuda", "tpu"),
) -> dict:
    """Converts a DRNSeg .pth and writes it with `segmentation.export_segmenter` (output "logits": the
    log-probabilities at height x width); returns the sidecar dict. config.eval.segmenter=output uses it
    (photos of another size are resized to height x width and the labels back)."""
    from ganjax.evaluation import segmentation

    model, variables = load(weights_path, arch)
    description = (
        f"fyu/drn DRNSeg {_describe(model)} from {os.path.basename(os.fspath(weights_path))}, converted by "
        "ganjax.interop.drn_weights; GAN Compression's mIoU input pipeline ("
        + ("uint8 quantisation, " if quantize else "")
        + "Cityscapes mean/std); outputs log-probabilities"
    )
    return segmentation.export_segmenter(
        segment_function(model, variables, quantize=quantize),
        os.fspath(output),
        height=height,
        width=width,
        num_classes=model.num_classes,
        output="logits",
        description=description,
        platforms=platforms,
    )


# ---- Command line ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ganjax.interop.drn_weights",
        description=__doc__.split("\n\n", 1)[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--weights", required=True, help=f"the DRNSeg .pth, e.g. {WEIGHTS_FILENAME}")
    parser.add_argument("--output", required=True, help="the jax.export file to write (and OUTPUT.json)")
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=DEFAULT_SIZE,
        metavar=("H", "W"),
        help="input height and width of the exported function (default 256 256, GAN Compression's pix2pix "
        "Cityscapes size; multiples of 8 give DRNSeg's output size without a resize)",
    )
    parser.add_argument(
        "--arch",
        default=DEFAULT_ARCH,
        choices=(*drn.ARCHS, "auto"),
        help="the fyu/drn architecture of the file (default drn_d_105); auto reads it from the file",
    )
    parser.add_argument(
        "--no_quantize",
        dest="quantize",
        action="store_false",
        help="skip GAN Compression's uint8 truncation of the photos before normalising",
    )
    parser.add_argument(
        "--platforms",
        default="cpu,cuda,tpu",
        help="comma-separated jax.export platforms (default cpu,cuda,tpu)",
    )
    args = parser.parse_args(argv)
    if min(args.size) < 1:
        parser.error(f"--size must be positive, got {args.size}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Converts and exports; returns the sidecar dict."""
    args = parse_args(argv)
    height, width = args.size
    meta = export(
        args.weights,
        args.output,
        height=height,
        width=width,
        arch=args.arch,
        quantize=args.quantize,
        platforms=tuple(p.strip() for p in args.platforms.split(",") if p.strip()),
    )
    output = os.path.abspath(args.output)
    print(
        f"wrote {output} (+ .json): {meta['description']}; input (b, {height}, {width}, 3) in [-1, 1]. "
        f"Use it with --config.eval.segmenter={output}"
    )
    if height % drn.OUTPUT_STRIDE or width % drn.OUTPUT_STRIDE:
        print(
            f"note: {height} x {width} is not a multiple of {drn.OUTPUT_STRIDE}: DRNSeg's output is resized "
            "to it.",
            file=sys.stderr,
        )
    return meta


if __name__ == "__main__":
    try:
        main()
    except (WeightsError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
