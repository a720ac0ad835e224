"""DRN-D semantic segmenter (Yu, Koltun, Funkhouser, "Dilated Residual Networks", CVPR 2017) in Flax.

GAN Compression (mit-han-lab/gan-compression) scores Cityscapes label -> photo generators with fyu/drn's
DRN-D-105 segmenter (`drn-d-105_ms_cityscapes.pth`, 19 classes; converter and segmenter:
`ganjax.interop.drn_weights`). This is a transcription of that network, followed line by line:

  fyu/drn drn.py          `DRN(arch="D")`, `Bottleneck`, `BasicBlock`, `drn_d_*` (gan-compression's
                          metric/drn.py is a copy of it);
  fyu/drn segment.py      `DRNSeg` and `fill_up_weights` (gan-compression's metric/mIoU_score.py, formerly
                          metric/cityscapes_mIoU.py, holds the same class and the evaluation around it).

Network (arch "D", channels c = (16, 32, 64, 128, 256, 512, 512, 512), DRN-D-105: Bottleneck blocks,
layers = (1, 1, 3, 4, 23, 3, 1, 1)); every conv is bias-free and followed by BatchNorm2d (eps 1e-5,
running statistics: the network is evaluation-only here):

  layer0  conv 7x7 3 -> c0, BN, ReLU                                  stride 1
  layer1  layers[0] x (conv 3x3 -> c0, BN, ReLU)                      stride 1
  layer2  layers[1] x (conv 3x3 -> c1, BN, ReLU), first of stride 2   /2
  layer3  layers[2] residual blocks, planes c2, first of stride 2     /4
  layer4  layers[3] residual blocks, planes c3, first of stride 2     /8
  layer5  layers[4] residual blocks, planes c4, dilation 2
  layer6  layers[5] residual blocks, planes c5, dilation 4            (absent when layers[5] = 0)
  layer7  layers[6] x (conv 3x3 dilation 2 -> c6, BN, ReLU)           (absent when layers[6] = 0)
  layer8  layers[7] x (conv 3x3 dilation 1 -> c7, BN, ReLU)           (absent when layers[7] = 0)
  seg     conv 1x1 c7 -> num_classes, with bias
  up      ConvTranspose2d(K, K, 16, stride 8, padding 4, groups K, no bias): x8, frozen bilinear weights

Residual blocks (`_make_layer`): Bottleneck = conv 1x1 -> planes, conv 3x3 (stride, dilation d) -> planes,
conv 1x1 -> 4 planes, each with BN, ReLU after the first two and after the sum; BasicBlock = two 3x3 convs
(the first with the stride) -> planes. Block 0 adds a 1x1 conv (the stride) + BN shortcut ("downsample")
when the stride is not 1 or its input width differs from the output width. In arch D every block of a
layer has the layer's dilation on its 3x3 convs (padding = dilation). `DRNSeg.base` is `DRN`'s children
without `avgpool` and `fc`, so the classifier head is not part of the segmenter.

Shapes (NHWC, float32): (B, H, W, 3) normalised photos (see `normalize`) -> (B, 8h, 8w, num_classes)
class scores, h = ceil(H / 8) and w = ceil(W / 8) the size after layer4 (strided convs round up), so
the output is the input size when H and W are multiples of 8. `return_coarse` also returns the
(B, h, w, num_classes) scores before `up` (the reference's second output). The reference's output is
`LogSoftmax` of the scores (`log_probabilities`); argmax is the same either way.

Parameter names mirror the PyTorch module tree so that the key mapping is mechanical
(`ganjax.interop.drn_weights`): params/layer{i}/conv_{j}, bn_{j} for conv groups (torch
base.{n}.{3j}, base.{n}.{3j+1}); params/layer{i}/block_{j}/{conv1, bn1, conv2, bn2, conv3, bn3,
downsample_conv, downsample_bn} for residual layers (torch base.{n}.{j}.conv1 ... base.{n}.{j}.downsample.0
/.1); params/seg; params/up (n: the layer's index among the layers present).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ganjax.models.layers import BatchNorm, Conv2d

CHANNELS = (16, 32, 64, 128, 256, 512, 512, 512)  # `DRN(channels=...)`'s default, used by every drn_d_*
BLOCKS = ("basic", "bottleneck")
EXPANSION = {"basic": 1, "bottleneck": 4}
# fyu/drn drn.py: the DRN-D constructors (block, layers).
ARCHS = {
    "drn_d_22": ("basic", (1, 1, 2, 2, 2, 2, 1, 1)),
    "drn_d_24": ("basic", (1, 1, 2, 2, 2, 2, 2, 2)),
    "drn_d_38": ("basic", (1, 1, 3, 4, 6, 3, 1, 1)),
    "drn_d_40": ("basic", (1, 1, 3, 4, 6, 3, 2, 2)),
    "drn_d_54": ("bottleneck", (1, 1, 3, 4, 6, 3, 1, 1)),
    "drn_d_56": ("bottleneck", (1, 1, 3, 4, 6, 3, 2, 2)),
    "drn_d_105": ("bottleneck", (1, 1, 3, 4, 23, 3, 1, 1)),
    "drn_d_107": ("bottleneck", (1, 1, 3, 4, 23, 3, 2, 2)),
}
CITYSCAPES_CLASSES = 19
# fyu/drn datasets/cityscapes/info.json, hard-coded in gan-compression's metric/mIoU_score.py `SegList`.
CITYSCAPES_MEAN = (0.29010095242892997, 0.32808144844279574, 0.28696394422942517)
CITYSCAPES_STD = (0.1829540508368939, 0.18656561047509476, 0.18447508988480435)
OUTPUT_STRIDE = 8
UP_KERNEL, UP_STRIDE, UP_PADDING = 16, 8, 4  # DRNSeg.up
BN_EPSILON = 1e-5  # torch.nn.BatchNorm2d's default
_PRECISIONS = ("highest", "high", "default")


class LayerSpec(NamedTuple):
    """One of DRN's layer0..layer8: `kind` "conv" (`_make_conv_layers`, and layer0) or "residual"
    (`_make_layer`); `count` convs or blocks; `channels` the conv width or the blocks' planes."""

    name: str
    kind: str
    count: int
    channels: int
    stride: int
    dilation: int
    kernel_size: int = 3
    downsample: bool = False  # residual: block 0 has the 1x1 conv + BN shortcut


def layer_plan(layers, channels=CHANNELS, block: str = "bottleneck") -> list[LayerSpec]:
    """The layers `DRN(block, layers, channels=channels, arch="D")` builds, in order, absent ones left
    out (layers[5..7] = 0), with the shortcut decisions of `_make_layer` (its `self.inplanes`)."""
    layers, channels = tuple(layers), tuple(channels)
    if len(layers) != 8 or len(channels) != 8:
        raise ValueError(f"layers and channels need 8 entries each, got {layers} and {channels}")
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
    if min(layers[:5]) < 1:
        raise ValueError(f"layers[0..4] must be >= 1 (only layer6..layer8 may be absent), got {layers}")
    expansion = EXPANSION[block]
    plan = [LayerSpec("layer0", "conv", 1, channels[0], 1, 1, kernel_size=7)]
    plan.append(LayerSpec("layer1", "conv", layers[0], channels[0], 1, 1))
    plan.append(LayerSpec("layer2", "conv", layers[1], channels[1], 2, 1))
    inplanes = channels[1]
    for i, (stride, dilation) in zip((2, 3, 4, 5), ((2, 1), (2, 1), (1, 2), (1, 4)), strict=True):
        if layers[i] == 0:  # only layer6
            continue
        planes = channels[i]
        downsample = stride != 1 or inplanes != planes * expansion
        plan.append(
            LayerSpec(f"layer{i + 1}", "residual", layers[i], planes, stride, dilation, 3, downsample)
        )
        inplanes = planes * expansion
    for i, dilation in ((6, 2), (7, 1)):
        if layers[i]:
            plan.append(LayerSpec(f"layer{i + 1}", "conv", layers[i], channels[i], 1, dilation))
    return plan


def bilinear_up_kernel(kernel_size: int = UP_KERNEL) -> np.ndarray:
    """(k, k) float32: fyu/drn segment.py `fill_up_weights`, the bilinear kernel of DRNSeg.up."""
    f = math.ceil(kernel_size / 2)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    r = 1 - np.abs(np.arange(kernel_size) / f - c)
    return np.outer(r, r).astype(np.float32)


def _up_kernel_init(key, shape, dtype=jnp.float32):
    del key
    k, _, _, classes = shape
    return jnp.broadcast_to(jnp.asarray(bilinear_up_kernel(k), dtype)[:, :, None, None], (k, k, 1, classes))


def _phase_taps(phase: int, kernel_size: int, stride: int, padding: int) -> dict[int, int]:
    """{d: t}: output index stride * m + phase of a transposed conv reads input m + d with kernel tap t."""
    k, s, p = kernel_size, stride, padding
    return {(phase + p - t) // s: t for t in range(k) if (phase + p - t) % s == 0}


def depthwise_conv_transpose(x, kernel, stride: int, padding: int):
    """`F.conv_transpose2d(x, w, stride=stride, padding=padding, groups=C)` for NHWC x (B, h, w, C) and
    kernel (k, k, 1, C) = w (C, 1, k, k).transpose(2, 3, 1, 0); output (B, (h-1)s - 2p + k, ..., C).

    Output pixel (s m + a, s n + b) is sum over taps of x[m + d_a, n + d_b] * w[t_a, t_b]
    (t = a + p - s d, `_phase_taps`): each of the s x s output phases is a few shifted copies of x times
    per-channel weights, summed elementwise and interleaved (depth-to-space). The same products as the
    literal transposed conv (a stride-dilated input convolved with the flipped kernel), without its
    multiplications by zero: on XLA:CPU that formulation of DRNSeg.up took 13 s for 8 images at 256 px.
    """
    k, s = kernel.shape[0], stride
    b, h, w, c = x.shape
    out_h, out_w = (h - 1) * s - 2 * padding + k, (w - 1) * s - 2 * padding + k
    rows_h, rows_w = -(-out_h // s), -(-out_w // s)
    taps = [_phase_taps(a, k, s, padding) for a in range(s)]
    shifts = sorted({d for phase_taps in taps for d in phase_taps})
    lo = max(0, -shifts[0])
    pad_h, pad_w = max(0, rows_h + shifts[-1] - h), max(0, rows_w + shifts[-1] - w)
    xp = jnp.pad(x, ((0, 0), (lo, pad_h), (lo, pad_w), (0, 0)))
    flat = kernel[:, :, 0, :].reshape(k * k, c)
    z = jnp.zeros((b, rows_h, s, rows_w, s, c), x.dtype)
    for di in shifts:
        for dj in shifts:
            # this shift's weight for each output phase (a, a2), zero where the phase has no such tap
            index, used = np.zeros((s, s), np.int64), np.zeros((s, s), bool)
            for a, taps_a in enumerate(taps):
                for a2, taps_b in enumerate(taps):
                    if di in taps_a and dj in taps_b:
                        used[a, a2], index[a, a2] = True, taps_a[di] * k + taps_b[dj]
            if not used.any():
                continue
            weights = jnp.where(used[..., None], flat[index], 0.0)  # (s, s, C)
            view = jax.lax.slice(xp, (0, di + lo, dj + lo, 0), (b, di + lo + rows_h, dj + lo + rows_w, c))
            z = z + view[:, :, None, :, None, :] * weights[None, None, :, None, :, :]
    return z.reshape(b, rows_h * s, rows_w * s, c)[:, :out_h, :out_w, :]


class DepthwiseUpsample(nn.Module):
    """DRNSeg.up: `ConvTranspose2d(C, C, 16, stride=8, padding=4, groups=C, bias=False)`.

    kernel (k, k, 1, C) = torch weight (C, 1, k, k).transpose(2, 3, 1, 0) (the layout of
    `layers.ConvTranspose2d`), initialised to `fill_up_weights`; `depthwise_conv_transpose`.
    (B, h, w, C) -> (B, (h-1)*8 - 8 + 16, ...) = (B, 8h, 8w, C).
    """

    kernel_size: int = UP_KERNEL
    stride: int = UP_STRIDE
    padding: int = UP_PADDING

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", _up_kernel_init, (k, k, 1, x.shape[-1]), jnp.float32)
        return depthwise_conv_transpose(x, kernel, self.stride, self.padding)


def _conv(features, kernel_size, stride=1, dilation=1, name=None):
    """torch `nn.Conv2d(..., padding=dilation * (k // 2), dilation=dilation, bias=False)`."""
    return Conv2d(
        features,
        kernel_size,
        stride=stride,
        padding=dilation * (kernel_size // 2),
        dilation=dilation,
        use_bias=False,
        impl="reference",
        name=name,
    )


def _bn(name):
    bn = BatchNorm(epsilon=BN_EPSILON, name=name)
    return lambda x: bn(x, use_running_average=True)


def _shortcut(x, width: int, stride: int, downsample: bool):
    """A block's residual branch: x, or `downsample` = Sequential(conv 1x1 (stride), BN) when it changes
    the width or the resolution. Called inside a block's compact method, so the layers are the block's."""
    if not downsample:
        return x
    return _bn("downsample_bn")(_conv(width, 1, stride, name="downsample_conv")(x))


class Bottleneck(nn.Module):
    """fyu/drn `Bottleneck` (expansion 4): 1x1 -> 3x3 (stride, dilation) -> 1x1 x4, residual sum, ReLU."""

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False

    @nn.compact
    def __call__(self, x):
        out = nn.relu(_bn("bn1")(_conv(self.planes, 1, name="conv1")(x)))
        out = _conv(self.planes, 3, self.stride, self.dilation, name="conv2")(out)
        out = nn.relu(_bn("bn2")(out))
        out = _bn("bn3")(_conv(self.planes * 4, 1, name="conv3")(out))
        return nn.relu(out + _shortcut(x, self.planes * 4, self.stride, self.downsample))


class BasicBlock(nn.Module):
    """fyu/drn `BasicBlock` (expansion 1, residual=True as in arch D): 3x3 (stride) -> 3x3, sum, ReLU."""

    planes: int
    stride: int = 1
    dilation: int = 1
    downsample: bool = False

    @nn.compact
    def __call__(self, x):
        out = _conv(self.planes, 3, self.stride, self.dilation, name="conv1")(x)
        out = nn.relu(_bn("bn1")(out))
        out = _bn("bn2")(_conv(self.planes, 3, 1, self.dilation, name="conv2")(out))
        return nn.relu(out + _shortcut(x, self.planes, self.stride, self.downsample))


class ConvLayers(nn.Module):
    """fyu/drn `_make_conv_layers` (and layer0): `count` x (conv, BN, ReLU); only the first is strided."""

    spec: LayerSpec

    @nn.compact
    def __call__(self, x):
        s = self.spec
        for j in range(s.count):
            conv = _conv(s.channels, s.kernel_size, s.stride if j == 0 else 1, s.dilation, name=f"conv_{j}")
            x = nn.relu(_bn(f"bn_{j}")(conv(x)))
        return x


class ResidualLayer(nn.Module):
    """fyu/drn `_make_layer` in arch D: `count` blocks, the first with the stride and the shortcut."""

    spec: LayerSpec
    block: str = "bottleneck"

    @nn.compact
    def __call__(self, x):
        s = self.spec
        cls = Bottleneck if self.block == "bottleneck" else BasicBlock
        for j in range(s.count):
            first = j == 0
            x = cls(
                s.channels,
                stride=s.stride if first else 1,
                dilation=s.dilation,
                downsample=first and s.downsample,
                name=f"block_{j}",
            )(x)
        return x


class DRNSeg(nn.Module):
    """fyu/drn `DRNSeg(model_name, classes)` with arch "D", evaluation mode (see the module docstring).

    Defaults are DRN-D-105 with 19 classes (`drn-d-105_ms_cityscapes.pth`); `from_arch` builds the others.
    (B, H, W, 3) normalised photos -> (B, 8 ceil(H/8), 8 ceil(W/8), num_classes) scores, plus the coarse
    (B, ceil(H/8), ceil(W/8), num_classes) scores with `return_coarse`. precision: of every conv
    ("highest": full float32 on every backend; "default" lets TPUs use bfloat16 passes).
    """

    layers: tuple[int, ...] = ARCHS["drn_d_105"][1]
    channels: tuple[int, ...] = CHANNELS
    num_classes: int = CITYSCAPES_CLASSES
    block: str = "bottleneck"
    precision: str = "highest"

    @classmethod
    def from_arch(cls, arch: str, num_classes: int = CITYSCAPES_CLASSES, **kwargs) -> DRNSeg:
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {tuple(ARCHS)}, got {arch!r}")
        block, layers = ARCHS[arch]
        return cls(layers=layers, num_classes=num_classes, block=block, **kwargs)

    @property
    def arch(self) -> str | None:
        """The fyu/drn constructor name of this configuration, or None."""
        for name, (block, layers) in ARCHS.items():
            if (block, layers, tuple(self.channels)) == (self.block, tuple(self.layers), CHANNELS):
                return name
        return None

    @nn.compact
    def __call__(self, x, return_coarse: bool = False):
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {_PRECISIONS}, got {self.precision!r}")
        with jax.default_matmul_precision(self.precision):
            x = x.astype(jnp.float32)
            for spec in layer_plan(self.layers, self.channels, self.block):
                if spec.kind == "conv":
                    x = ConvLayers(spec, name=spec.name)(x)
                else:
                    x = ResidualLayer(spec, self.block, name=spec.name)(x)
            coarse = Conv2d(self.num_classes, 1, use_bias=True, impl="reference", name="seg")(x)
            scores = DepthwiseUpsample(name="up")(coarse)
        return (scores, coarse) if return_coarse else scores


def variable_shapes(model: DRNSeg) -> dict:
    """The {"params", "batch_stats"} tree of ShapeDtypeStructs (no computation, no weights)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3), jnp.float32))
    return dict(shapes)


def normalize(photos, quantize: bool = True):
    """float (B, H, W, 3) photos in [-1, 1] -> the reference's network input, float32.

    GAN Compression (metric/__init__.py `get_mIoU`, metric/mIoU_score.py `SegList`): `util.tensor2im`
    (uint8 = clip((x + 1) / 2 * 255, 0, 255) truncated), `ToTensor` (/ 255) and `Normalize` with the
    Cityscapes mean and std. quantize=False skips the uint8 truncation.
    """
    x = (photos.astype(jnp.float32) + 1.0) / 2.0 * 255.0
    x = jnp.clip(x, 0.0, 255.0)
    if quantize:
        x = jnp.floor(x)
    x = x / 255.0
    return (x - jnp.asarray(CITYSCAPES_MEAN, jnp.float32)) / jnp.asarray(CITYSCAPES_STD, jnp.float32)


def log_probabilities(model: DRNSeg, variables, photos, quantize: bool = True):
    """(B, H, W, 3) photos in [-1, 1] -> (B, H, W, K) float32 log-probabilities: `normalize`, the
    network, LogSoftmax over classes (DRNSeg.forward's first output). Sizes that are not multiples of 8
    give a larger output (see `DRNSeg`), resized (bilinear) to H x W as the reference resizes its
    output to the labels' size (`resize_4d_tensor`)."""
    b, h, w, _ = photos.shape
    scores = jax.nn.log_softmax(model.apply(variables, normalize(photos, quantize)), axis=-1)
    if scores.shape[1:3] != (h, w):
        scores = jax.image.resize(scores, (b, h, w, scores.shape[-1]), "linear")
    return scores
