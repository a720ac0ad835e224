"""Relation-matrix distillation loss (SRPKD): fused == dense == literal NumPy == literal PyTorch."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ganjax.losses.relation import RELATION_METHODS, RELATION_NORMS, relation_loss, relation_matrix

EPS = 1e-12


def _features(seed, shape, offset=0.5):
    """Deterministic features with a shared positive component (post-ReLU-like relations are all > 0)."""
    return np.random.default_rng(seed).standard_normal(shape) + offset


def _pair(seed=0, b=2, h=8, w=8, ct=12, cs=5):
    return _features(seed, (b, h, w, ct)), _features(seed + 1, (b, h, w, cs))


@functools.cache
def _value_and_grad(normalize, method):
    return jax.jit(
        jax.value_and_grad(functools.partial(relation_loss, normalize=normalize, method=method), (0, 1))
    )


def _loss_and_grads(t, s, normalize, method):
    value, grads = _value_and_grad(normalize, method)(t, s)
    return np.asarray(value), [np.asarray(g) for g in grads]


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _numpy_loss(t, s, normalize, eps=EPS):
    """The formula, literally: A = Q Q^T, rows of A (or Q) L2-normalised, mean_b ||A~_T - A~_S||_F^2 / N^2."""

    def rel(x):
        b, h, w, c = x.shape
        q = np.asarray(x, np.float64).reshape(b, h * w, c)
        if normalize == "cosine":
            q = q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), eps)
        a = q @ q.transpose(0, 2, 1)
        if normalize == "row":
            a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), eps)
        return a

    n = t.shape[1] * t.shape[2]
    return float(np.mean(np.sum((rel(t) - rel(s)) ** 2, axis=(1, 2)) / n**2))


def _torch_loss_and_grads(t, s, normalize, eps=EPS):
    """The formula in PyTorch (F.normalize, torch.bmm), float64, gradients by autograd."""
    tt = torch.tensor(np.asarray(t, np.float64), requires_grad=True)
    ts = torch.tensor(np.asarray(s, np.float64), requires_grad=True)

    def rel(x):
        q = x.flatten(1, 2)  # (B, N, C)
        if normalize == "cosine":
            q = F.normalize(q, p=2, dim=2, eps=eps)
        a = torch.bmm(q, q.transpose(1, 2))
        if normalize == "row":
            a = F.normalize(a, p=2, dim=2, eps=eps)
        return a

    n = tt.shape[1] * tt.shape[2]
    loss = ((rel(tt) - rel(ts)) ** 2).sum(dim=(1, 2)).div(n * n).mean()
    loss.backward()
    return loss.item(), [tt.grad.numpy(), ts.grad.numpy()]


def test_public_constants():
    assert RELATION_NORMS == ("row", "cosine")
    assert RELATION_METHODS == ("fused", "dense")


@pytest.mark.parametrize("normalize", RELATION_NORMS)
def test_fused_matches_dense_float32(normalize):
    t, s = _pair(0)
    t, s = jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32)
    vf, gf = _loss_and_grads(t, s, normalize, "fused")
    vd, gd = _loss_and_grads(t, s, normalize, "dense")
    assert vf.dtype == np.float32 and gf[0].dtype == np.float32
    assert gf[0].shape == t.shape and gf[1].shape == s.shape
    assert _rel_err(vf, vd) < 1e-5
    for a, b in zip(gf, gd, strict=True):
        assert _rel_err(a, b) < 1e-5


@pytest.mark.parametrize("normalize", RELATION_NORMS)
def test_fused_dense_numpy_torch_agree_float64(normalize):
    t, s = _pair(1)
    want_np = _numpy_loss(t, s, normalize)
    want_torch, grads_torch = _torch_loss_and_grads(t, s, normalize)
    assert abs(want_torch - want_np) <= 1e-12 * want_np
    with jax.enable_x64(True):
        vf, gf = _loss_and_grads(jnp.asarray(t), jnp.asarray(s), normalize, "fused")
        vd, gd = _loss_and_grads(jnp.asarray(t), jnp.asarray(s), normalize, "dense")
    assert vf.dtype == np.float64 and gf[1].dtype == np.float64
    for v in (vf, vd):
        assert _rel_err(v, want_np) < 1e-10
    for a, b, c in zip(gf, gd, grads_torch, strict=True):
        assert _rel_err(a, b) < 1e-10  # fused vs dense
        assert _rel_err(a, c) < 1e-10  # fused vs PyTorch
        assert _rel_err(b, c) < 1e-10  # dense vs PyTorch


def test_float32_matches_torch():
    t, s = _pair(2)  # same shapes as above: reuses the compiled functions
    for normalize in RELATION_NORMS:
        want, grads = _torch_loss_and_grads(t, s, normalize)
        v, g = _loss_and_grads(jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32), normalize, "fused")
        assert _rel_err(v, want) < 1e-5
        for a, b in zip(g, grads, strict=True):
            assert _rel_err(a, b) < 1e-5


@pytest.mark.parametrize("normalize", RELATION_NORMS)
def test_zero_rows_and_dead_channels(normalize):
    """All-zero spatial positions (rows of Q, so rows and columns of A) and all-zero channels.

    A zero row stays zero after normalisation (x / max(||x||, eps)) and the norm contributes no gradient, as
    in torch.nn.functional.normalize. Dead channels make [Q_T, Q_S] rank deficient: the fused QR path must not
    care.
    """
    t, s = _pair(3, b=2, h=5, w=4, ct=6, cs=4)
    t[0, 1, 2] = 0  # teacher-only zero position
    s[0, 3, 1] = 0  # student-only zero position
    t[1, 0, 0] = 0  # zero in both
    s[1, 0, 0] = 0
    t[..., 2] = 0  # dead teacher channel
    s[1, ..., 0] = 0  # dead student channel in one sample
    want_torch, grads_torch = _torch_loss_and_grads(t, s, normalize)
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.float64, 1e-10)):
        with jax.enable_x64(dtype == jnp.float64):
            tj, sj = jnp.asarray(t, dtype), jnp.asarray(s, dtype)
            for method in RELATION_METHODS:
                v, g = _loss_and_grads(tj, sj, normalize, method)
                assert np.isfinite(v) and all(np.all(np.isfinite(x)) for x in g), (dtype, method)
                assert _rel_err(v, want_torch) < tol, (dtype, method)
                for a, b in zip(g, grads_torch, strict=True):
                    assert _rel_err(a, b) < tol, (dtype, method)
            a = np.asarray(relation_matrix(tj, normalize=normalize))
            assert np.all(np.isfinite(a)) and np.all(a[0, 6] == 0) and np.all(a[0, :, 6] == 0)


def test_more_channels_than_positions():
    """C_T + C_S > N: the thin QR has K = N < D rows; still exact."""
    t, s = _pair(4, b=2, h=3, w=3, ct=16, cs=11)
    for normalize in RELATION_NORMS:
        want, grads = _torch_loss_and_grads(t, s, normalize)
        with jax.enable_x64(True):
            v, g = _loss_and_grads(jnp.asarray(t), jnp.asarray(s), normalize, "fused")
        assert _rel_err(v, want) < 1e-10
        for a, b in zip(g, grads, strict=True):
            assert _rel_err(a, b) < 1e-10


def test_relation_matrix():
    x = _features(5, (2, 3, 5, 4))
    q = x.reshape(2, 15, 4)
    a = np.asarray(relation_matrix(jnp.asarray(x, jnp.float32), normalize="row"))
    assert a.shape == (2, 15, 15) and a.dtype == np.float32
    gram = q @ q.transpose(0, 2, 1)
    np.testing.assert_allclose(a, gram / np.linalg.norm(gram, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a, axis=-1), 1, rtol=1e-5)
    c = np.asarray(relation_matrix(jnp.asarray(x, jnp.float32), normalize="cosine"))
    qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
    np.testing.assert_allclose(c, qn @ qn.transpose(0, 2, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.diagonal(c, axis1=1, axis2=2), 1, rtol=1e-5)


@pytest.mark.parametrize("normalize", RELATION_NORMS)
def test_invariances(normalize):
    t, s = (jnp.asarray(x, jnp.float32) for x in _pair(6, ct=10, cs=10))
    base = float(relation_loss(t, s, normalize=normalize))
    assert base > 0
    for method in RELATION_METHODS:
        # Identical inputs: zero loss and zero gradient.
        v, g = _loss_and_grads(t, t, normalize, method)
        assert abs(float(v)) < 1e-6 * base, method
        assert all(float(np.max(np.abs(x))) < 1e-6 for x in g), method
        # Symmetric in teacher and student.
        swapped = float(relation_loss(s, t, normalize=normalize, method=method))
        assert swapped == pytest.approx(base, rel=1e-5)
    # Invariant to a positive rescaling of either input (A scales by c^2, then rows are normalised).
    for c in (1e-3, 7.5, 1e3):
        assert float(relation_loss(c * t, s, normalize=normalize)) == pytest.approx(base, rel=1e-5)
        assert float(relation_loss(t, c * s, normalize=normalize)) == pytest.approx(base, rel=1e-5)


def test_batch_is_mean_of_samples():
    t, s = (jnp.asarray(x, jnp.float32) for x in _pair(7, b=3))
    per_sample = [float(relation_loss(t[i : i + 1], s[i : i + 1])) for i in range(3)]
    assert float(relation_loss(t, s)) == pytest.approx(np.mean(per_sample), rel=1e-6)


def test_bfloat16_inputs_computed_in_float32():
    t, s = _pair(8)
    tb, sb = jnp.asarray(t, jnp.bfloat16), jnp.asarray(s, jnp.bfloat16)
    v, g = _loss_and_grads(tb, sb, "row", "fused")
    assert v.dtype == np.float32 and g[0].dtype == jnp.bfloat16 and g[1].dtype == jnp.bfloat16
    ref = relation_loss(tb.astype(jnp.float32), sb.astype(jnp.float32), method="dense")
    assert float(v) == pytest.approx(float(ref), rel=1e-5)


def test_validation_errors():
    t = jnp.zeros((2, 4, 4, 3))
    with pytest.raises(ValueError, match="share"):
        relation_loss(t, jnp.zeros((2, 4, 5, 3)))
    with pytest.raises(ValueError, match="share"):
        relation_loss(t, jnp.zeros((1, 4, 4, 3)))
    with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
        relation_loss(t, jnp.zeros((2, 16, 3)))
    with pytest.raises(ValueError, match="normalize"):
        relation_loss(t, t, normalize="column")
    with pytest.raises(ValueError, match="method"):
        relation_loss(t, t, method="sparse")
    with pytest.raises(ValueError, match="normalize"):
        relation_matrix(t, normalize="l1")


def _compiled_bytes(fn, *shapes):
    analysis = jax.jit(fn).lower(*shapes).compile().memory_analysis()
    return analysis.temp_size_in_bytes + analysis.output_size_in_bytes


def test_fused_never_materialises_n_by_n():
    """At N = 4096 the fused loss (and its gradient) needs a few N x C buffers, dense needs N^2 floats."""
    n_side, ct, cs = 64, 12, 4
    n2_bytes = 4 * (n_side * n_side) ** 2
    shapes = (
        jax.ShapeDtypeStruct((1, n_side, n_side, ct), jnp.float32),
        jax.ShapeDtypeStruct((1, n_side, n_side, cs), jnp.float32),
    )
    for method in RELATION_METHODS:

        def loss(t, s, method=method):
            return relation_loss(t, s, method=method)

        fwd = _compiled_bytes(loss, *shapes)
        both = _compiled_bytes(jax.value_and_grad(loss, (0, 1)), *shapes)
        if method == "fused":
            assert fwd < 0.05 * n2_bytes and both < 0.05 * n2_bytes, (fwd, both, n2_bytes)
        else:
            assert fwd > n2_bytes and both > n2_bytes, (fwd, both, n2_bytes)


# ---- The row-chunked fused method ----------------------------------------------------------------------


@functools.cache
def _chunked_value_and_grad(normalize, chunk_size, argnums=(0, 1)):
    loss = functools.partial(relation_loss, normalize=normalize, method="fused", chunk_size=chunk_size)
    return jax.jit(jax.value_and_grad(loss, argnums))


@pytest.mark.parametrize("normalize", RELATION_NORMS)
def test_chunked_matches_torch_float64_any_chunk_size(normalize):
    """N = 35 rows in chunks of 8 (the last one shifted back over rows already seen) and of 64 > N."""
    t, s = _pair(9, b=2, h=5, w=7, ct=6, cs=4)
    want, grads = _torch_loss_and_grads(t, s, normalize)
    with jax.enable_x64(True):
        for chunk in (8, 64):
            v, g = _chunked_value_and_grad(normalize, chunk)(jnp.asarray(t), jnp.asarray(s))
            assert _rel_err(v, want) < 1e-12, chunk
            for a, b in zip(g, grads, strict=True):
                assert _rel_err(a, b) < 1e-12, chunk


def test_chunked_rank_deficient_float64():
    """Dead channels, zero positions, a student that is a linear map of the teacher, and D > N, in chunks
    smaller than D: the TSQR's R is singular there, which the backward pass never inverts."""
    t, s = _pair(10, b=2, h=4, w=5, ct=14, cs=9)  # N = 20 < D = 23
    t[..., 3] = 0
    s[1, ..., 2] = 0
    t[0, 1, 1] = 0
    s[1, 2, 3] = 0
    s[0] = t[0, ..., :9] @ np.random.default_rng(11).standard_normal((9, 9))  # rank(P) <= 13 in sample 0
    for normalize, chunk in (("row", 3), ("cosine", 7)):
        want, grads = _torch_loss_and_grads(t, s, normalize)
        with jax.enable_x64(True):
            v, g = _chunked_value_and_grad(normalize, chunk)(jnp.asarray(t), jnp.asarray(s))
        assert np.isfinite(v) and all(np.all(np.isfinite(x)) for x in g)
        assert _rel_err(v, want) < 1e-10, normalize
        for a, b in zip(g, grads, strict=True):
            assert _rel_err(a, b) < 1e-10, normalize


@pytest.mark.parametrize("normalize", RELATION_NORMS)
def test_chunked_float32_and_one_sided_gradients(normalize):
    """float32 against the dense reference in chunks of 24 (N = 64), and the gradient of one side only (the
    backward pass then skips the other side's work) equal to that of the two-sided gradient."""
    t, s = (jnp.asarray(x, jnp.float32) for x in _pair(12))
    vd, gd = _loss_and_grads(t, s, normalize, "dense")
    v, g = _chunked_value_and_grad(normalize, 24)(t, s)
    assert _rel_err(v, vd) < 1e-5
    for a, b in zip(g, gd, strict=True):
        assert _rel_err(a, b) < 1e-5
    for argnum in (1,) if normalize == "row" else (0,):
        v1, g1 = _chunked_value_and_grad(normalize, 24, argnum)(t, s)
        assert float(v1) == pytest.approx(float(v), rel=1e-6)
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g[argnum]), rtol=1e-6, atol=1e-6 * _max(g))


def _max(grads):
    return max(float(np.max(np.abs(np.asarray(x)))) for x in grads)


def test_chunked_nearly_converged_student_float32():
    """A student that nearly matches the teacher (the teacher's top principal directions plus 1e-2 noise):
    the loss, 5.8e-7, is ~1e-4 of its value for unrelated features. Measured float32 errors: loss 2e-7,
    gradients 1e-5 / 3e-5 (teacher / student; the dense method: 2e-8, 4e-6 / 8e-6)."""
    rng = np.random.default_rng(13)
    latent = rng.standard_normal((1, 16, 16, 4)) + 1.0
    t = latent @ rng.standard_normal((4, 24)) + 0.5 * rng.standard_normal((1, 16, 16, 24))
    basis = np.linalg.svd(t.reshape(-1, 24), full_matrices=False)[2][:8]
    s = t @ basis.T + 1e-2 * rng.standard_normal((1, 16, 16, 8))
    want, grads = _torch_loss_and_grads(t, s, "row")
    assert want < 1e-6
    t32, s32 = jnp.asarray(t, jnp.float32), jnp.asarray(s, jnp.float32)
    v, g = _chunked_value_and_grad("row", 100)(t32, s32)
    assert _rel_err(v, want) < 2e-6
    for a, b in zip(g, grads, strict=True):
        assert _rel_err(a, b) < 2e-4


def test_chunked_memory_does_not_grow_with_n():
    """Compiled temporary memory of value_and_grad is O(chunk * D + D^2): the same at N = 1024 and 16384."""
    temps = []
    for side in (32, 128):
        shapes = (
            jax.ShapeDtypeStruct((1, side, side, 12), jnp.float32),
            jax.ShapeDtypeStruct((1, side, side, 4), jnp.float32),
        )
        loss = functools.partial(relation_loss, chunk_size=256)
        analysis = jax.jit(jax.value_and_grad(loss, (0, 1))).lower(*shapes).compile().memory_analysis()
        temps.append(analysis.temp_size_in_bytes)
    n_by_d_bytes = 4 * 128 * 128 * 16
    assert temps[1] <= temps[0] + 4096 and temps[1] < 0.2 * n_by_d_bytes, (temps, n_by_d_bytes)


def test_chunked_batch_sharded_without_all_gather():
    """Batch-sharded over the test's 8 CPU devices: each device factorises its own samples."""
    devices = np.array(jax.devices()[:4])
    mesh = jax.sharding.Mesh(devices, ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    t, s = (jax.device_put(jnp.asarray(x, jnp.float32), sharding) for x in _pair(14, b=4, h=4, w=5))
    fn = jax.jit(
        jax.value_and_grad(functools.partial(relation_loss, chunk_size=7), (0, 1)),
        in_shardings=(sharding,) * 2,
    )
    hlo = fn.lower(t, s).compile().as_text()
    assert "all-gather" not in hlo and "all-to-all" not in hlo
    v, g = fn(t, s)
    vd, gd = _loss_and_grads(np.asarray(t), np.asarray(s), "row", "dense")
    assert _rel_err(v, vd) < 1e-5 and _rel_err(g[1], gd[1]) < 1e-5


def test_chunk_size_validation():
    t = jnp.ones((1, 4, 4, 3))
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="chunk_size"):
            relation_loss(t, t, chunk_size=bad)
