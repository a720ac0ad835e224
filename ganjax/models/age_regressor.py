"""An independent age estimator (DEX-style classifier with an expected-age readout) for judging aged faces.

The face-aging literature measures age accuracy with an estimator that is *not* part of the aging model
(PAPERS.md §A, evaluation). This one shares nothing with `ganjax.models.aging` (no encoder, no embedded
linear estimator, no parameters); it is trained on its own (`ganjax/trainers/age_regressor.py`) on the
real train faces:

    images (B, S, S, 3) float32 in [-1, 1]
      -> for each stage width w in `features`: `convs_per_stage` x [3x3 conv (w) - GroupNorm - ReLU],
         then 2x2 max-pool (all stages but the last)
      -> global average pool (B, w_last) -> dropout -> Dense -> logits (B, K), one class per integer age
    age = sum_k k softmax(logits)_k  (DEX's expected value, float32 (B,))

GroupNorm has no running statistics, so the network is a pure function of its parameters and each
image's output does not depend on the rest of its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ganjax.models.age_embedding import expected_age


class AgeRegressor(nn.Module):
    """(B, S, S, 3) float in [-1, 1] -> (B, num_ages) float32 logits (see the module docstring)."""

    num_ages: int = 101
    features: Sequence[int] = (32, 64, 128, 256)
    convs_per_stage: int = 2
    dropout: float = 0.0

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        x = jnp.asarray(images, jnp.float32)
        for stage, width in enumerate(self.features):
            for k in range(self.convs_per_stage):
                x = nn.Conv(width, (3, 3), padding=1, name=f"conv_{stage}_{k}")(x)
                # At most 8 groups, fewer when the width is small (each group needs >= 1 channel).
                x = nn.GroupNorm(num_groups=min(8, width), name=f"norm_{stage}_{k}")(x)
                x = nn.relu(x)
            if stage < len(self.features) - 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(self.num_ages, name="head")(x).astype(jnp.float32)


def build_regressor(model_config) -> AgeRegressor:
    """The network that an age-regressor config's `model` block describes."""
    return AgeRegressor(
        num_ages=int(model_config.num_ages),
        features=tuple(int(f) for f in model_config.features),
        convs_per_stage=int(model_config.convs_per_stage),
        dropout=float(model_config.dropout),
    )


def predict_age(logits: jax.Array) -> jax.Array:
    """(B, K) logits -> (B,) float32 expected ages in years."""
    return expected_age(logits)
