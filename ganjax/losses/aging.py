"""Age-estimation and image losses of PAPERS.md §A.

Ages are float years; the estimator has one class per integer age 0..K-1 and labels are clipped
into that range. Fractional ages are represented by two-hot soft labels, so integer ages reduce to
ordinary one-hot cross-entropy; with a label width sigma > 0 the labels are instead a Gaussian over the
classes (label distribution learning, DLDL: Gao et al., TIP 2017), which ties neighbouring ages' rows of
the estimator, and with them the aging basis, together.
"""

import jax
import jax.numpy as jnp


def two_hot(ages: jax.Array, num_ages: int) -> jax.Array:
    """(B,) float ages -> (B, K) float32 soft labels.

    Age a in [0, K-1] (clipped) puts weight 1 - (a - floor a) on class floor(a) and a - floor(a) on
    floor(a) + 1; the expected class under the labels is exactly a.
    """
    ages = jnp.clip(jnp.asarray(ages, jnp.float32), 0.0, num_ages - 1)
    lower = jnp.floor(ages)
    upper_weight = (ages - lower)[:, None]
    lower = lower.astype(jnp.int32)
    upper = jnp.minimum(lower + 1, num_ages - 1)
    return (1.0 - upper_weight) * jax.nn.one_hot(lower, num_ages) + upper_weight * jax.nn.one_hot(
        upper, num_ages
    )


def gaussian_labels(ages: jax.Array, num_ages: int, sigma: float) -> jax.Array:
    """(B,) float ages -> (B, K) float32 labels proportional to exp(-(k - a)^2 / (2 sigma^2)).

    Ages are clipped into [0, K-1]; sigma in years (> 0). Each row sums to 1; its expected class is a
    away from the ends of the range (within ~2 sigma of 0 or K-1 the truncated Gaussian leans inwards).
    """
    ages = jnp.clip(jnp.asarray(ages, jnp.float32), 0.0, num_ages - 1)
    classes = jnp.arange(num_ages, dtype=jnp.float32)
    return jax.nn.softmax(-0.5 * jnp.square((classes - ages[:, None]) / sigma), axis=-1)


def age_cross_entropy(logits: jax.Array, ages: jax.Array, label_sigma: float = 0.0) -> jax.Array:
    """Mean cross-entropy of (B, K) logits against the labels of (B,) ages; a float32 scalar.

    label_sigma = 0: `two_hot(ages, K)` (the paper's); > 0: `gaussian_labels(ages, K, label_sigma)`.
    """
    logits = jnp.asarray(logits, jnp.float32)
    if label_sigma > 0:
        labels = gaussian_labels(ages, logits.shape[-1], label_sigma)
    else:
        labels = two_hot(ages, logits.shape[-1])
    return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def mean_variance_loss(logits: jax.Array, ages: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean-variance loss (Pan et al., CVPR 2018) of (B, K) logits and (B,) ages.

    With p = softmax(logits) and m = sum_k k p_k: mean loss = batch mean of 0.5 (m - y)^2,
    variance loss = batch mean of sum_k p_k (k - m)^2. Ages are clipped into [0, K-1] like the
    cross-entropy labels. Returns two float32 scalars (the caller applies the weights).
    """
    logits = jnp.asarray(logits, jnp.float32)
    num_ages = logits.shape[-1]
    ages = jnp.clip(jnp.asarray(ages, jnp.float32), 0.0, num_ages - 1)
    probs = jax.nn.softmax(logits, axis=-1)
    classes = jnp.arange(num_ages, dtype=jnp.float32)
    mean = jnp.sum(probs * classes, axis=-1)
    mean_loss = jnp.mean(0.5 * jnp.square(mean - ages))
    variance_loss = jnp.mean(jnp.sum(probs * jnp.square(classes - mean[:, None]), axis=-1))
    return mean_loss, variance_loss


def l1(a: jax.Array, b: jax.Array) -> jax.Array:
    """Mean absolute error over all elements, as a float32 scalar."""
    return jnp.mean(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)))
