"""Semantic relation preserving distillation loss (SRPKD, ECCV 2020; PAPERS.md section B).

Shapes and dtypes at the module boundary
-----------------------------------------
* ``features``: ``(B, H, W, C)`` (NHWC, as Flax convolutions produce), any float dtype. ``N = H * W`` and
  ``Q = features.reshape(B, N, C)``; row ``q_i`` is the feature vector at spatial position ``i``.
* Everything is computed in ``promote_types(dtype, float32)``: float32 for bf16/f16/f32 inputs, float64 for
  float64 inputs (with x64 enabled). The loss is returned in that dtype; gradients come back in the input
  dtype.
* Teacher and student may have different channel counts ``C_T != C_S``; ``B``, ``H`` and ``W`` must agree.

Definition
----------
``A = Q Q^T`` (``N x N``). ``normalize="row"`` L2-normalises each row of ``A``; ``normalize="cosine"``
L2-normalises each row of ``Q`` instead and uses ``A`` as is. Normalisation follows
``torch.nn.functional.normalize``: ``x / max(||x||, eps)`` (so an all-zero row stays zero, and the norm gets
no gradient below ``eps``). The loss is ``mean_b (1/N^2) ||A~_T - A~_S||_F^2``.

The fused method (never forms an ``N x N`` matrix, nor any ``N x D`` one)
------------------------------------------------------------------------
Stack ``P = [Q_T, Q_S]`` (``N x D``, ``D = C_T + C_S``) and take a QR factorisation ``P = F R`` (``F`` with
orthonormal columns, ``R`` upper triangular, ``D x D``); split ``R = [R_T, R_S]`` so that ``Q_T = F R_T`` and
``Q_S = F R_S``. Row ``i`` of ``A_T`` is ``(F u_i)^T`` with ``u_i = R_T q_Ti``, so (``R^T R = P^T P``)
``||A_T[i, :]|| = ||u_i||`` and, with ``v_i = R_S q_Si``,

    ||A~_T[i] - A~_S[i]||^2 = || u_i / max(||u_i||, eps) - v_i / max(||v_i||, eps) ||^2 .

This is the paper's "exactness note" quantity (expanding the square gives ``||A~_T[i]||^2 + ||A~_S[i]||^2
- 2 q_Ti^T K q_Si / (n_Ti n_Si)``, ``K = Q_T^T Q_S``), but the two normalised rows are subtracted *before*
squaring, in the ``D``-dimensional frame of ``F``. The expanded Gram form is a difference of O(1) terms and
loses float32 precision once the student matches the teacher well (exactly when the loss is small); the
rotated form keeps dense-like accuracy. Only ``R^T R = P^T P`` is used, so ``F`` is never formed.

Row chunks (``chunk_size`` rows, default ``DEFAULT_CHUNK_SIZE``): ``R`` comes from a TSQR,
``R <- qr([R; P_k]).R`` over chunks ``P_k`` (``2 * chunk_size`` rows each: the QR step keeps fewer chunk-sized
temporaries live than the other passes). The loss is a second pass over chunks summing ``||u~_i - v~_i||^2``.
When ``N`` is not a multiple of the chunk, the last chunk is shifted back to end at row ``N`` and its rows
that an earlier chunk covered are masked out of every sum (zero rows change neither ``R`` nor the loss);
the inputs are never padded or copied. ``R`` is zero below row ``min(N, D)`` and ``R_T`` below row ``C_T``.
Cost: ``O(N D^2)`` time; ``O(chunk * D + D^2)`` temporary memory, independent of ``N``.

Gradient: a custom VJP whose residuals are the inputs and ``R`` (the QR is never differentiated: its
derivative is singular for rank-deficient ``P``, i.e. dead channels or ``D > N``). With ``G_T = dL/dA_T``,
``dL/dQ_T = (G_T + G_T^T) Q_T``. Row ``i`` of ``G_T`` is ``(F y_i)^T`` with ``y_i = k s_i (w_i - c_i u~_i)``,
where ``u~_i = s_i u_i``, ``s_i = 1 / max(||u_i||, eps)``, ``w_i = u~_i - v~_i`` (the rotated row
difference), ``c_i = u~_i . w_i`` (0 where the norm is clamped) and ``k = 2 g / (B N^2)``. Hence
``G_T Q_T = Y R_T``, row-local. For the other term note ``y_i = R z_i`` with the explicit
``z_Ti = [a_i q_Ti; b_i q_Si]``, ``a_i = k s_i^2 (1 - c_i)``, ``b_i = -k s_i t_i`` (``t_i``, ``d_i`` are the
student's ``s_i``, ``c_i``), so ``G_T[i, j] = p_j . z_Ti`` and ``G_T^T Q_T = P (Z_T^T Q_T)``: no ``F`` and no
inverse of ``R``. The student is the same with ``-w_i``: ``z_Si = [b_i q_Ti; e_i q_Si]``,
``e_i = k t_i^2 (1 + d_i)``, ``d_i = v~_i . w_i``. So a first pass over chunks writes ``Y R`` and
accumulates the ``D x D`` matrix ``M = [[Q_T^T a Q_T, Q_T^T b Q_S], [Q_S^T b Q_T, Q_S^T e Q_S]]`` (diagonal
weights), and a second pass adds ``P_k M``. For "cosine" (``s = t = 1``, ``c = d = 0``, rows of ``Q``
normalised per chunk) the second pass also applies the normalisation's backward. Only the differentiated
side's buffers and blocks of ``M`` are computed (``symbolic_zeros``), e.g. the student's alone when the
teacher is frozen.

Accuracy and cost (benchmarks/relation_loss.py: float32, B = 1, C_T = 256, C_S = 64, gradient w.r.t. the
student, 2 CPU cores shared with other jobs, ``OPENBLAS_NUM_THREADS=1``, chunk 256):

    N        fused time / temp      dense time / temp      dense / fused: time, temp, peak
    1024     0.012 s / 2.2 MiB      0.014 s / 12 MiB       1.1x,   5.7x,  3.7x
    4096     0.049 s / 2.2 MiB      0.53 s  / 192 MiB      11x,    87x,   24x
    16384    0.25 s  / 2.2 MiB      11.9 s  / 3.0 GiB      48x,    1390x, 118x

("peak" adds the arguments and the output, 6 MiB at N = 4096, which no method can avoid. Gradients of both
sides: 3.1 MiB temp. Chunks of 512 / 1024 rows: 3.8 / 6.8 MiB temp, 0.041 / 0.036 s at N = 4096.) The fused
loss agrees with a float64 evaluation to ~2.5e-7 relative and its gradient to ~7e-7 for unrelated features
(dense: 3e-8 / 2e-7). For a nearly converged student (the teacher's top principal directions plus 1e-2 noise,
loss 6e-10) fused is off by 2e-7 in value and 9e-5 in gradient (dense 3e-7 / 4e-6; the expanded Gram
identity 2e-2 / 2e-4; the previous unchunked fused method, which formed ``F``, 6e-7 / 2e-4). In float64 fused
and dense agree to ~1e-15 for any chunk size, rank-deficient inputs included. The QR is a LAPACK call on CPU
(scipy's OpenBLAS): on a busy machine OpenBLAS threads spin, so set ``OPENBLAS_NUM_THREADS=1`` for CPU runs
(XLA does its own threading). A batch-sharded jit keeps everything per device (no all-gather; the loss's
mean over the batch is the only collective).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

RELATION_NORMS = ("row", "cosine")
RELATION_METHODS = ("fused", "dense")
DEFAULT_CHUNK_SIZE = 256  # rows per chunk of the fused method (benchmarks/relation_loss.py --chunk_sizes)
_QR_CHUNK_FACTOR = 2  # the TSQR takes this many times chunk_size rows per step

_HI = jax.lax.Precision.HIGHEST  # f32 matmuls must not silently drop to TF32/bf16 on GPU/TPU


def _compute_dtype(*arrays):
    return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def _norm_clamped(x, eps, axis=-1):
    """max(||x||, eps) along ``axis`` (keepdims), with a zero (not NaN) gradient for an all-zero ``x``."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    positive = sq > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1)), 0)
    return jnp.maximum(norm, eps)


def _l2_normalize(x, eps, axis=-1):
    """``torch.nn.functional.normalize(x, dim=axis, eps=eps)``: x / max(||x||, eps)."""
    return x / _norm_clamped(x, eps, axis)


def _check_norm(normalize):
    if normalize not in RELATION_NORMS:
        raise ValueError(f"normalize must be one of {RELATION_NORMS}, got {normalize!r}")


def _as_q(features, name):
    features = jnp.asarray(features)
    if features.ndim != 4:
        raise ValueError(f"{name} must be (B, H, W, C), got shape {features.shape}")
    b, h, w, c = features.shape
    return features.reshape(b, h * w, c)


@functools.partial(jax.jit, static_argnames=("normalize", "eps"))
def relation_matrix(features, *, normalize="row", eps=1e-12):
    """Relation matrices ``A~`` of ``features`` (B, H, W, C) -> (B, N, N), N = H * W (float32 or wider)."""
    _check_norm(normalize)
    q = _as_q(features, "features")
    q = q.astype(_compute_dtype(q))
    if normalize == "cosine":
        q = _l2_normalize(q, eps)
    a = jnp.einsum("bnc,bmc->bnm", q, q, precision=_HI)
    if normalize == "row":
        a = _l2_normalize(a, eps)
    return a


def _dense_loss(qt, qs, normalize, eps):
    n = qt.shape[1]
    feats_t = qt.reshape(qt.shape[0], n, 1, qt.shape[2])
    feats_s = qs.reshape(qs.shape[0], n, 1, qs.shape[2])
    diff = relation_matrix(feats_t, normalize=normalize, eps=eps) - relation_matrix(
        feats_s, normalize=normalize, eps=eps
    )
    return jnp.mean(jnp.sum(jnp.square(diff), axis=(1, 2))) / (n * n)


def _chunk_layout(n, chunk_size):
    """Rows per chunk ``c = min(chunk_size, N)`` and the number of chunks ``ceil(N / c)``."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    c = min(chunk_size, n)
    return c, -(-n // c)


def _row_slice(q, start, c):
    """``q[:, start : start + c]`` for ``q`` (B, N, C), sliced from the flattened (B, N * C) view.

    Same values as a dynamic slice of rows, but the reshape stops XLA's layout assignment from carrying the
    QR's column-major operand layout back to ``q``, which would transpose-copy all of it (O(N D) memory).
    """
    b, _, ch = q.shape
    return jax.lax.dynamic_slice_in_dim(q.reshape(b, -1), start * ch, c * ch, axis=1).reshape(b, c, ch)


def _load_rows(qt, qs, k, c, dtype, cosine, eps):
    """Chunk ``k`` of both inputs (B, N, C) -> (B, c, C) in ``dtype``, rows ``[start, start + c)``.

    ``start = min(k c, N - c)``: the last chunk is shifted back to end at row N instead of padding the
    inputs (a padded copy would be O(N D) memory). ``fresh`` (c,) marks the rows no earlier chunk covered;
    sums over rows (R, the loss, M) must count only those. For "cosine" the rows are L2-normalised here
    (``raw`` keeps them for the backward pass of that normalisation).
    """
    n = qt.shape[1]
    start = jnp.minimum(k * c, n - c)
    raw_t, raw_s = (_row_slice(q, start, c).astype(dtype) for q in (qt, qs))
    fresh = start + jnp.arange(c) >= k * c
    if cosine:
        return _l2_normalize(raw_t, eps), _l2_normalize(raw_s, eps), fresh, start, (raw_t, raw_s)
    return raw_t, raw_s, fresh, start, (raw_t, raw_s)


def _tsqr_r(qt, qs, c, chunks, dtype, cosine, eps):
    """``R`` (B, D, D), upper triangular, with ``R^T R = P^T P``, by a TSQR over row chunks: R only, no F.

    ``R <- qr([R; P_k]).R`` for k = 0, 1, ...; O(c D + D^2) memory. Rows below ``min(N, D)`` are zero.
    """
    d = qt.shape[-1] + qs.shape[-1]

    def block(k):
        xt, xs, fresh, _, _ = _load_rows(qt, qs, k, c, dtype, cosine, eps)
        return jnp.where(fresh[:, None], jnp.concatenate([xt, xs], axis=-1), 0)

    r = jnp.linalg.qr(block(0), mode="r")  # (B, min(c, D), D)
    r = jnp.pad(r, ((0, 0), (0, d - r.shape[-2]), (0, 0)))
    return jax.lax.fori_loop(
        1, chunks, lambda k, r: jnp.linalg.qr(jnp.concatenate([r, block(k)], axis=-2), mode="r"), r
    )


def _rotated_rows(xt, xs, r, row_norm, eps):
    """Rows of A~_T and A~_S in the D-dim frame of F: u~_i = s_Ti R_T q_Ti, v~_i = s_Si R_S q_Si.

    ``R_T`` (the first C_T columns of the triangular R) is zero below row C_T, so ``u`` is C_T-dim; ``w``
    (B, c, D) is ``u~ - v~`` with ``u~`` zero-padded.
    """
    ct = xt.shape[-1]
    u = jnp.einsum("bnc,bkc->bnk", xt, r[:, :ct, :ct], precision=_HI)  # ||u_i|| = ||A_T[i, :]||
    v = jnp.einsum("bnc,bkc->bnk", xs, r[:, :, ct:], precision=_HI)
    nt = ns = None
    if row_norm:
        nt = jnp.sqrt(jnp.sum(jnp.square(u), axis=-1, keepdims=True))
        ns = jnp.sqrt(jnp.sum(jnp.square(v), axis=-1, keepdims=True))
        u, v = u / jnp.maximum(nt, eps), v / jnp.maximum(ns, eps)
    w = jnp.pad(u, ((0, 0), (0, 0), (0, v.shape[-1] - ct))) - v
    return u, v, w, nt, ns


def _fused_forward(qt, qs, cosine, eps, chunk_size):
    b, n, _ = qt.shape
    dtype = _compute_dtype(qt, qs)
    # The TSQR keeps fewer (c x D) temporaries live than the passes over u, v: twice the rows per chunk
    # there costs no more peak memory and saves part of its QR overhead (a (D + c) x D QR per c rows).
    r = _tsqr_r(qt, qs, *_chunk_layout(n, _QR_CHUNK_FACTOR * chunk_size), dtype, cosine, eps)
    c, chunks = _chunk_layout(n, chunk_size)

    def body(k, total):
        xt, xs, fresh, _, _ = _load_rows(qt, qs, k, c, dtype, cosine, eps)
        w = _rotated_rows(xt, xs, r, not cosine, eps)[2]
        return total + jnp.sum(jnp.where(fresh, jnp.sum(jnp.square(w), axis=-1), 0), axis=-1)

    total = jax.lax.fori_loop(0, chunks, body, jnp.zeros_like(r[:, 0, 0]))
    # Only the inputs and R (D x D) are kept for the backward pass; the rest is recomputed there.
    return jnp.mean(total) / (n * n), (qt, qs, r)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _fused_core(qt, qs, cosine, eps, chunk_size):
    """mean_b (1/N^2) sum_i ||a~_Ti - a~_Si||^2 for Q_T (B, N, C_T), Q_S (B, N, C_S); see module docstring."""
    return _fused_forward(qt, qs, cosine, eps, chunk_size)[0]


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Wanted:
    """Which inputs are differentiated (static): the backward pass skips the other side's work."""

    teacher: bool
    student: bool


def _fused_core_fwd(qt, qs, cosine, eps, chunk_size):
    loss, res = _fused_forward(qt.value, qs.value, cosine, eps, chunk_size)
    return loss, (*res, _Wanted(qt.perturbed, qs.perturbed))


def _normalize_vjp(raw, g, eps):
    """Cotangent of ``raw`` through ``raw / max(||raw||, eps)`` (rows), as torch's F.normalize."""
    norm = _norm_clamped(raw, eps)
    unit = raw / norm
    along = jnp.where(norm > eps, jnp.sum(unit * g, axis=-1, keepdims=True), 0)
    return (g - along * unit) / norm


def _fused_core_bwd(cosine, eps, chunk_size, res, g):
    qt, qs, r, wanted = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero) or not (wanted.teacher or wanted.student):
        return jnp.zeros_like(qt), jnp.zeros_like(qs)
    b, n, ct = qt.shape
    dtype = r.dtype
    c, chunks = _chunk_layout(n, chunk_size)
    k = (g * 2 / (b * n * n)).astype(dtype)
    sides = [side for side, on in (("t", wanted.teacher), ("s", wanted.student)) if on]

    # Pass 1: the row-local term G Q = Y R_q (written per chunk) and the D x C blocks of M for the other
    # term, G^T Q = P M, accumulated over rows (module docstring): with teacher weights (a, b) = (alpha,
    # beta) and student weights (b, e) = (beta, delta), M_TT = Q_T^T a Q_T, M_TS = Q_T^T b Q_S and
    # M_SS = Q_S^T e Q_S (diagonal weights, zero on the rows an earlier chunk covered).
    def pass1(i, carry):
        carry = dict(carry)
        xt, xs, fresh, start, _ = _load_rows(qt, qs, i, c, dtype, cosine, eps)
        u, v, w, nt, ns = _rotated_rows(xt, xs, r, not cosine, eps)
        keep = fresh[:, None]
        if cosine:
            yt, ys = k * w[..., :ct], -k * w
            alpha = beta = delta = jnp.where(keep, k, 0)
            beta = -beta
        else:
            st, ss = 1 / jnp.maximum(nt, eps), 1 / jnp.maximum(ns, eps)
            # Projection onto the tangent of the normalisation (none where the norm is clamped to eps).
            c_t = jnp.where(nt > eps, jnp.sum(u * w[..., :ct], axis=-1, keepdims=True), 0)
            c_s = jnp.where(ns > eps, jnp.sum(v * w, axis=-1, keepdims=True), 0)
            yt = (k * st) * (w[..., :ct] - c_t * u)  # y_Ti beyond C_T meets only zero rows of R_T
            ys = (-k * ss) * (w - c_s * v)
            alpha = jnp.where(keep, k * st * st * (1 - c_t), 0)
            beta = jnp.where(keep, -k * st * ss, 0)
            delta = jnp.where(keep, k * ss * ss * (1 + c_s), 0)
        carry["m_ts"] = carry["m_ts"] + jnp.einsum("bnc,bnd->bcd", xt, beta * xs, precision=_HI)
        if wanted.teacher:
            gt_rows = jnp.einsum("bnk,bkc->bnc", yt, r[:, :ct, :ct], precision=_HI)
            carry["gt"] = jax.lax.dynamic_update_slice_in_dim(carry["gt"], gt_rows, start, axis=1)
            carry["m_tt"] = carry["m_tt"] + jnp.einsum("bnc,bnd->bcd", xt, alpha * xt, precision=_HI)
        if wanted.student:
            gs_rows = jnp.einsum("bnk,bkc->bnc", ys, r[:, :, ct:], precision=_HI)
            carry["gs"] = jax.lax.dynamic_update_slice_in_dim(carry["gs"], gs_rows, start, axis=1)
            carry["m_ss"] = carry["m_ss"] + jnp.einsum("bnc,bnd->bcd", xs, delta * xs, precision=_HI)
        return carry

    # zeros_like keeps the inputs' batch sharding (explicit-sharding meshes check it).
    init = {"m_ts": jnp.zeros_like(r[:, :ct, ct:])}
    if wanted.teacher:
        init.update(gt=jnp.zeros_like(qt, dtype), m_tt=jnp.zeros_like(r[:, :ct, :ct]))
    if wanted.student:
        init.update(gs=jnp.zeros_like(qs, dtype), m_ss=jnp.zeros_like(r[:, ct:, ct:]))
    acc = jax.lax.fori_loop(0, chunks, pass1, init)
    m = {}  # the columns of M = [[M_TT, M_TS], [M_TS^T, M_SS]] each side needs
    if wanted.teacher:
        m["t"] = jnp.concatenate([acc["m_tt"], jnp.swapaxes(acc["m_ts"], -1, -2)], axis=-2)
    if wanted.student:
        m["s"] = jnp.concatenate([acc["m_ts"], acc["m_ss"]], axis=-2)

    # Pass 2: add P M to the chunk's rows (once per row), then the "cosine" normalisation's backward pass.
    def pass2(i, grads):
        grads = dict(grads)
        xt, xs, fresh, start, raw = _load_rows(qt, qs, i, c, dtype, cosine, eps)
        p = jnp.concatenate([xt, xs], axis=-1)
        for side in sides:
            old = jax.lax.dynamic_slice_in_dim(grads[side], start, c, axis=1)
            new = old + jnp.einsum("bnd,bde->bne", p, m[side], precision=_HI)
            if cosine:
                new = _normalize_vjp(raw[side == "s"], new, eps)
            new = jnp.where(fresh[:, None], new, old)
            grads[side] = jax.lax.dynamic_update_slice_in_dim(grads[side], new, start, axis=1)
        return grads

    grads = jax.lax.fori_loop(0, chunks, pass2, {side: acc["g" + side] for side in sides})
    return (
        grads["t"].astype(qt.dtype) if wanted.teacher else jnp.zeros_like(qt),
        grads["s"].astype(qs.dtype) if wanted.student else jnp.zeros_like(qs),
    )


_fused_core.defvjp(_fused_core_fwd, _fused_core_bwd, symbolic_zeros=True)


@functools.partial(jax.jit, static_argnames=("normalize", "method", "eps", "chunk_size"))
def relation_loss(
    teacher_features,
    student_features,
    *,
    normalize="row",
    method="fused",
    eps=1e-12,
    chunk_size=DEFAULT_CHUNK_SIZE,
):
    """SRPKD loss ``mean_b (1/N^2) ||A~_T - A~_S||_F^2`` (scalar).

    Args:
      teacher_features: (B, H, W, C_T) float features at the relation layer (stop gradients yourself if the
        teacher is frozen; the loss is differentiable in both arguments).
      student_features: (B, H, W, C_S); C_S may differ from C_T.
      normalize: "row" (normalise rows of A = Q Q^T, the paper) or "cosine" (normalise rows of Q instead).
      method: "fused" (QR-rotated identity in row chunks, O(N D^2) time, O(chunk_size * D + D^2) temporary
        memory, D = C_T + C_S; default) or "dense" (forms both N x N matrices; the reference).
      eps: clamp of the norms, as in ``torch.nn.functional.normalize``.
      chunk_size: rows of Q per chunk of the fused method (static; any N works, any value gives the same
        loss up to rounding): its temporary memory is O(chunk_size * D + D^2). Ignored by "dense".

    Returns:
      Scalar loss in float32 (float64 for float64 inputs).
    """
    _check_norm(normalize)
    if method not in RELATION_METHODS:
        raise ValueError(f"method must be one of {RELATION_METHODS}, got {method!r}")
    qt = _as_q(teacher_features, "teacher_features")
    qs = _as_q(student_features, "student_features")
    if jnp.shape(teacher_features)[:3] != jnp.shape(student_features)[:3]:
        raise ValueError(
            "teacher and student features must share (B, H, W); got "
            f"{jnp.shape(teacher_features)} and {jnp.shape(student_features)}"
        )
    dtype = _compute_dtype(qt, qs)
    if method == "dense":
        return _dense_loss(qt.astype(dtype), qs.astype(dtype), normalize, eps)
    _chunk_layout(qt.shape[1], chunk_size)  # validate before tracing the loops
    # Floating inputs go in as they are (each chunk is cast to `dtype`: no full-size converted copy).
    qt, qs = (q if jnp.issubdtype(q.dtype, jnp.floating) else q.astype(dtype) for q in (qt, qs))
    return _fused_core(qt, qs, normalize == "cosine", eps, chunk_size)
