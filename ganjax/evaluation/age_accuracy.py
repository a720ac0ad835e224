"""Age accuracy of aged faces, judged by an independent age regressor (PAPERS.md §A, evaluation).

The judge is a run of the age-regressor trainer (configs/age_regressor.py, ganjax/models/age_regressor.py):
`load_regressor(workdir)` rebuilds its network from WORKDIR/config.json and reads only its parameters from
the latest (or a given) checkpoint. It shares nothing with the aging model's embedded estimator, so the
generator cannot have learned to please it.

For held-out faces x_i aged to each target age t of a grid, G(x_i, t), with the judge's estimate
r(G(x_i, t)):
  per target t:  target_age_mae = mean_i |r(G(x_i, t)) - t|, predicted_age_mean, predicted_age_std
  overall:       target_age_mae = the mean over all (i, t), equal to the mean of the per-target values
                 (every target has the same faces)
and, as reference points, copy_target_age_mae = mean_(i, t) |r(x_i) - t| (the score of returning the input
unchanged) and the judge's own error floor regressor_mae_inputs = mean_i |r(x_i) - age_i|.

Images are float32 (N, H, W, 3) in [-1, 1] at any size: the judge resizes them to its own input size.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from ganjax.evaluation.batching import batched
from ganjax.models import age_regressor

REGRESSOR_TRAINERS = ("age_regressor",)


@dataclasses.dataclass(frozen=True)
class Regressor:
    """A restored age regressor: `predict(images (N, H, W, 3) float [-1, 1]) -> float32 (N,) years`."""

    workdir: str
    step: int
    config: Any
    model: age_regressor.AgeRegressor
    params: Any
    size: int
    batch_size: int = 32

    @functools.cached_property
    def _apply(self) -> Callable:
        model, size = self.model, self.size

        @jax.jit
        def apply(params, images):
            if images.shape[1:3] != (size, size):
                images = jax.image.resize(images, (images.shape[0], size, size, 3), "linear", antialias=True)
            return age_regressor.predict_age(model.apply({"params": params}, images))

        return apply

    def predict(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) float [-1, 1] -> float32 (N,) estimated ages (fixed-size batches: one compile)."""
        images = np.asarray(images, np.float32)
        return batched(lambda x: self._apply(self.params, x), (images,), self.batch_size).astype(np.float32)


def load_regressor(workdir: str, step: int | None = None, batch_size: int = 32) -> Regressor:
    """The regressor of an age-regressor run (config.eval.regressor), on the default device."""
    from ganjax import translate  # the run-restoring helpers of the export/translate tools

    workdir, config = translate.load_config(workdir)
    if config.trainer not in REGRESSOR_TRAINERS:
        raise ValueError(
            f"config.eval.regressor = {workdir} is a {config.trainer!r} run; it must be a run of "
            "configs/age_regressor.py (trainer 'age_regressor')."
        )
    model = age_regressor.build_regressor(config.model)
    size = int(config.data.size)
    step, step_dir = translate.find_checkpoint(workdir, step)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))
    path = ("params",)
    params = translate.restore_fields(step_dir, {path: translate.abstract_on_one_device(shapes["params"])})
    logging.info("Age regressor: %s at step %d (%d px).", workdir, step, size)
    return Regressor(workdir, step, config, model, params[path], size, batch_size)


def target_rows(predictions: Sequence[np.ndarray], targets: Sequence[float]) -> list[dict[str, float]]:
    """One row per target age from the judge's (N,) estimates of the faces aged to it."""
    rows = []
    for pred, target in zip(predictions, targets, strict=True):
        pred = np.asarray(pred, np.float64)
        rows.append(
            {
                "target_age": float(target),
                "target_age_mae": float(np.mean(np.abs(pred - target))),
                "predicted_age_mean": float(np.mean(pred)),
                "predicted_age_std": float(np.std(pred)),
            }
        )
    return rows


def overall(predictions: Sequence[np.ndarray], targets: Sequence[float]) -> float:
    """Mean |estimate - target| over every (face, target) pair."""
    errors = [np.abs(np.asarray(p, np.float64) - t) for p, t in zip(predictions, targets, strict=True)]
    return float(np.mean(np.concatenate(errors)))
