"""`--mode eval` metrics of the aging trainer beyond the in-loop ones (age_mae, gt_l1, copy_l1, gt_l1_ratio).

The held-out faces of the in-loop evaluation (UTKFace: the first config.data.eval_examples test faces; the
synthetic faces: the whole test split) are aged to every age of config.eval.target_ages (runs saved
without it: the columns of the progression grid, config.log.sample_ages), then:

  age accuracy  judged by an independent age regressor (`age_accuracy`; config.eval.regressor = the
                workdir of a configs/age_regressor.py run; empty = skipped, with a note):
                  target_age_mae        overall and per target
                  copy_target_age_mae   the same for the unaltered faces: what a model that changes
                                        nothing scores (the reference point, like copy_l1)
                  predicted_age_mean, predicted_age_std   per target
                  regressor_mae_inputs  the judge's own MAE on the unaltered faces (its error floor)
  identity      dlib's face-recognition ResNet (`identity`) on input vs aged face, real faces only:
                  identity_cosine, identity_distance, identity_verification_rate, identity_verified_of_all
                  and the counts identity_pairs, identity_pairs_scored, identity_inputs_without_face,
                  identity_outputs_without_face; overall = pooled over every (face, target) pair
                On the built-in synthetic faces dlib's models do not apply; there the in-loop gt_l1 (the
                distance to the true render of the same identity at the target age) measures identity.

Returned as (overall metrics {name: float}, per-target rows [{"target_age": t, name: float}]).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ganjax.evaluation import age_accuracy, identity
from ganjax.evaluation.batching import batched
from ganjax.trainers import common

# (images (B, H, W, 3), target ages (B,), current ages (B,)) -> aged images (B, H, W, 3)
AgeFacesFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def target_ages(config) -> list[float]:
    """config.eval.target_ages, or config.log.sample_ages when it is empty or absent (older runs)."""
    ages = [float(t) for t in (config.eval.get("target_ages", ()) or config.log.sample_ages)]
    top = config.model.num_ages - 1
    common.require(
        bool(ages) and all(0 <= a <= top for a in ages),
        f"config.eval.target_ages {tuple(ages)} must be non-empty and in [0, model.num_ages - 1 = {top}].",
    )
    return ages


class AgingExtras:
    """Loads the judge and dlib once; `metrics(age_faces)` scores one set of generator weights."""

    def __init__(self, config, eval_set: dict[str, np.ndarray], batch_size: int):
        self.notes: list[str] = []
        self.targets = target_ages(config)
        self.images, self.ages = eval_set["image"], eval_set["age"].astype(np.float32)
        self.batch_size = batch_size
        e = config.eval

        self.regressor = None
        if e.get("regressor", ""):
            self.regressor = age_accuracy.load_regressor(e.regressor, batch_size=batch_size)
            self._input_predictions = self.regressor.predict(self.images)
            self.regressor_mae_inputs = float(np.mean(np.abs(self._input_predictions - self.ages)))
        else:
            self.notes.append(
                "Age accuracy skipped: config.eval.regressor is empty (train a judge with "
                "configs/age_regressor.py on the same data and pass its workdir)."
            )

        self.embedder = None
        self._input_descriptors = None
        if config.data.name == "synthetic_faces":
            self.notes.append(
                "Identity (dlib face recognition) not computed: dlib's models do not apply to the synthetic "
                "faces; gt_l1 (the distance to the true aged render) measures identity there."
            )
        else:
            try:
                self.embedder = identity.FaceEmbedder(upsample=int(e.get("identity_upsample", 1)))
            except ModuleNotFoundError as err:
                self.notes.append(f"Identity skipped: {err}")

    def metrics(self, age_faces: AgeFacesFn) -> tuple[dict[str, float], list[dict[str, float]]]:
        if self.regressor is None and self.embedder is None:
            return {}, []
        if self.embedder is not None and self._input_descriptors is None:
            self._input_descriptors = self.embedder.embed_all(self.images)  # the same for every checkpoint
        rows = [{"target_age": t} for t in self.targets]
        predictions, inputs_all, outputs_all = [], [], []
        for row, target in zip(rows, self.targets, strict=True):
            targets = np.full(len(self.images), target, np.float32)
            aged = batched(age_faces, (self.images, targets, self.ages), self.batch_size)
            if self.regressor is not None:
                predictions.append(self.regressor.predict(aged))
            if self.embedder is not None:
                outputs = self.embedder.embed_all(aged)
                row.update(_prefixed(identity.pair_scores(self._input_descriptors, outputs)))
                inputs_all += self._input_descriptors
                outputs_all += outputs
        metrics: dict[str, float] = {}
        if self.regressor is not None:
            unchanged = [self._input_predictions] * len(self.targets)  # a model that changes nothing
            for row, judged, target in zip(
                rows, age_accuracy.target_rows(predictions, self.targets), self.targets, strict=True
            ):
                row.update(judged)
                row["copy_target_age_mae"] = age_accuracy.overall([self._input_predictions], [target])
            metrics["target_age_mae"] = age_accuracy.overall(predictions, self.targets)
            metrics["copy_target_age_mae"] = age_accuracy.overall(unchanged, self.targets)
            metrics["regressor_mae_inputs"] = self.regressor_mae_inputs
        if self.embedder is not None:
            metrics.update(_prefixed(identity.pair_scores(inputs_all, outputs_all)))
        return metrics, rows


def _prefixed(scores: dict[str, float]) -> dict[str, float]:
    return {f"identity_{k}": v for k, v in scores.items()}
