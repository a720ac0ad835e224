"""Adversarial and aging losses against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ganjax.losses import adversarial
from ganjax.losses.aging import age_cross_entropy, gaussian_labels, l1, mean_variance_loss, two_hot


def normal(seed, shape):
    """Fixed random test data, drawn with NumPy (an eager jax.random call compiles a kernel)."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


REAL = jnp.array([[2.0, 0.5], [1.0, 0.0]])  # e.g. a 2x2 PatchGAN map
FAKE = jnp.array([[-2.0, 0.0], [0.5, -1.0]])


def test_lsgan_is_half_mse_for_d_and_mse_for_g():
    # real: (1, .25, 0, 1) -> .5625; fake: (4, 0, .25, 1) -> 1.3125; D = .5 * 1.875.
    np.testing.assert_allclose(adversarial.discriminator_loss("lsgan", REAL, FAKE), 0.9375, rtol=1e-6)
    # (fake - 1)^2: (9, 1, .25, 4) -> 3.5625
    np.testing.assert_allclose(adversarial.generator_loss("lsgan", FAKE), 3.5625, rtol=1e-6)


def test_hinge():
    # relu(1 - real): (0, .5, 0, 1) -> .375; relu(1 + fake): (0, 1, 1.5, 0) -> .625.
    np.testing.assert_allclose(adversarial.discriminator_loss("hinge", REAL, FAKE), 0.5, rtol=1e-6)
    np.testing.assert_allclose(adversarial.generator_loss("hinge", FAKE), 0.625, rtol=1e-6)


def test_nonsaturating_and_its_vanilla_alias():
    real, fake = jnp.array([math.log(3.0)]), jnp.array([math.log(3.0)])
    # BCE(real, 1) = -log(3/4); BCE(fake, 0) = -log(1/4); G: BCE(fake, 1) = -log(3/4).
    d_expected = 0.5 * (math.log(4 / 3) + math.log(4.0))
    for kind in ("nonsaturating", "vanilla"):
        np.testing.assert_allclose(adversarial.discriminator_loss(kind, real, fake), d_expected, rtol=1e-6)
        np.testing.assert_allclose(adversarial.generator_loss(kind, fake), math.log(4 / 3), rtol=1e-6)
    bce = optax.sigmoid_binary_cross_entropy
    np.testing.assert_allclose(
        adversarial.discriminator_loss("vanilla", REAL, FAKE),
        0.5 * (bce(REAL, jnp.ones_like(REAL)).mean() + bce(FAKE, jnp.zeros_like(FAKE)).mean()),
        rtol=1e-6,
    )


def test_unknown_kind_lists_the_valid_ones():
    assert set(adversarial.ADVERSARIAL_LOSSES) == {"lsgan", "nonsaturating", "vanilla", "hinge"}
    with pytest.raises(ValueError, match="lsgan.*nonsaturating.*vanilla.*hinge"):
        adversarial.discriminator_loss("wgan", REAL, FAKE)
    with pytest.raises(ValueError, match="hinge"):
        adversarial.generator_loss("bce", FAKE)


def test_r1_of_a_linear_discriminator_is_the_squared_weight_norm():
    w, images = normal(0, (4, 4, 3)), normal(1, (5, 4, 4, 3))

    def disc(x):  # a 2x2 "patch map" per image, linear in x: sum of its logits = <w, x> + const
        per_patch = x.reshape(x.shape[0], 2, 2, 2, 2, 3) * w.reshape(2, 2, 2, 2, 3)
        return per_patch.sum(axis=(2, 4, 5)) + 1.0

    np.testing.assert_allclose(adversarial.r1_penalty(disc, images), jnp.sum(w**2), rtol=1e-5)


def test_r1_is_a_per_example_mean():
    images = jnp.arange(2 * 2 * 2 * 1, dtype=jnp.float32).reshape(2, 2, 2, 1)
    # D(x) = 0.5 |x|^2 -> grad = x; ||x_0||^2 = 0+1+4+9 = 14, ||x_1||^2 = 16+25+36+49 = 126.
    penalty = adversarial.r1_penalty(lambda x: 0.5 * jnp.sum(x**2, axis=(1, 2, 3)), images)
    np.testing.assert_allclose(penalty, 70.0, rtol=1e-6)


def test_two_hot_labels():
    labels = two_hot(jnp.array([3.0, 2.5, 0.25, -1.0, 40.0, 9.0]), 10)
    expected = np.zeros((6, 10), np.float32)
    expected[0, 3] = 1.0
    expected[1, 2] = expected[1, 3] = 0.5
    expected[2, 0], expected[2, 1] = 0.75, 0.25
    expected[3, 0] = expected[4, 9] = expected[5, 9] = 1.0
    np.testing.assert_allclose(labels, expected, rtol=1e-6)


def test_two_hot_cross_entropy_is_plain_cross_entropy_at_integer_ages():
    logits = normal(0, (4, 10))
    ages = jnp.array([0, 3, 7, 9])
    plain = optax.softmax_cross_entropy_with_integer_labels(logits, ages).mean()
    np.testing.assert_allclose(age_cross_entropy(logits, ages.astype(jnp.float32)), plain, rtol=1e-6)
    # Fractional ages: the CE is linear in the labels, so a midpoint averages its neighbours.
    mid = age_cross_entropy(logits[:1], jnp.array([3.5]))
    ends = age_cross_entropy(logits[:1], jnp.array([3.0])) + age_cross_entropy(logits[:1], jnp.array([4.0]))
    np.testing.assert_allclose(mid, 0.5 * ends, rtol=1e-6)


def test_gaussian_labels_are_a_discrete_gaussian_centred_on_the_age():
    labels = np.asarray(gaussian_labels(jnp.array([50.0, 50.5, 0.0, 200.0]), 101, 3.0))
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, rtol=1e-6)
    classes = np.arange(101)
    expected = np.exp(-0.5 * ((classes - 50.0) / 3.0) ** 2)
    np.testing.assert_allclose(labels[0], expected / expected.sum(), atol=1e-7)
    np.testing.assert_allclose(labels[:2] @ classes, [50.0, 50.5], atol=1e-4)  # centred, fractional too
    np.testing.assert_allclose(labels[1, 50], labels[1, 51], rtol=1e-6)  # 50.5 sits between 50 and 51
    assert labels[2].argmax() == 0 and labels[3].argmax() == 100  # clipped into the classes
    assert labels[2] @ classes > 0.5  # the truncated Gaussian leans inwards at the ends
    # The cross-entropy with sigma > 0 is the CE against these labels; sigma = 0 keeps the two-hot one.
    logits = normal(1, (4, 101))
    soft = -np.mean(np.sum(labels * np.asarray(jax.nn.log_softmax(logits)), axis=1))
    ages = jnp.array([50.0, 50.5, 0.0, 200.0])
    np.testing.assert_allclose(age_cross_entropy(logits, ages, label_sigma=3.0), soft, rtol=1e-5)
    np.testing.assert_allclose(age_cross_entropy(logits, ages, 0.0), age_cross_entropy(logits, ages), rtol=0)


def test_mean_variance_on_a_known_distribution():
    # p = (.25, .5, .25, 0, 0): mean 1, variance .25 * 1 + .25 * 1 = .5.
    logits = jnp.log(jnp.array([[0.25, 0.5, 0.25, 1e-30, 1e-30], [0.0, 0.0, 1.0, 0.0, 0.0]]) + 1e-30)
    mean_loss, variance_loss = mean_variance_loss(logits, jnp.array([3.0, 2.0]))
    # mean: (.5 * (1 - 3)^2 + .5 * 0) / 2 = 1; variance: (.5 + 0) / 2 = .25.
    np.testing.assert_allclose(mean_loss, 1.0, rtol=1e-5)
    np.testing.assert_allclose(variance_loss, 0.25, rtol=1e-5)


def test_l1():
    np.testing.assert_allclose(l1(jnp.array([1.0, -2.0]), jnp.array([0.0, 1.0])), 2.0)
