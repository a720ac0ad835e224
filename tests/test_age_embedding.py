"""Residual age embedding: expected age, interpolated aging bases, target embeddings."""

import jax.numpy as jnp
import numpy as np

from ganjax.models.age_embedding import aging_basis, expected_age, target_embedding

C, K = 6, 11


def normal(seed, shape):
    """Fixed random test data, drawn with NumPy (an eager jax.random call compiles a kernel)."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def kernel():
    return normal(0, (C, K))


def test_expected_age_of_peaked_and_uniform_logits():
    peaked = jnp.full((2, K), -30.0).at[0, 7].set(30.0).at[1, 0].set(30.0)
    np.testing.assert_allclose(expected_age(peaked), [7.0, 0.0], atol=1e-4)
    np.testing.assert_allclose(expected_age(jnp.zeros((1, K))), [(K - 1) / 2], rtol=1e-6)
    # Two equal peaks: halfway between them.
    two = jnp.full((1, K), -30.0).at[0, 3].set(5.0).at[0, 4].set(5.0)
    np.testing.assert_allclose(expected_age(two), [3.5], atol=1e-4)


def test_basis_is_exact_at_integer_ages():
    w = kernel()
    ages = jnp.array([0.0, 3.0, 10.0])
    np.testing.assert_array_equal(aging_basis(w, ages), w[:, [0, 3, 10]].T)


def test_basis_interpolates_linearly_between_integer_ages():
    w = kernel()
    basis = aging_basis(w, jnp.array([2.5, 2.25, 9.9]))
    np.testing.assert_allclose(basis[0], 0.5 * (w[:, 2] + w[:, 3]), rtol=1e-6)
    np.testing.assert_allclose(basis[1], 0.75 * w[:, 2] + 0.25 * w[:, 3], rtol=1e-6)
    np.testing.assert_allclose(basis[2], 0.1 * w[:, 9] + 0.9 * w[:, 10], rtol=1e-5, atol=1e-6)


def test_basis_clips_ages_into_the_estimator_range():
    w = kernel()
    basis = aging_basis(w, jnp.array([-4.0, K - 1.0, K + 7.5]))
    np.testing.assert_array_equal(basis, w[:, [0, K - 1, K - 1]].T)


def test_normalized_basis_has_unit_columns_with_the_same_direction():
    w = kernel()
    basis = aging_basis(w, jnp.array([1.0, 6.0]), normalize=True)
    np.testing.assert_allclose(jnp.linalg.norm(basis, axis=-1), [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(basis[1], w[:, 6] / jnp.linalg.norm(w[:, 6]), rtol=1e-6)


def test_target_equal_to_current_age_returns_the_embedding():
    e = normal(1, (4, C))
    ages = jnp.array([0.0, 3.3, 7.5, 10.0])
    for normalize in (False, True):
        np.testing.assert_allclose(
            target_embedding(e, kernel(), ages, ages, normalize), e, rtol=1e-6, atol=1e-6
        )


def test_target_embedding_swaps_the_current_basis_for_the_target_one():
    w, e = kernel(), normal(1, (2, C))
    current, target = jnp.array([2.0, 4.5]), jnp.array([8.0, 1.0])
    expected = e - aging_basis(w, current) + aging_basis(w, target)
    np.testing.assert_allclose(target_embedding(e, w, current, target), expected, rtol=1e-6)
    np.testing.assert_allclose(
        target_embedding(e, w, current, target)[0], e[0] - w[:, 2] + w[:, 8], rtol=1e-5
    )


def test_basis_scale_lengthens_the_aging_step_and_keeps_reconstruction():
    w, e = kernel(), normal(2, (3, C))
    current, target = jnp.array([2.0, 4.5, 6.0]), jnp.array([8.0, 1.0, 6.0])
    step = target_embedding(e, w, current, target) - e
    scaled = target_embedding(e, w, current, target, basis_scale=10.0)
    np.testing.assert_allclose(scaled - e, 10.0 * step, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(scaled[2], e[2])  # target == current: exactly e
