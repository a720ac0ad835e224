"""Small layers shared by the generators and discriminators.

All tensors are NHWC float arrays.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _instance_norm_forward(x, epsilon):
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (x - mean) * rstd
    return y, (y, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def instance_norm(x, epsilon: float = 1e-5):
    """(x - mean) / sqrt(var + epsilon) over the spatial axes of NHWC x (biased variance, as PyTorch).

    Its VJP is the closed form dx = rstd * (g - mean(g) - y * mean(g * y)): two reductions and one
    elementwise pass, 1.6-1.8x faster on XLA:CPU than differentiating the three steps above (and a
    function of y, so the input need not be kept).
    """
    return _instance_norm_forward(x, epsilon)[0]


def _instance_norm_bwd(epsilon, residuals, g):
    y, rstd = residuals
    g_mean = jnp.mean(g, axis=(1, 2), keepdims=True)
    gy_mean = jnp.mean(g * y, axis=(1, 2), keepdims=True)
    return (rstd * (g - g_mean - y * gy_mean),)


instance_norm.defvjp(lambda x, epsilon: _instance_norm_forward(x, epsilon), _instance_norm_bwd)


class InstanceNorm(nn.Module):
    """InstanceNorm as in PyTorch's `nn.InstanceNorm2d` default: no affine, no running stats.

    eps is 1e-5 (PyTorch's), not Flax's 1e-6, so that ported weights give the same outputs.
    (B, H, W, C) -> (B, H, W, C); see `instance_norm`.
    """

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        return instance_norm(x, self.epsilon)


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
# Each conv layer has three implementations with the same parameters and the same outputs:
#   "reference": the literal layer (reflection pad + VALID conv, `lax.conv_transpose`) and XLA's autodiff;
#   "fast":      `conv2d_fast` / `conv_transpose_fast`: the same function with a custom VJP, each of the
#                forward pass, the input gradient and the kernel gradient written as the XLA:CPU
#                convolution that runs fastest for it (see `conv2d_fast`, docs/performance.md);
#   "winograd":  "fast" with Winograd passes for the wide stride-1 3x3 / 4x4 convs (more rounding).
# "auto" picks "winograd" on CPU and "reference" on accelerators.
# ---------------------------------------------------------------------------------------------

CONV_IMPLS = ("auto", "reference", "fast", "winograd")

# Weight init of the reference code (`init_weights(init_type="normal", gain=0.02)`).
conv_init = nn.initializers.normal(stddev=0.02)


def bn_scale_init(key, shape, dtype=jnp.float32):
    """BatchNorm weight ~ N(1, 0.02), as in the reference `init_weights`."""
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def resolve_conv_impl(impl: str) -> str:
    """Maps "auto" to "winograd" on the CPU backend and to "reference" elsewhere.

    "reference": XLA's convolutions as written. "fast": `conv2d_fast` / `conv_transpose_fast`, direct
    convolutions in the formulations XLA:CPU runs fastest (rounding as XLA's own). "winograd": "fast" plus
    Winograd passes for wide stride-1 3x3 / 4x4 convs (`_winograd_wins`): 1.2-1.5x faster steps on CPU,
    rounding ~3x a direct conv's (docs/performance.md); cross-framework parity checks use "fast"."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "winograd" if jax.default_backend() == "cpu" else "reference"
    return impl


_NHWC = ("NHWC", "HWIO", "NHWC")
_VALID = ((0, 0), (0, 0))


def _conv(x, kernel, stride, padding):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=_NHWC)


def _zero_pad(x, p: int):
    return jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))) if p else x


# XLA:CPU runs a conv with 8-19 input and at most 4 output channels in Eigen, 3.6-4x slower than YNNPACK
# runs the same conv with its input channels zero-padded to this many (see `_conv_forward`).
_THIN_CONV_PADDED_C_IN = 20


def _conv_forward(x, kernel, stride: int, padding: int, winograd: bool):
    """conv2d(x, kernel, stride, zero padding) as XLA:CPU runs it fastest.

    A stride-1 conv without padding (after a reflection pad) is 3-30x slower as a VALID conv than with a
    one-pixel zero pad whose extra output ring is cropped (measured on the ResNet's 3x3 and 7x7 convs, which
    XLA gives to YNNPACK). Three exceptions, for the ResNet's 7x7 stem and head at small ngf (measured at
    256 px, ms on one core / two threads):
      <= 4 -> <= 16 channels   Eigen runs it either way, and VALID is faster (3 -> 16: 5.2 -> 4.6 /
                               3.4 -> 3.1)
      <= 4 -> 17-63 channels   zero output channels up to 64, cropped: YNNPACK runs 3 -> 32 3x slower than
                               3 -> 64 (16.9 -> 5.8 / 17.4 -> 5.7)
      8-19 -> <= 4 channels    zero input channels up to `_THIN_CONV_PADDED_C_IN` (16 -> 3: 14.6 -> 3.6 /
                               7.2 -> 2.0)
    """
    if winograd and _winograd_wins(kernel.shape, stride, padding, x.dtype):
        return _winograd_conv(_zero_pad(x, padding), kernel)
    if stride == 1 and padding == 0:
        c_in, c_out = kernel.shape[2], kernel.shape[3]
        if c_in <= 4 and c_out <= 16:
            return _conv(x, kernel, 1, _VALID)
        if c_in <= 4 and c_out < 64:
            kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, 0), (0, 64 - c_out)))
            return _conv(x, kernel, 1, ((1, 1), (1, 1)))[:, 1:-1, 1:-1, :c_out]
        if 8 <= c_in < _THIN_CONV_PADDED_C_IN and c_out <= 4:
            extra = ((0, 0),) * 3 + ((0, _THIN_CONV_PADDED_C_IN - c_in),)
            x, kernel = jnp.pad(x, extra), jnp.pad(kernel, extra[1:] + ((0, 0),))
        return _conv(x, kernel, 1, ((1, 1), (1, 1)))[:, 1:-1, 1:-1, :]
    return _conv(x, kernel, stride, ((padding, padding), (padding, padding)))


# ---- Winograd convolutions ----------------------------------------------------------------------------
#
# F(m x m, r x r) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", CVPR 2016) computes
# an m x m tile of a stride-1 r x r conv from an n x n input tile (n = m + r - 1) with n^2 multiplies per
# channel pair instead of m^2 r^2: the input tile and the kernel are transformed (B^T d B, G g G^T),
# multiplied elementwise - over channels, one matmul per transformed position - and transformed back
# (A^T . A).
# F(4x4, 3x3) does a 3x3 conv with 4x fewer multiplies, F(3x3, 4x4) a 4x4 conv with 4x fewer.

# Output tile m per kernel size (n = m + r - 1 = 6 for both).
_WINOGRAD_TILE = {3: 4, 4: 3}
# The Toom-Cook interpolation points of the 6-point transforms: 5 finite points, plus infinity. With 1/2
# and -2 in place of Lavin's 2 and -2 the float32 rounding error of F(4x4, 3x3) and F(3x3, 4x4) is a third
# lower (rms 1.3e-6 vs 1.9e-6 of the output scale over 64 channels; a direct conv: 0.4-0.6e-6), as
# Barabasz et al. ("Error analysis and improving the accuracy of Winograd convolution", 2020) found.
_WINOGRAD_POINTS = (0, 1, -1, 0.5, -2)
# Narrower convs stay direct: their transforms cost more than the multiplies they save.
_WINOGRAD_MIN_CHANNELS = 64


@functools.cache
def _winograd_transforms(m: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 2-D transforms of F(m x m, r x r), float64: (B^T x B^T (n^2, n^2), G x G (n^2, r^2),
    A^T x A^T (m^2, n^2)) (Kronecker products), so that for an n x n tile d and an r x r kernel g, both
    flattened row-major, (A^T x A^T) [(G x G) g * (B^T x B^T) d] is their m x m VALID correlation.

    1-D, from the Toom-Cook algorithm for the linear convolution s = g * h evaluated at the points p_j and
    infinity, transposed (a correlation is the transpose of a convolution): A^T[i, j] = p_j^i,
    G[j, k] = p_j^k / prod_{l != j}(p_j - p_l), row j of B^T the coefficients of prod_{l != j}(x - p_l), and
    for the point at infinity the last column of A^T, the last row of G (unit vectors) and the coefficients
    of prod_l (x - p_l)."""
    n = m + r - 1
    points = _WINOGRAD_POINTS[: n - 1]
    if len(points) != n - 1:
        raise ValueError(f"F({m}, {r}) needs {n - 1} interpolation points, {len(_WINOGRAD_POINTS)} defined")
    bt, g, at = np.zeros((n, n)), np.zeros((n, r)), np.zeros((m, n))
    for j, p in enumerate(points):
        others = [q for q in points if q != p]
        bt[j, : n - 1] = np.polynomial.polynomial.polyfromroots(others)
        g[j] = [p**k / np.prod([p - q for q in others]) for k in range(r)]
        at[:, j] = [p**i for i in range(m)]
    bt[n - 1] = np.polynomial.polynomial.polyfromroots(points)
    g[n - 1, r - 1] = at[m - 1, n - 1] = 1
    return np.kron(bt, bt), np.kron(g, g), np.kron(at, at)


def _winograd_wins(kernel_shape, stride: int, padding: int, dtype) -> bool:
    """Whether `_winograd_conv` / `_winograd_kernel_grad` compute this conv's passes on XLA:CPU: stride-1
    3x3 and 4x4 float32 convs with at least 64 input and output channels (the ResNets' residual blocks,
    the PatchGAN's 256 -> 512 conv). Measured in whole pix2pix steps on two threads (interleaved with PyTorch
    in one process): ResNet ngf 64 0.65x the time of the direct convs, ngf 16 0.82x (docs/performance.md).
    bfloat16 stays direct: its rounding would be amplified by the transforms."""
    k, _, c_in, c_out = kernel_shape
    return (
        stride == 1
        and k in _WINOGRAD_TILE
        and padding <= k - 1
        and min(c_in, c_out) >= _WINOGRAD_MIN_CHANNELS
        and dtype == jnp.float32
    )


def _winograd_tiles(x, m: int, n: int, rows: int, cols: int):
    """(B, H, W, C) -> (n*n, B*rows*cols, C): the n x n tiles at stride m (tile (t, u) starts at row m*t,
    column m*u), one strided slice per position in the tile; x has (rows - 1) * m + n rows and columns."""
    b, c = x.shape[0], x.shape[3]
    tiles = [
        jax.lax.slice(x, (0, i, j, 0), (b, i + m * (rows - 1) + 1, j + m * (cols - 1) + 1, c), (1, m, m, 1))
        for i in range(n)
        for j in range(n)
    ]
    return jnp.stack(tiles).reshape(n * n, b * rows * cols, c)


def _winograd_conv(x, kernel):
    """VALID stride-1 conv of x (B, H, W, C_in) with kernel (r, r, C_in, C_out), r in `_WINOGRAD_TILE`, by
    F(m x m, r x r): -> (B, H - r + 1, W - r + 1, C_out). Per transformed position one (tiles, C_in) @
    (C_in, C_out) matmul; the transforms are matmuls with the Kronecker-squared 1-D transforms. Rounding:
    rms about 3x a direct conv's, up to ~1e-5 of the largest output (the transforms scale products by up
    to 8 before sums that cancel), the accuracy class of cuDNN's and oneDNN's Winograd."""
    r = kernel.shape[0]
    m = _WINOGRAD_TILE[r]
    n = m + r - 1
    b, h, w, c_in = x.shape
    c_out = kernel.shape[3]
    out_h, out_w = h - r + 1, w - r + 1
    rows, cols = -(-out_h // m), -(-out_w // m)
    bt, g, at = (jnp.asarray(a, x.dtype) for a in _winograd_transforms(m, r))
    x = jnp.pad(x, ((0, 0), (0, rows * m + r - 1 - h), (0, cols * m + r - 1 - w), (0, 0)))
    v = (bt @ _winograd_tiles(x, m, n, rows, cols).reshape(n * n, -1)).reshape(n * n, -1, c_in)
    u = (g @ kernel.reshape(r * r, -1)).reshape(n * n, c_in, c_out)
    products = jax.lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))))  # (n*n, tiles, C_out)
    y = (at @ products.reshape(n * n, -1)).reshape(m, m, b, rows, cols, c_out)
    y = y.transpose(2, 3, 0, 4, 1, 5).reshape(b, rows * m, cols * m, c_out)
    return y[:, :out_h, :out_w]


def _winograd_kernel_grad(x, dy, kernel_size: int):
    """d/dkernel of <VALID stride-1 conv(x, kernel), dy> for x (B, H, W, C_in), dy (B, H', W', C_out):
    (r, r, C_in, C_out), r = kernel_size. dkernel[a, b] = sum_{y, z} x[y + a, z + b] dy[y, z] is, per
    m x m block of dy, an r x r VALID correlation of an n x n block of x with that dy block, computed by
    F(r x r, m x m) (the roles of output and kernel swapped); the sum over blocks is one
    (C_in, tiles) @ (tiles, C_out) matmul per transformed position."""
    r = kernel_size
    m = _WINOGRAD_TILE[r]
    n = r + m - 1
    # x + 0 * dy[0, 0, 0, 0] (x itself for a finite dy) makes the tiles depend on dy: otherwise XLA shares
    # them with the forward pass's (the same n x n tiles and transform) and holds every layer's until the
    # backward pass (ResNet ngf 64 step: +12% temp memory, and no faster).
    x = x + 0 * dy[0, 0, 0, 0]
    b, out_h, out_w, c_out = dy.shape
    h, w, c_in = x.shape[1:]
    rows, cols = -(-out_h // m), -(-out_w // m)
    bt, g, at = (jnp.asarray(a, x.dtype) for a in _winograd_transforms(r, m))
    x = jnp.pad(x, ((0, 0), (0, rows * m + r - 1 - h), (0, cols * m + r - 1 - w), (0, 0)))
    dy = jnp.pad(dy, ((0, 0), (0, rows * m - out_h), (0, cols * m - out_w), (0, 0)))
    v = (bt @ _winograd_tiles(x, m, n, rows, cols).reshape(n * n, -1)).reshape(n * n, -1, c_in)
    blocks = dy.reshape(b, rows, m, cols, m, c_out).transpose(2, 4, 0, 1, 3, 5).reshape(m * m, -1)
    u = (g @ blocks).reshape(n * n, -1, c_out)
    products = jax.lax.dot_general(v, u, (((1,), (1,)), ((0,), (0,))))  # (n*n, C_in, C_out)
    return (at @ products.reshape(n * n, -1)).reshape(r, r, c_in, c_out)


def _phase_taps(phase: int, kernel_size: int, stride: int, padding: int) -> dict[int, int]:
    """{d: t}: output phase `phase` of a transposed conv reads input row m + d with kernel tap t."""
    k, s, p = kernel_size, stride, padding
    return {(phase + p - t) // s: t for t in range(k) if (phase + p - t) % s == 0}


def _conv_transpose_forward(x, kernel, stride: int, padding: int, output_padding: tuple[int, int]):
    """`torch.nn.functional.conv_transpose2d` (kernel (k, k, C_out, C_in)) as stride x stride ordinary
    convs, one per output phase (a, b) with only the taps that phase uses, interleaved (depth-to-space).

    Output row s*m + a of a transposed conv is sum_t x[m + d] w[t] over the taps t = a + p - s*d, so
    phase a is a stride-1 conv over x with those taps. No multiplication by zero is done (a single conv
    over all phases would pad every phase to the largest tap count: 16 instead of 9 taps for k3 s2), and
    XLA:CPU's `conv_transpose` is avoided (its kernel gradient is 20-60x slower than a conv's). Kernels
    larger than x take `_conv_transpose_matmul` instead (`_matmul_transpose_wins`).
    """
    if _matmul_transpose_wins(x.shape, kernel.shape):
        return _conv_transpose_matmul(x, kernel, stride, padding, output_padding)
    k, s = kernel.shape[0], stride
    b, h, w, _ = x.shape
    c_out = kernel.shape[2]
    out_h = (h - 1) * s - 2 * padding + k + output_padding[0]
    out_w = (w - 1) * s - 2 * padding + k + output_padding[1]
    rows_h, rows_w = -(-out_h // s), -(-out_w // s)  # per-phase rows, cropped to out_h / out_w below
    phases = []
    for a in range(s):
        taps_a = _phase_taps(a, k, s, padding)
        for b_ in range(s):
            taps_b = _phase_taps(b_, k, s, padding)
            if not taps_a or not taps_b:
                raise ValueError("a phase without taps: kernel_size < stride is not supported")
            da, db = sorted(taps_a), sorted(taps_b)
            idx_a = np.asarray([taps_a[d] for d in da])[:, None]
            idx_b = np.asarray([taps_b[d] for d in db])[None, :]
            sub = jnp.swapaxes(kernel[idx_a, idx_b], 2, 3)  # (len_a, len_b, C_in, C_out), HWIO
            pad = ((-da[0], rows_h + da[-1] - h), (-db[0], rows_w + db[-1] - w))
            phases.append(_conv(x, sub, 1, pad))
    z = jnp.stack(phases, axis=3).reshape(b, rows_h, rows_w, s, s, c_out)
    z = z.transpose(0, 1, 3, 2, 4, 5).reshape(b, rows_h * s, rows_w * s, c_out)
    return z[:, :out_h, :out_w, :]


def _matmul_transpose_wins(x_shape, kernel_shape) -> bool:
    """Whether `_conv_transpose_matmul` is the faster transposed conv (or input gradient of a conv, the same
    operation) on XLA:CPU: kernels with at least as many elements as x and at least 128 input channels.
    Per-phase convs (and XLA's own stride-1 input gradient) first slice and transpose the kernel, which
    costs more than the convs when the kernel is larger than x: the U-Net's inner levels, whose kernels
    reach 4 x 4 x 512 x 1024, and the PatchGAN's 256 -> 512 conv. Measured, ms on two threads / one core:
    U-Net ngf 64 up-sampling 1024 -> 512 at 2 x 2 16.1 -> 5.7 / 25.3 -> 5.8, at 8 x 8 19.7 -> 7.2 /
    33.0 -> 10.8, 1024 -> 256 at 16 x 16 13.8 -> 7.2 / 21.2 -> 12.8, 512 -> 512 at 1 x 1 6.6 -> 0.8; input
    gradient of the PatchGAN's 256 -> 512 k4 conv at 31 x 31 outputs 12.5 -> 9.6 / 20.5 -> 17.4. At 64 x 64
    (U-Net 256 -> 64, ResNet 256 -> 256 k3: kernels smaller than x) the convs stay faster."""
    return kernel_shape[3] >= 128 and np.prod(kernel_shape) >= np.prod(x_shape)


def _conv_transpose_matmul(x, kernel, stride: int, padding: int, output_padding: tuple[int, int]):
    """`_conv_transpose_forward` as one matmul of x into all k*k taps, (B*H*W, C_in) @ (k*k*C_out, C_in)^T,
    then per output phase (a, b) the sum of the tap planes that feed it, each shifted to its rows (tap t
    sends input row m to output row s*m + t - p: phase (t - p) mod s, row (t - p) // s + m of that phase),
    and the phases interleaved (depth-to-space), as in the per-phase convs."""
    b, h, w, c_in = x.shape
    k, s, c_out = kernel.shape[0], stride, kernel.shape[2]
    taps = jax.lax.dot_general(
        x.reshape(b * h * w, c_in), kernel.reshape(k * k * c_out, c_in), (((1,), (1,)), ((), ()))
    ).reshape(b, h, w, k, k, c_out)
    out_h = (h - 1) * s - 2 * padding + k + output_padding[0]
    out_w = (w - 1) * s - 2 * padding + k + output_padding[1]
    rows, cols = -(-out_h // s), -(-out_w // s)  # per-phase rows, cropped to out_h / out_w below
    zero = jnp.zeros((), x.dtype)
    phases = []
    for a in range(s):
        for b_ in range(s):
            planes = []
            for i in range(k):
                for j in range(k):
                    if (i - padding) % s != a or (j - padding) % s != b_:
                        continue
                    di, dj = (i - padding) // s, (j - padding) // s
                    pads = ((0, 0, 0), (di, rows - h - di, 0), (dj, cols - w - dj, 0), (0, 0, 0))
                    planes.append(jax.lax.pad(taps[:, :, :, i, j], zero, pads))  # negative pads crop
            phases.append(sum(planes) if planes else jnp.zeros((b, rows, cols, c_out), x.dtype))
    z = jnp.stack(phases, axis=3).reshape(b, rows, cols, s, s, c_out)
    z = z.transpose(0, 1, 3, 2, 4, 5).reshape(b, rows * s, cols * s, c_out)
    return z[:, :out_h, :out_w, :]


def _matmul_kernel_grad_wins(dy_shape, kernel_shape) -> bool:
    """Whether `_conv_kernel_grad_matmul` is the faster kernel gradient on XLA:CPU: wide convs over at least
    4096 output pixels. Measured on whole train steps (one core, interleaved): the ResNet ngf 64 pix2pix step
    took 0.84-0.86x the CPU time with it (its 256- and 128-channel convs, down-/up-sampling and the
    PatchGAN's 64 -> 128 conv qualify; the stride-1 ones have since moved to `_winograd_kernel_grad`);
    extending it to 16-/32-channel convs or the PatchGAN's 32 x 32 convs made the ngf 16 / ngf 64 steps
    slower. (Timed alone, outside a step, the two take about the same time.)"""
    b, oh, ow, c_out = dy_shape
    return kernel_shape[2] >= 64 and c_out >= 128 and b * oh * ow >= 4096


def _conv_kernel_grad_matmul(x, dy, kernel_shape, stride: int, padding: int):
    """d/dkernel of <conv2d(x, kernel, stride, zero padding), dy> as one matmul per kernel row i:
    dy (B*H'*W', C_out)^T @ patches_i (B*H'*W', k_w*C_in), patches_i the k_w (strided) shifts of row i of
    the padded input side by side. A row's patches are k_w/(stride^2) times the input, not k^2/(stride^2)
    (im2col of the whole kernel), and the matmuls run near XLA:CPU's matmul peak."""
    kh, kw, c_in, c_out = kernel_shape
    # x + 0 * dy[0, 0, 0, 0] (x itself for a finite dy) makes the patches depend on dy: otherwise XLA builds
    # every layer's patches as soon as the forward pass has made its input and holds them all until the
    # backward pass (2.2x the temp memory of a ResNet ngf 64 step; an optimization_barrier does not stop it).
    x = x + 0 * dy[0, 0, 0, 0]
    x = _zero_pad(x, padding)
    b, oh, ow, _ = dy.shape
    s = stride
    d = dy.reshape(b * oh * ow, c_out)
    rows = []
    for i in range(kh):
        end_h = i + s * (oh - 1) + 1
        taps = [
            jax.lax.slice(x, (0, i, j, 0), (b, end_h, j + s * (ow - 1) + 1, c_in), (1, s, s, 1))
            for j in range(kw)
        ]
        patches = jnp.stack(taps, axis=3).reshape(b * oh * ow, kw * c_in)
        rows.append(jax.lax.dot_general(d, patches, (((0,), (0,)), ((), ()))))  # (C_out, k_w*C_in)
    return jnp.stack(rows).reshape(kh, c_out, kw, c_in).transpose(0, 2, 3, 1)


def _conv_kernel_grad(x, dy, kernel_shape, stride: int, padding: int, winograd: bool):
    """d/dkernel of <conv2d(x, kernel, stride, zero padding), dy>: `_winograd_kernel_grad` or
    `_conv_kernel_grad_matmul` where they win (`_winograd_wins`, `_matmul_kernel_grad_wins`), else the
    gradient of a VALID conv of the explicitly padded input: XLA:CPU's kernel gradient of a padded conv is
    slower, up to 6x for the ResNet's 7x7 head (3 output channels) and 4x for the PatchGAN's last conv
    (1 channel)."""
    if winograd and _winograd_wins(kernel_shape, stride, padding, x.dtype):
        return _winograd_kernel_grad(_zero_pad(x, padding), dy, kernel_shape[0])
    if _matmul_kernel_grad_wins(dy.shape, kernel_shape):
        return _conv_kernel_grad_matmul(x, dy, kernel_shape, stride, padding)
    x = _zero_pad(x, padding)
    _, vjp = jax.vjp(lambda w: _conv(x, w, stride, _VALID), jnp.zeros(kernel_shape, x.dtype))
    return vjp(dy)[0]


def _transpose_output_padding(in_shape, out_shape, kernel_size: int, stride: int, padding: int):
    """The output_padding of the transposed conv that maps a conv's output shape back to `in_shape`."""
    return tuple(
        n - ((m - 1) * stride - 2 * padding + kernel_size)
        for n, m in zip(in_shape[1:3], out_shape[1:3], strict=True)
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d_fast(x, kernel, stride: int, padding: int, winograd: bool):
    """`lax.conv_general_dilated(x, kernel, (stride, stride), ((padding, padding),) * 2)` (NHWC, HWIO) with
    a custom VJP, for XLA:CPU. The values are those of the plain conv; each pass is the fastest
    XLA:CPU formulation measured (docs/performance.md), all exact up to float32 rounding:

      all three passes with `winograd`, stride-1 3x3 / 4x4 float32 convs with >= 64 channels in
                       and out (`_winograd_wins`): Winograd F(4x4, 3x3) / F(3x3, 4x4) (`_winograd_conv`,
                       `_winograd_kernel_grad`; rounding rms ~3x a direct conv's, up to ~1e-5 of the
                       largest value)
      forward          the conv itself (stride 1, no padding: see `_conv_forward`)
      input gradient   the transposed conv of dy (`_conv_transpose_forward`: per-phase ordinary convs, or
                       for kernels larger than dy one matmul into all taps), not XLA's conv with lhs
                       dilation; stride 1 with a kernel smaller than dy: XLA's own
      kernel gradient  wide convs: one matmul per kernel row (`_conv_kernel_grad_matmul`); others: that
                       of a VALID conv of the zero-padded input (`_conv_kernel_grad`)
    """
    return _conv_forward(x, kernel, stride, padding, winograd)


def _conv2d_fast_fwd(x, kernel, stride, padding, winograd):
    return _conv_forward(x, kernel, stride, padding, winograd), (x, kernel)


def _conv2d_fast_bwd(stride, padding, winograd, residuals, dy):
    x, kernel = residuals
    k = kernel.shape[0]
    if winograd and _winograd_wins(kernel.shape, stride, padding, dy.dtype):
        # the full correlation of dy with the kernel flipped and its channels swapped
        dx = _winograd_conv(_zero_pad(dy, k - 1 - padding), jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
    elif stride == 1 and not _matmul_transpose_wins(dy.shape, kernel.shape):
        pads = ((padding, padding), (padding, padding))
        dx = jax.vjp(lambda x: _conv(x, kernel, 1, pads), x)[1](dy)[0]
    else:
        # The adjoint of a conv is the transposed conv with the same kernel array (its (k, k, C_out, C_in)
        # layout read with C_out = this conv's C_in).
        op = _transpose_output_padding(x.shape, dy.shape, kernel.shape[0], stride, padding)
        dx = _conv_transpose_forward(dy, kernel, stride, padding, op)
    return dx, _conv_kernel_grad(x, dy, kernel.shape, stride, padding, winograd)


conv2d_fast.defvjp(_conv2d_fast_fwd, _conv2d_fast_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_transpose_fast(x, kernel, stride: int, padding: int, output_padding: int):
    """`torch.nn.functional.conv_transpose2d(x, w, stride, padding, output_padding)` for NHWC x and the
    kernel layout (k, k, C_out, C_in), with a custom VJP for XLA:CPU: forward `_conv_transpose_forward`;
    a transposed conv is the adjoint of conv2d(., kernel, stride, padding), so its input gradient is that
    conv of dy and its kernel gradient that conv's kernel gradient with input dy and cotangent x."""
    return _conv_transpose_forward(x, kernel, stride, padding, (output_padding, output_padding))


def _conv_transpose_fast_fwd(x, kernel, stride, padding, output_padding):
    return conv_transpose_fast(x, kernel, stride, padding, output_padding), (x, kernel)


def _conv_transpose_fast_bwd(stride, padding, output_padding, residuals, dy):
    x, kernel = residuals
    dx = _conv_forward(dy, kernel, stride, padding, winograd=False)
    return dx, _conv_kernel_grad(dy, x, kernel.shape, stride, padding, winograd=False)


conv_transpose_fast.defvjp(_conv_transpose_fast_fwd, _conv_transpose_fast_bwd)


class Conv2d(nn.Module):
    """`torch.nn.Conv2d` with square kernels, optionally preceded by `ReflectionPad2d(padding)`.

    padding_mode "zeros": Conv2d(k, stride, padding). padding_mode "reflect": ReflectionPad2d(padding)
    followed by Conv2d(k, stride, padding=0), the pattern of the ResNet generator.
    dilation d > 1 is `Conv2d(..., dilation=d)` (the DRN segmenter's dilated convs); `conv2d_fast` has no
    dilation, so such convs always run the "reference" formulation (the same values).
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
    dilation: int = 1

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

        if self.dilation != 1:
            d = self.dilation
            y = jax.lax.conv_general_dilated(
                x, kernel, (self.stride,) * 2, ((p, p), (p, p)), rhs_dilation=(d, d), dimension_numbers=_NHWC
            )
        elif resolve_conv_impl(self.impl) in ("fast", "winograd"):
            y = conv2d_fast(x, kernel, self.stride, p, resolve_conv_impl(self.impl) == "winograd")
        else:
            y = _conv(x, kernel, self.stride, ((p, p), (p, p)))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class ConvTranspose2d(nn.Module):
    """`torch.nn.ConvTranspose2d(C_in, features, k, stride, padding, output_padding)`.

    (B, H, W, C_in) -> (B, (H-1)*stride - 2*padding + k + output_padding, ..., features) in `dtype`.
    "reference" is `nn.ConvTranspose(padding=(k-1-p, k-1-p+op), transpose_kernel=True)`'s arithmetic;
    "fast" is `conv_transpose_fast`. Both use the same kernel (k, k, features, C_in).
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
        if resolve_conv_impl(self.impl) in ("fast", "winograd"):  # no stride-1 transposed convs to speed up
            y = conv_transpose_fast(x, kernel, self.stride, p, op)
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
