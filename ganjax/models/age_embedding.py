"""Residual age embedding of PAPERS.md §A: pure functions of the linear estimator's weights.

The estimator is z = W e + b with W of shape (K, C). Flax stores the kernel transposed, as
`kernel` of shape (C, K), so the aging basis of integer age a (row a of W) is `kernel[:, a]`.

    a(t)  = row t of W, linearly interpolated between integer ages      (aging_basis)
    e_t   = e + s (a(target) - a(current))                               (target_embedding)

At target == current the two bases cancel and e_t == e, so reconstruction is the special case
target = current age. s (`basis_scale`, 1 in the paper's formula) scales the aging step: trained with
cross-entropy, the estimator's rows stay small next to the embedding (on the synthetic faces |e| ~ 27,
|a(80) - a(10)| ~ 1.7 after 800 steps), so at s = 1 the target embedding moves by a few percent of |e|
and a decoder learns to ignore it. A larger s keeps the direction of every step and lets the estimator
read the target age off e_t.
"""

import jax
import jax.numpy as jnp


def expected_age(logits: jax.Array) -> jax.Array:
    """Expected age sum_k k * softmax(logits)_k of (B, K) logits -> (B,) float32."""
    logits = logits.astype(jnp.float32)
    ages = jnp.arange(logits.shape[-1], dtype=jnp.float32)
    return jnp.sum(jax.nn.softmax(logits, axis=-1) * ages, axis=-1)


def _normalized_columns(kernel: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Each age's basis vector (a column of the (C, K) kernel) scaled to unit L2 norm."""
    norms = jnp.sqrt(jnp.sum(jnp.square(kernel), axis=0, keepdims=True))
    return kernel / (norms + eps)


def aging_basis(kernel: jax.Array, ages: jax.Array, normalize: bool = False) -> jax.Array:
    """Aging basis vectors of (possibly fractional) ages.

    Args:
      kernel: (C, K) estimator kernel; column a is the basis of integer age a.
      ages: (B,) float ages, clipped into [0, K-1].
      normalize: L2-normalise each column first (PAPERS.md option "L2-normalised rows").

    Returns:
      (B, C) array in the kernel's dtype: (1 - w) * kernel[:, floor] + w * kernel[:, floor + 1] with
      w = age - floor, so integer ages give their column exactly.
    """
    num_ages = kernel.shape[-1]
    if normalize:
        kernel = _normalized_columns(kernel)
    # Ages in float32 whatever the kernel dtype: bfloat16 cannot even hold 100.5.
    ages = jnp.clip(jnp.asarray(ages, dtype=jnp.float32), 0.0, num_ages - 1)
    lower = jnp.floor(ages)
    weight = (ages - lower)[:, None].astype(kernel.dtype)
    lower = lower.astype(jnp.int32)
    upper = jnp.minimum(lower + 1, num_ages - 1)
    rows = kernel.T  # (K, C): row a is age a's basis
    return (1.0 - weight) * rows[lower] + weight * rows[upper]


def target_embedding(
    embedding: jax.Array,
    kernel: jax.Array,
    current_ages: jax.Array,
    target_ages: jax.Array,
    normalize: bool = False,
    basis_scale: float = 1.0,
) -> jax.Array:
    """Personalised target embedding e_t = (e - s a(current)) + s a(target), s = `basis_scale`.

    Args:
      embedding: (B, C) embeddings e.
      kernel: (C, K) estimator kernel (pass it through `jax.lax.stop_gradient` when the estimator
        must not learn from this path).
      current_ages, target_ages: (B,) float ages.
      normalize: use L2-normalised bases (see `aging_basis`).
      basis_scale: s, the length of the aging step relative to the estimator's rows (module docstring).

    Returns:
      (B, C) target embeddings; equal to `embedding` (up to rounding) where target == current.
    """
    # The residual e - s a(current) plus s a(target), summed as e + s (a(target) - a(current)): exactly e
    # where target == current, whatever s.
    step = aging_basis(kernel, target_ages, normalize) - aging_basis(kernel, current_ages, normalize)
    return embedding + basis_scale * step
