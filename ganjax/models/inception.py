"""The FID Inception-v3: the TensorFlow 2015-12-05 graph as ported by pytorch-fid, as a Flax module.

This is the network behind every published FID since TTUR (Heusel et al. 2017): the TF "pool_3" layer,
in the PyTorch port of github.com/mseitzer/pytorch-fid (`InceptionV3` with `use_fid_inception=True`).
It is torchvision's Inception3 with four patches, all reproduced here:

- Mixed_5b/5c/5d (InceptionA), Mixed_6b..6e (InceptionC) and Mixed_7b (InceptionE) average-pool their
  pool branch with `count_include_pad=False` (TF's average pool ignores the zero padding);
- Mixed_7c (the second InceptionE) max-pools that branch instead;
- the classifier has 1008 classes (TF's label map), unused by FID.

Weights: `pt_inception-2015-12-05-6726825d.pth` from
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
converted by `ganjax.interop.inception_weights` (module and variable names mirror the PyTorch
state_dict: `Mixed_5b.branch1x1.conv.weight` <-> params["Mixed_5b"]["branch1x1"]["conv"]["kernel"]).

Input: (B, H, W, 3) float in [-1, 1], ganjax's image convention (uint8 images u map to u / 127.5 - 1).
pytorch-fid takes [0, 1] images x, resizes them to 299 x 299 (bilinear, align_corners=False, no
antialiasing) and then maps them to 2x - 1. Bilinear weights sum to one, so resizing the [-1, 1] image
directly is the same computation. `resize_bilinear` is an exact port of that resize (JAX's
`jax.image.resize` antialiases when downsampling, which PyTorch's does not).
Output: (B, 2048) float32 pool3 features (global average of Mixed_7c), as pytorch-fid's block 3.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILENAME
)
INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # TF's 2015 label map; the classifier `fc` is in the weight file but not used for FID
BN_EPSILON = 1e-3  # torchvision's BasicConv2d: BatchNorm2d(eps=0.001)
# Smallest input the network accepts without resizing: Mixed_7a's stride-2 3x3 conv needs a 3x3 map.
MIN_INPUT_SIZE = 75

_PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}


@functools.lru_cache(maxsize=16)
def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 weights of PyTorch's 1-D bilinear resize with align_corners=False.

    As ATen's `area_pixel_compute_source_index` + `upsample_bilinear2d` (size given, no scale factor),
    in float32 like ATen: scale = in / out; src = max(scale * (dst + 0.5) - 0.5, 0) with the product and
    the subtraction fused (one rounding, as the compiled kernels' FMA); i0 = floor(src),
    i1 = min(i0 + 1, in - 1); weights 1 - (src - i0) on i0 and src - i0 on i1. These are bit-identical
    to PyTorch's CPU weights. No antialiasing when downsampling.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    centers = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    src = (np.float64(scale) * centers.astype(np.float64) - 0.5).astype(np.float32)  # exact product: FMA
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = src - i0.astype(np.float32)
    weights = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(weights, (rows, i0), np.float32(1.0) - frac)
    np.add.at(weights, (rows, i1), frac)
    return weights


def resize_bilinear(images, height: int, width: int, precision=jax.lax.Precision.HIGHEST):
    """(B, H, W, C) -> (B, height, width, C): `F.interpolate(mode="bilinear", align_corners=False)`."""
    _, h, w, _ = images.shape
    if (h, w) == (height, width):
        return images  # PyTorch's resize to the same size is the identity
    wh = jnp.asarray(bilinear_resize_matrix(h, height))
    ww = jnp.asarray(bilinear_resize_matrix(w, width))
    return jnp.einsum("oh,bhwc,pw->bopc", wh, images, ww, precision=precision)


class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: Conv2d (no bias) + BatchNorm2d(eps=1e-3, running stats) + ReLU.

    Inference only: the batch norm uses the running statistics ("batch_stats" collection).
    """

    features: int
    kernel_size: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        (ph, pw) = self.padding
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=(self.stride, self.stride),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=_PRECISIONS[self.precision],
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_no_pad_count(x):
    # TF's average pool divides by the number of real (unpadded) inputs: count_include_pad=False.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
    """FIDInceptionA (Mixed_5b/c/d): 35x35 blocks; 224 + pool_features channels out."""

    pool_features: int
    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_no_pad_count(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """InceptionB (Mixed_6a): 35x35 -> 17x17 reduction; 480 + C_in channels out."""

    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionC(nn.Module):
    """FIDInceptionC (Mixed_6b..6e): 17x17 blocks with factorised 7x7 convs; 768 channels out."""

    channels_7x7: int
    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        c7 = self.channels_7x7
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_no_pad_count(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """InceptionD (Mixed_7a): 17x17 -> 8x8 reduction; 512 + C_in channels out."""

    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class InceptionE(nn.Module):
    """FIDInceptionE_1 (Mixed_7b, pool="avg") / FIDInceptionE_2 (Mixed_7c, pool="max"); 2048 out."""

    pool: str
    precision: str = "highest"

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.pool == "avg":
            pooled = _avg_pool_3x3_no_pad_count(x)
        elif self.pool == "max":
            # The FID graph max-pools here (likely a bug in TF's 2015 graph, kept for comparability).
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's InceptionV3 (FID weights) up to the 2048-d pool3 features.

    images: (B, H, W, 3) float in [-1, 1] (any float dtype; computed in float32).
    resize_input: resize to 299 x 299 first (pytorch-fid's default); without it H, W >= 75.
    precision: "highest" (default: full float32 convolutions on every backend, so FID does not depend
    on TF32/bf16 matmul passes) or "default" (faster on GPU/TPU, slightly different features).
    Returns (B, 2048) float32. Variables: {"params", "batch_stats"}, see module docstring.
    """

    resize_input: bool = True
    precision: str = "highest"

    @nn.compact
    def __call__(self, images):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3), got {images.shape}")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(_PRECISIONS)}, got {self.precision!r}")
        x = images.astype(jnp.float32)
        if self.resize_input:
            x = resize_bilinear(x, INPUT_SIZE, INPUT_SIZE, _PRECISIONS[self.precision])
        elif min(x.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(f"without resizing, images must be at least {MIN_INPUT_SIZE} px, got {x.shape}")
        conv = functools.partial(BasicConv2d, precision=self.precision)
        p = self.precision
        # Block 0: 299 -> 147 (pytorch-fid's first max-pool features are after the pool below).
        x = conv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        # Block 1: 73 -> 35.
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_stride2(x)
        # Block 2: 35 -> 17.
        x = InceptionA(32, p, name="Mixed_5b")(x)
        x = InceptionA(64, p, name="Mixed_5c")(x)
        x = InceptionA(64, p, name="Mixed_5d")(x)
        x = InceptionB(p, name="Mixed_6a")(x)
        x = InceptionC(128, p, name="Mixed_6b")(x)
        x = InceptionC(160, p, name="Mixed_6c")(x)
        x = InceptionC(160, p, name="Mixed_6d")(x)
        x = InceptionC(192, p, name="Mixed_6e")(x)
        # Block 3: 17 -> 8, then the adaptive average pool to 1x1 (pool3).
        x = InceptionD(p, name="Mixed_7a")(x)
        x = InceptionE("avg", p, name="Mixed_7b")(x)
        x = InceptionE("max", p, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


def variable_shapes(model: FIDInceptionV3 | None = None) -> dict:
    """The {"params", "batch_stats"} tree of ShapeDtypeStructs (no computation, no weights)."""
    model = FIDInceptionV3() if model is None else model
    size = INPUT_SIZE if model.resize_input else MIN_INPUT_SIZE
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))
    return {k: v for k, v in dict(shapes).items()}
