"""The custom-VJP convolutions and InstanceNorm of ganjax.models.layers against XLA's own ops: values,
input gradients and kernel gradients agree to float32 rounding (1e-5 of the largest value; 5e-5 where the
Winograd passes compute them)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ganjax.models import layers

NHWC = ("NHWC", "HWIO", "NHWC")


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _compare(fast, reference, x, kernel, tol=1e-5):
    """Values and both gradients (for a random cotangent) of two functions of (x, kernel)."""
    y_ref = jax.jit(reference)(x, kernel)
    dy = jnp.asarray(np.random.default_rng(1).standard_normal(y_ref.shape), x.dtype)

    def value_and_vjp(fn, x, kernel, dy):
        y, vjp = jax.vjp(fn, x, kernel)
        return y, vjp(dy)

    # x, kernel and dy are arguments, not constants that XLA would fold at compile time (seconds per conv)
    (y, (dx, dk)), (y0, (dx0, dk0)) = (
        jax.jit(functools.partial(value_and_vjp, fast))(x, kernel, dy),
        jax.jit(functools.partial(value_and_vjp, reference))(x, kernel, dy),
    )
    assert y.shape == y0.shape and dx.shape == x.shape and dk.shape == kernel.shape
    for got, want in ((y, y0), (dx, dx0), (dk, dk0)):
        assert _rel(got, want) < tol


CONV_CASES = [
    (3, 1, 0, 10, 9, 5, 6),  # ResNet block conv after a reflection pad (pad 1 + crop forward)
    (7, 1, 0, 14, 14, 8, 3),  # ResNet head: 3 output channels
    (7, 1, 0, 14, 12, 3, 8),  # ResNet stem: 3 input channels (VALID forward)
    (7, 1, 0, 12, 12, 3, 32),  # ResNet stem at ngf 32: output channels zero-padded to 64 in the forward pass
    (7, 1, 0, 12, 13, 16, 3),  # ResNet head at ngf 16: input channels zero-padded to 20 in the forward pass
    (4, 1, 1, 9, 9, 32, 128),  # a kernel larger than dy: the matmul input gradient
    (4, 2, 1, 4, 5, 16, 128),  # U-Net inner down-sampling: the same, strided
    (3, 2, 1, 16, 16, 4, 8),  # ResNet down-sampling
    (3, 2, 1, 15, 13, 4, 8),  # odd sizes: the input gradient needs output_padding
    (4, 2, 1, 16, 12, 6, 8),  # PatchGAN / U-Net down-sampling
    (4, 1, 1, 5, 5, 8, 1),  # PatchGAN's last conv: 1 output channel
    (4, 1, 1, 6, 7, 8, 16),  # PatchGAN's stride-1 conv
    (5, 3, 2, 11, 10, 3, 4),  # stride 3
    (1, 1, 0, 4, 4, 3, 5),  # 1x1
    (4, 2, 1, 2, 2, 4, 4),  # U-Net innermost level: 2x2 -> 1x1
]


@pytest.mark.parametrize("k,s,p,h,w,c_in,c_out", CONV_CASES)
def test_conv2d_fast_matches_xla(k, s, p, h, w, c_in, c_out):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, h, w, c_in)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, c_in, c_out)) * 0.1, jnp.float32)

    def reference(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, (s, s), ((p, p), (p, p)), dimension_numbers=NHWC)

    _compare(lambda x, kernel: layers.conv2d_fast(x, kernel, s, p, True), reference, x, kernel)


def test_matmul_transpose_rule():
    """Large kernels over small inputs take the matmul transposed conv / input gradient: the U-Net's inner
    up-sampling and the PatchGAN's 256 -> 512 conv's input gradient; not the ResNet's 64 x 64 block convs,
    the U-Net's outer levels or the PatchGAN's 1-channel last conv."""
    assert layers._matmul_transpose_wins((1, 8, 8, 1024), (4, 4, 512, 1024))
    assert layers._matmul_transpose_wins((1, 31, 31, 512), (4, 4, 256, 512))
    assert not layers._matmul_transpose_wins((1, 64, 64, 256), (3, 3, 256, 256))
    assert not layers._matmul_transpose_wins((1, 64, 64, 256), (4, 4, 64, 256))
    assert not layers._matmul_transpose_wins((1, 30, 30, 1), (4, 4, 512, 1))
    assert layers._matmul_transpose_wins((2, 8, 8, 128), (4, 4, 32, 128))


@pytest.mark.parametrize("k,s,p,h,w,c_in,c_out", CONV_CASES)
def test_matmul_kernel_grad_matches_xla(k, s, p, h, w, c_in, c_out):
    """The per-kernel-row matmul kernel gradient (used for wide convs) at every conv shape above."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, h, w, c_in)), jnp.float32)
    kernel_shape = (k, k, c_in, c_out)

    def conv(kernel):
        return jax.lax.conv_general_dilated(x, kernel, (s, s), ((p, p), (p, p)), dimension_numbers=NHWC)

    y, vjp = jax.vjp(conv, jnp.zeros(kernel_shape, jnp.float32))
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    got = jax.jit(lambda x, dy: layers._conv_kernel_grad_matmul(x, dy, kernel_shape, s, p))(x, dy)
    assert got.shape == kernel_shape
    assert _rel(got, vjp(dy)[0]) < 1e-5


@pytest.mark.parametrize(
    "k,s,p,h,c_in,c_out",
    [
        (4, 2, 1, 128, 64, 128),  # the PatchGAN's 64 -> 128 conv
        (3, 2, 1, 128, 64, 128),  # a wide down-sampling conv
    ],
)
def test_conv2d_fast_wide_layers_match_xla(k, s, p, h, c_in, c_out):
    """Shapes on which conv2d_fast takes the matmul kernel gradient (`_matmul_kernel_grad_wins`)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, h, h, c_in)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, c_in, c_out)) * 0.05, jnp.float32)
    out = (h + 2 * p - k) // s + 1
    assert layers._matmul_kernel_grad_wins((1, out, out, c_out), kernel.shape)
    assert not layers._winograd_wins(kernel.shape, s, p, x.dtype)

    def reference(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, (s, s), ((p, p), (p, p)), dimension_numbers=NHWC)

    _compare(lambda x, kernel: layers.conv2d_fast(x, kernel, s, p, True), reference, x, kernel)


@pytest.mark.parametrize("m,r", [(4, 3), (3, 4)])
def test_winograd_transforms_compute_a_correlation(m, r):
    """In float64 the F(m x m, r x r) transforms are exact: (A^T x A^T)[(G x G) g * (B^T x B^T) d] is the
    m x m VALID correlation of an n x n tile d with an r x r kernel g (forward and input gradient use
    F(4, 3) / F(3, 4), the kernel gradient the same pair with the roles swapped)."""
    n = m + r - 1
    rng = np.random.default_rng(0)
    d, g = rng.standard_normal((n, n)), rng.standard_normal((r, r))
    bt, gg, at = layers._winograd_transforms(m, r)
    got = (at @ ((gg @ g.ravel()) * (bt @ d.ravel()))).reshape(m, m)
    want = np.array([[np.sum(d[i : i + r, j : j + r] * g) for j in range(m)] for i in range(m)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_winograd_rule():
    """Stride-1 3x3 and 4x4 float32 convs with >= 64 input and output channels take the Winograd passes:
    the ResNets' residual blocks (ngf 16: 64 channels) and the PatchGAN's 256 -> 512 conv; not strided,
    thin, 7x7, 1x1 or bfloat16 convs, nor the PatchGAN's 1-channel last conv."""
    f32 = jnp.float32
    assert layers._winograd_wins((3, 3, 64, 64), 1, 0, f32)
    assert layers._winograd_wins((4, 4, 256, 512), 1, 1, f32)
    assert not layers._winograd_wins((4, 4, 512, 1), 1, 1, f32)
    assert not layers._winograd_wins((3, 3, 32, 64), 1, 0, f32)
    assert not layers._winograd_wins((3, 3, 64, 128), 2, 1, f32)
    assert not layers._winograd_wins((7, 7, 64, 64), 1, 0, f32)
    assert not layers._winograd_wins((1, 1, 64, 64), 1, 0, f32)
    assert not layers._winograd_wins((3, 3, 64, 64), 1, 0, jnp.bfloat16)
    assert not layers._winograd_wins((3, 3, 64, 64), 1, 3, f32)  # padding > k - 1: no input gradient form


@pytest.mark.parametrize(
    "k,p,h,w,c_in,c_out",
    [
        (3, 0, 18, 18, 64, 64),  # ResNet block conv after a reflection pad: 16 x 16 outputs, 4 x 4 tiles
        (3, 1, 9, 14, 64, 72),  # zero padding; sizes that are not a multiple of the tile
        (4, 1, 10, 10, 64, 96),  # the PatchGAN's stride-1 conv: 9 x 9 outputs, 3 x 3 tiles
        (4, 2, 7, 5, 80, 64),  # padding = k - 2, narrow image (fewer rows than one tile + kernel)
    ],
)
def test_winograd_convs_match_xla(k, p, h, w, c_in, c_out):
    """conv2d_fast's Winograd forward, input gradient and kernel gradient against XLA's conv: within 5e-5
    of the largest value (float32; F(4x4, 3x3) rounds ~10x more than a direct conv)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, h, w, c_in)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, c_in, c_out)) / np.sqrt(k * k * c_in), jnp.float32)
    assert layers._winograd_wins(kernel.shape, 1, p, x.dtype)

    def reference(x, kernel):
        return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((p, p), (p, p)), dimension_numbers=NHWC)

    _compare(lambda x, kernel: layers.conv2d_fast(x, kernel, 1, p, True), reference, x, kernel, tol=5e-5)
    # without Winograd, the direct passes: XLA's rounding
    _compare(lambda x, kernel: layers.conv2d_fast(x, kernel, 1, p, False), reference, x, kernel)


def test_conv_transpose_fast_wide_layer_matches_xla():
    """A wide transposed conv (ResNet up-sampling 128 -> 64 channels at 64 -> 128 px): its kernel gradient
    is the matmul one."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 64, 64, 128)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 64, 128)) * 0.05, jnp.float32)  # (k, k, C_out, C_in)
    assert layers._matmul_kernel_grad_wins((1, 64, 64, 128), kernel.shape)

    def reference(x, kernel):
        return jax.lax.conv_transpose(
            x, kernel, (2, 2), ((1, 2), (1, 2)), dimension_numbers=NHWC, transpose_kernel=True
        )

    _compare(lambda x, kernel: layers.conv_transpose_fast(x, kernel, 2, 1, 1), reference, x, kernel)


@pytest.mark.parametrize(
    "k,s,p,op,h,w",
    [
        (3, 2, 1, 1, 8, 8),  # ResNet up-sampling
        (4, 2, 1, 0, 8, 6),  # U-Net up-sampling
        (4, 2, 1, 0, 1, 1),  # U-Net innermost level
        (5, 2, 2, 1, 7, 5),
        (3, 3, 1, 2, 4, 5),
        (6, 3, 1, 1, 3, 4),  # output size not a multiple of the stride
    ],
)
def test_conv_transpose_fast_matches_xla(k, s, p, op, h, w):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, h, w, 5)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, 7, 5)) * 0.1, jnp.float32)  # (k, k, C_out, C_in)

    def reference(x, kernel):
        pad = (k - 1 - p, k - 1 - p + op)
        return jax.lax.conv_transpose(
            x, kernel, (s, s), (pad, pad), dimension_numbers=NHWC, transpose_kernel=True
        )

    _compare(lambda x, kernel: layers.conv_transpose_fast(x, kernel, s, p, op), reference, x, kernel)


@pytest.mark.parametrize(
    "k,s,p,op,h,w",
    [
        (4, 2, 1, 0, 2, 2),  # U-Net inner up-sampling
        (4, 2, 1, 0, 1, 1),  # U-Net innermost level
        (3, 2, 1, 1, 3, 4),  # output_padding
        (3, 2, 0, 1, 2, 3),  # output_padding > padding: the output reaches past the last tap
        (5, 3, 2, 1, 2, 3),  # stride 3
    ],
)
def test_conv_transpose_matmul_matches_xla(k, s, p, op, h, w):
    """Kernels larger than the input (`_matmul_transpose_wins`): one matmul into all taps, then by phase."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, h, w, 128)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, 6, 128)) * 0.05, jnp.float32)  # (k, k, C_out, C_in)
    assert layers._matmul_transpose_wins(x.shape, kernel.shape)

    def reference(x, kernel):
        pad = (k - 1 - p, k - 1 - p + op)
        return jax.lax.conv_transpose(
            x, kernel, (s, s), (pad, pad), dimension_numbers=NHWC, transpose_kernel=True
        )

    _compare(lambda x, kernel: layers.conv_transpose_fast(x, kernel, s, p, op), reference, x, kernel)


def test_instance_norm_vjp_matches_autodiff():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, 5, 4)) * 3 + 1, jnp.float32)
    x = x.at[1, :, :, 2].set(0.5)  # a constant channel: zero variance
    g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def plain(x):
        mean = jnp.mean(x, axis=(1, 2), keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-5)

    y, vjp = jax.vjp(layers.instance_norm, x)
    y0, vjp0 = jax.vjp(plain, x)
    assert _rel(y, y0) < 1e-6
    assert _rel(vjp(g)[0], vjp0(g)[0]) < 1e-5
    # second order (the aging trainer's R1 penalty differentiates a gradient through D's norms)
    h = jax.grad(lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(jnp.sin(layers.instance_norm(x))))(x) ** 2))(x)
    h0 = jax.grad(lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(jnp.sin(plain(x))))(x) ** 2))(x)
    assert _rel(h, h0) < 1e-4


@pytest.mark.parametrize(
    "s,c_in,c_out",
    [
        (2, 3, 4),  # per-phase input gradient
        (1, 16, 128),  # kernel larger than dy: the matmul input gradient (the aging D's 4th conv)
        (2, 16, 128),
        (1, 64, 64),  # Winograd input and kernel gradients
    ],
)
def test_fast_convs_are_differentiable_twice(s, c_in, c_out):
    """Reverse over reverse through conv2d_fast (R1 penalties: the gradient of an input gradient)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1, 8, 8, c_in)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((4, 4, c_in, c_out)) * 0.1, jnp.float32)
    out = (8 + 2 - 4) // s + 1
    assert layers._matmul_transpose_wins((1, out, out, c_out), kernel.shape) == (c_out >= 128)

    def penalty(conv, kernel):
        grad_x = jax.grad(lambda x: jnp.sum(jnp.tanh(conv(x, kernel))))(x)
        return jnp.sum(grad_x**2)

    fast = jax.grad(penalty, argnums=1)(lambda x, k: layers.conv2d_fast(x, k, s, 1, True), kernel)
    ref = jax.grad(penalty, argnums=1)(
        lambda x, k: jax.lax.conv_general_dilated(x, k, (s, s), ((1, 1), (1, 1)), dimension_numbers=NHWC),
        kernel,
    )
    assert _rel(fast, ref) < (5e-5 if layers._winograd_wins(kernel.shape, s, 1, x.dtype) else 1e-5)
