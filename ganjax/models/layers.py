"""Small layers shared by the generators and discriminators.

All tensors are NHWC float arrays.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


class InstanceNorm(nn.Module):
    """InstanceNorm as in PyTorch's `nn.InstanceNorm2d` default: no affine, no running stats.

    eps is 1e-5 (PyTorch's), not Flax's 1e-6, so that ported weights give the same outputs.
    (B, H, W, C) -> (B, H, W, C).
    """

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        mean = jnp.mean(x, axis=(1, 2), keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon)


def reflect_pad(x, pad: int):
    """Reflection padding of the two spatial axes of an NHWC tensor (PyTorch's ReflectionPad2d)."""
    if pad == 0:
        return x
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


# ---------------------------------------------------------------------------------------------
# Exact PyTorch layer formulations.
#
# Parameters follow Flax's names and layouts, so the trees look like `nn.Conv`/`nn.ConvTranspose`:
#   Conv2d          kernel (k, k, C_in, C_out)  = torch weight (C_out, C_in, k, k).transpose(2, 3, 1, 0)
#   ConvTranspose2d kernel (k, k, C_out, C_in)  = torch weight (C_in, C_out, k, k).transpose(2, 3, 1, 0)
#   BatchNorm       params scale/bias (C,), batch_stats mean/var (C,)
# Each conv layer has two implementations with the same parameters and the same outputs:
#   "reference": the literal layer (reflection pad + VALID conv, `lax.conv_transpose`);
#   "fast":      exact rewrites that avoid XLA:CPU slow paths (see DESIGN.md): VALID convs become
#                padded convs plus a crop, transposed convs become a stride-1 conv + depth-to-space.
# "auto" picks "fast" on CPU and "reference" on accelerators.
# ---------------------------------------------------------------------------------------------

CONV_IMPLS = ("auto", "reference", "fast")

# Weight init of the reference code (`init_weights(init_type="normal", gain=0.02)`).
conv_init = nn.initializers.normal(stddev=0.02)


def bn_scale_init(key, shape, dtype=jnp.float32):
    """BatchNorm weight ~ N(1, 0.02), as in the reference `init_weights`."""
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def resolve_conv_impl(impl: str) -> str:
    """Maps "auto" to "fast" on the CPU backend and to "reference" elsewhere."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "fast" if jax.default_backend() == "cpu" else "reference"
    return impl


_NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, kernel, stride, padding):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=_NHWC)


class Conv2d(nn.Module):
    """`torch.nn.Conv2d` with square kernels, optionally preceded by `ReflectionPad2d(padding)`.

    padding_mode "zeros": Conv2d(k, stride, padding). padding_mode "reflect": ReflectionPad2d(padding)
    followed by Conv2d(k, stride, padding=0), the pattern of the ResNet generator.
    (B, H, W, C_in) -> (B, H', W', features) in `dtype`; parameters are float32.
    """

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    padding_mode: str = "zeros"
    use_bias: bool = True
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", conv_init, (k, k, x.shape[-1], self.features), jnp.float32)
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        p = self.padding
        if self.padding_mode == "reflect":
            x, p = reflect_pad(x, p), 0
        elif self.padding_mode != "zeros":
            raise ValueError(f"padding_mode must be 'zeros' or 'reflect', got {self.padding_mode!r}")

        if p == 0 and self.stride == 1 and resolve_conv_impl(self.impl) == "fast":
            # XLA:CPU runs VALID convs 3-10x slower than padded ones (measured on the ResNet's 3x3 and
            # 7x7 convs, forward and backward); a one-pixel zero pad and crop gives the same values.
            y = _conv(x, kernel, 1, ((1, 1), (1, 1)))[:, 1:-1, 1:-1, :]
        else:
            y = _conv(x, kernel, self.stride, ((p, p), (p, p)))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class _SubpixelPlan(NamedTuple):
    length: int  # taps of the stride-1 conv
    pad: tuple[int, int]  # its zero padding (lo, hi)
    taps: list[list[int]]  # taps[a][j]: kernel index used by phase a at window position j, or -1
    start: list[int]  # phase a's outputs are rows start[a] .. start[a] + rows - 1 of the conv
    rows: int  # ceil(out_size / stride)
    out_size: int


def _subpixel_plan(in_size, kernel_size, stride, padding, output_padding) -> _SubpixelPlan:
    """Splits one spatial axis of a transposed conv into `stride` phases of a stride-1 conv.

    PyTorch's transposed conv computes y[o] = sum_{i, t: o = s*i - p + t} x[i] w[t]. Output phase
    a (o = s*m + a) therefore reads x[m + d] with tap t = a + p - s*d. All phases are computed by one
    stride-1 conv of `length` taps over x zero-padded by (lo, hi); phase a's outputs m = 0..M-1 are its
    rows start[a] .. start[a] + M - 1, M = ceil(out_size / s) (the last rows are cropped if needed).
    """
    k, s, p = kernel_size, stride, padding
    out_size = (in_size - 1) * s - 2 * p + k + output_padding
    m_out = -(-out_size // s)  # phases are computed for ceil(out / s) rows, then cropped to out_size
    offsets = []  # per phase: {d: t}
    for a in range(s):
        ds = {(a + p - t) // s: t for t in range(k) if (a + p - t) % s == 0}
        if not ds:
            raise ValueError("a phase without taps: kernel_size < stride is not supported")
        offsets.append(ds)
    d_min = [min(ds) for ds in offsets]
    length = max(max(ds) - min(ds) + 1 for ds in offsets)
    lo = max(0, -min(d_min))
    hi = max(0, m_out + max(d_min) + length - 1 - in_size)
    taps = [[ds.get(d0 + j, -1) for j in range(length)] for ds, d0 in zip(offsets, d_min, strict=True)]
    start = [d0 + lo for d0 in d_min]
    return _SubpixelPlan(length, (lo, hi), taps, start, m_out, out_size)


def conv_transpose_subpixel(x, kernel, stride, padding, output_padding):
    """`torch.nn.functional.conv_transpose2d` as a stride-1 conv followed by depth-to-space.

    x (B, H, W, C_in); kernel (k, k, C_out, C_in) in the layout described at the top of this section.
    Returns (B, H_out, W_out, C_out). Same arithmetic as the transposed conv, but XLA:CPU's backward
    pass of `conv_transpose` is 20-30x slower than that of an ordinary conv.
    """
    k = kernel.shape[0]
    s = stride
    b, h, w, c_in = x.shape
    c_out = kernel.shape[2]
    plan_h = _subpixel_plan(h, k, s, padding, output_padding)
    plan_w = _subpixel_plan(w, k, s, padding, output_padding)

    def gather(taps):
        idx = np.asarray(taps)  # (s, length)
        return np.maximum(idx, 0), idx >= 0

    (iy, my), (ix, mx) = gather(plan_h.taps), gather(plan_w.taps)
    # sub[a, j, b, l, o, i] = kernel[iy[a, j], ix[b, l], o, i], zero where a phase has no tap.
    sub = kernel[iy[:, :, None, None], ix[None, None, :, :]]
    mask = (my[:, :, None, None] & mx[None, None, :, :]).astype(kernel.dtype)
    sub = sub * mask[..., None, None]
    # -> (j, l, i, a, b, o): a stride-1 conv with s*s*C_out output channels, phases major.
    sub = sub.transpose(1, 3, 5, 0, 2, 4).reshape(plan_h.length, plan_w.length, c_in, s * s * c_out)
    # Zero-pad the low side explicitly and let the conv pad only the high side: with padding on both
    # sides XLA:CPU's kernel gradient of this conv takes a slow path (2.8 s vs 0.08 s for the U-Net's
    # 64 -> 128 px layer, fwd+bwd).
    (lo_h, hi_h), (lo_w, hi_w) = plan_h.pad, plan_w.pad
    x = jnp.pad(x, ((0, 0), (lo_h, 0), (lo_w, 0), (0, 0)))
    z = _conv(x, sub, 1, ((0, hi_h), (0, hi_w)))
    z = z.reshape(b, z.shape[1], z.shape[2], s, s, c_out)

    def take_phases(z, axis, plan):
        # Phase a of `axis` lives in rows start[a]..start[a]+m-1 and in the phase axis `axis + 2`.
        start, m = plan.start, plan.rows
        if len(set(start)) == 1:  # e.g. the ResNet's k3 s2 p1 op1: a single slice
            return jax.lax.slice_in_dim(z, start[0], start[0] + m, axis=axis)
        parts = [
            jax.lax.slice_in_dim(jnp.take(z, a, axis=axis + 2), st, st + m, axis=axis)
            for a, st in enumerate(start)
        ]
        return jnp.stack(parts, axis=axis + 2)

    z = take_phases(z, 1, plan_h)  # (B, M_h, W', s, s, C)
    z = take_phases(z, 2, plan_w)  # (B, M_h, M_w, s, s, C)
    # Depth-to-space: y[s*m + a, s*n + b] = z[m, n, a, b].
    z = z.transpose(0, 1, 3, 2, 4, 5).reshape(b, plan_h.rows * s, plan_w.rows * s, c_out)
    return z[:, : plan_h.out_size, : plan_w.out_size, :]


class ConvTranspose2d(nn.Module):
    """`torch.nn.ConvTranspose2d(C_in, features, k, stride, padding, output_padding)`.

    (B, H, W, C_in) -> (B, (H-1)*stride - 2*padding + k + output_padding, ..., features) in `dtype`.
    "reference" is `nn.ConvTranspose(padding=(k-1-p, k-1-p+op), transpose_kernel=True)`'s arithmetic;
    "fast" is `conv_transpose_subpixel`. Both use the same kernel (k, k, features, C_in).
    """

    features: int
    kernel_size: int
    stride: int = 2
    padding: int = 0
    output_padding: int = 0
    use_bias: bool = True
    impl: str = "auto"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        k, p, op = self.kernel_size, self.padding, self.output_padding
        kernel = self.param("kernel", conv_init, (k, k, self.features, x.shape[-1]), jnp.float32)
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        if resolve_conv_impl(self.impl) == "fast":
            y = conv_transpose_subpixel(x, kernel, self.stride, p, op)
        else:
            pad = (k - 1 - p, k - 1 - p + op)
            y = jax.lax.conv_transpose(
                x,
                kernel,
                (self.stride, self.stride),
                (pad, pad),
                dimension_numbers=_NHWC,
                transpose_kernel=True,
            )
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class BatchNorm(nn.Module):
    """`torch.nn.BatchNorm2d` (affine, running stats) with PyTorch's exact statistics.

    momentum uses Flax's convention: running = momentum * running + (1 - momentum) * batch, so 0.9 is
    PyTorch's momentum=0.1. As in PyTorch (and unlike `flax.linen.BatchNorm`), the running variance is
    updated with the unbiased batch variance, n / (n - 1) times the variance used to normalise.
    Statistics are computed in float32. Running stats live in the "batch_stats" collection and are
    updated when `use_running_average=False` (make "batch_stats" mutable), except during init.
    Under `jax.jit` with a batch-sharded input the means are over the global batch.
    (B, H, W, C) -> (B, H, W, C) in `dtype`.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, use_running_average: bool):
        c = x.shape[-1]
        scale = self.param("scale", bn_scale_init, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        x32 = x.astype(jnp.float32)
        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(x32, axis=axes)
            var = jnp.mean(jnp.square(x32 - mean), axis=axes)
            if not self.is_initializing():
                n = x.size // c
                unbiased = var * (n / max(n - 1, 1))
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
                ra_var.value = m * ra_var.value + (1.0 - m) * unbiased
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(self.dtype)


NORMS = ("instance", "batch")


def norm_layer(kind: str, name: str, dtype=jnp.float32):
    """Returns `f(x, train) -> x` for the reference's `get_norm_layer(kind)`, as a named submodule.

    Call it inside a compact method. "instance": InstanceNorm (no affine, no running stats; statistics
    in float32). "batch": BatchNorm above (batch statistics when train, running ones otherwise).
    """
    if kind == "instance":
        mod = InstanceNorm(name=name)
        return lambda x, train: mod(x.astype(jnp.float32)).astype(dtype)
    if kind == "batch":
        mod = BatchNorm(name=name, dtype=dtype)
        return lambda x, train: mod(x, use_running_average=not train)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
