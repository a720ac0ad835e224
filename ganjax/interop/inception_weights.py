"""pytorch-fid's Inception weights (`pt_inception-2015-12-05-6726825d.pth`) -> Flax variables.

Get the file (95 MB) once, on a machine with internet access, and pass its local path:
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
It is the TF 2015-12-05 Inception graph behind TTUR's FID, ported to PyTorch by pytorch-fid; GAN
Compression and the Co-Evolution/SRPKD evaluations use the same file.

The state_dict has torchvision Inception3 key names (aux_logits=False, 1008 classes):
  X.conv.weight (O, I, kh, kw)  -> params[...X]["conv"]["kernel"] (kh, kw, I, O)
  X.bn.weight / X.bn.bias       -> params[...X]["bn"]["scale"] / ["bias"]
  X.bn.running_mean / _var      -> batch_stats[...X]["bn"]["mean"] / ["var"]
where X is a dotted module path such as `Mixed_5b.branch1x1`. `fc.weight` (1008, 2048) and `fc.bias`
(the TF classifier) and any `*.num_batches_tracked` counters are checked and dropped: FID uses pool3.
Every key and shape is checked against `ganjax.models.inception.FIDInceptionV3`; the first missing,
unexpected or misshapen entry is named in the error.

Reading .pth needs torch (the [test] extra). The converted variables can be cached as an .npz (flat
keys such as `params/Mixed_5b/branch1x1/conv/kernel`), which later runs read without torch.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
from absl import logging
from flax import traverse_util

from ganjax.models import inception

# Present in the weight file, unused by FID: the 1008-way TF classifier.
CLASSIFIER_SHAPES = {
    "fc.weight": (inception.NUM_CLASSES, inception.FEATURE_DIM),
    "fc.bias": (inception.NUM_CLASSES,),
}
_IGNORED_SUFFIX = ".num_batches_tracked"  # BatchNorm step counters (only in files from torch >= 0.4.1)
# Flax (collection, leaf name) -> the torch parameter or buffer name (conv kernels also change layout).
_TORCH_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
NPZ_SUFFIX = ".flax.npz"


class WeightsError(ValueError):
    """The weight file is not the FID Inception's (wrong key, shape or format)."""


def torch_key_map(model: inception.FIDInceptionV3 | None = None) -> dict[str, tuple[tuple[str, ...], tuple]]:
    """torch state_dict key -> (Flax variable path, Flax shape), derived from the Flax module itself."""
    flat = traverse_util.flatten_dict(inception.variable_shapes(model))
    mapping = {}
    for path, leaf in flat.items():
        collection, *modules, name = path
        mapping[".".join([*modules, _TORCH_NAMES[(collection, name)]])] = (path, tuple(leaf.shape))
    return mapping


def _torch_shape(path: tuple[str, ...], flax_shape: tuple) -> tuple:
    if path[-1] == "kernel":  # Flax HWIO <- torch OIHW
        kh, kw, cin, cout = flax_shape
        return (cout, cin, kh, kw)
    return flax_shape


def _hint(arrays: dict[str, np.ndarray]) -> str:
    fc = arrays.get("fc.weight")
    if any(k.startswith("AuxLogits.") for k in arrays) or (fc is not None and fc.shape[0] == 1000):
        return (
            " It looks like torchvision's ImageNet Inception-v3 (AuxLogits or 1000 classes), "
            "(inception_v3_google), not the FID Inception. Use " + inception.FID_WEIGHTS_URL
        )
    return f" Expected pytorch-fid's {inception.FID_WEIGHTS_FILENAME} ({inception.FID_WEIGHTS_URL})."


def convert_state_dict(
    state_dict: dict[str, np.ndarray], model: inception.FIDInceptionV3 | None = None
) -> dict[str, dict]:
    """A pytorch-fid Inception state_dict (name -> array) -> {"params": ..., "batch_stats": ...} (numpy).

    Raises WeightsError naming the first missing key, unexpected key or shape mismatch.
    """
    mapping = torch_key_map(model)
    arrays = {k: np.asarray(v) for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIX)}
    missing = [k for k in mapping if k not in arrays]
    if missing:
        raise WeightsError(
            f"{len(missing)} Inception weights are missing, the first is {missing[0]!r}." + _hint(arrays)
        )
    unexpected = [k for k in arrays if k not in mapping and k not in CLASSIFIER_SHAPES]
    if unexpected:
        raise WeightsError(f"Unexpected key {unexpected[0]!r} ({len(unexpected)} in all)." + _hint(arrays))
    for key, shape in CLASSIFIER_SHAPES.items():
        if key in arrays and arrays[key].shape != shape:
            raise WeightsError(
                f"{key} has shape {arrays[key].shape}, expected {shape} (the 1008-class TF classifier)."
                + _hint(arrays)
            )
    flat = {}
    for key, (path, flax_shape) in mapping.items():
        value = arrays[key]
        expected = _torch_shape(path, flax_shape)
        if value.shape != expected:
            raise WeightsError(f"{key} has shape {value.shape}, expected {expected}." + _hint(arrays))
        if path[-1] == "kernel":
            value = value.transpose(2, 3, 1, 0)
        flat[path] = np.ascontiguousarray(value, dtype=np.float32)
    return traverse_util.unflatten_dict(flat)


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a .pth state_dict with `torch.load(weights_only=True)` into numpy arrays."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"Reading {os.fspath(path)} needs PyTorch (CPU is enough): pip install -e '.[test]' or "
            "pip install torch. Alternatively convert once on a machine with torch and pass the "
            f"resulting *{NPZ_SUFFIX} file instead of the .pth."
        ) from e
    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{os.fspath(path)} does not hold a state_dict (got {type(state).__name__}).")
    return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}


def save_npz(variables: dict, path: str | os.PathLike) -> None:
    """Flat .npz with keys like `params/Mixed_5b/branch1x1/conv/kernel` (written atomically)."""
    flat = traverse_util.flatten_dict(jax.device_get(variables), sep="/")
    path = os.fspath(path)
    tmp = path + ".tmp.npz"  # np.savez appends .npz to names without it
    np.savez(tmp, **{k: np.asarray(v) for k, v in flat.items()})
    os.replace(tmp, path)


def load_npz(path: str | os.PathLike, model: inception.FIDInceptionV3 | None = None) -> dict:
    """Reads `save_npz`'s file and checks every variable's presence and shape."""
    with np.load(os.fspath(path)) as data:
        flat = {tuple(k.split("/")): data[k] for k in data.files}
    expected = traverse_util.flatten_dict(inception.variable_shapes(model))
    for key, leaf in expected.items():
        if key not in flat:
            raise WeightsError(f"{os.fspath(path)} lacks {'/'.join(key)}; delete it and convert again.")
        if flat[key].shape != tuple(leaf.shape):
            raise WeightsError(
                f"{os.fspath(path)}: {'/'.join(key)} has shape {flat[key].shape}, expected {leaf.shape}."
            )
    extra = [k for k in flat if k not in expected]
    if extra:
        raise WeightsError(f"{os.fspath(path)} has an unexpected variable {'/'.join(extra[0])}.")
    return traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in flat.items()})


def default_cache_path(weights_path: str | os.PathLike) -> str:
    """`pt_inception-2015-12-05-6726825d.pth` -> `pt_inception-2015-12-05-6726825d.flax.npz` beside it."""
    return re.sub(r"\.pth?$", "", os.fspath(weights_path)) + NPZ_SUFFIX


def load_variables(
    weights_path: str | os.PathLike,
    cache_path: str | os.PathLike | None = None,
    model: inception.FIDInceptionV3 | None = None,
) -> dict:
    """FID Inception variables from the pytorch-fid .pth, or from an .npz this module wrote.

    With a .pth, the converted variables are cached at `cache_path` (default: `default_cache_path`
    beside the .pth) and read from there when the cache is newer than the .pth. A cache that cannot be
    written is skipped with a warning. Returns numpy {"params": ..., "batch_stats": ...}.
    """
    weights_path = os.fspath(weights_path)
    if not os.path.exists(weights_path):
        raise FileNotFoundError(
            f"FID Inception weights not found at {weights_path}. Download {inception.FID_WEIGHTS_URL} "
            "(95 MB) and pass its local path (or the .npz converted from it)."
        )
    if weights_path.endswith(".npz"):
        return load_npz(weights_path, model)
    cache = default_cache_path(weights_path) if cache_path is None else os.fspath(cache_path)
    if os.path.exists(cache) and os.path.getmtime(cache) >= os.path.getmtime(weights_path):
        logging.info("FID Inception: reading converted weights from %s", cache)
        return load_npz(cache, model)
    variables = convert_state_dict(load_torch_state_dict(weights_path), model)
    try:
        save_npz(variables, cache)
        logging.info("FID Inception: converted %s -> %s", weights_path, cache)
    except OSError as e:
        logging.warning("FID Inception: could not cache the converted weights at %s (%s).", cache, e)
    return variables
