"""Cheap periodic evaluation of the aging model on held-out faces.

- `age_mae`: the embedded estimator's mean absolute age error on held-out real faces.
- On synthetic data, where every held-out identity is rendered at several known ages, the model ages
  each face x(identity, a) to every other test age b and is compared with the true render x(identity, b):
  `gt_l1` = mean |G(x_a, b) - x_b|, next to the copy baseline `copy_l1` = mean |x_a - x_b| (what a model
  that changes nothing scores) and their ratio `gt_l1_ratio` (< 1 means the aging is real);
  `aged_age_mae`: the embedded estimator's mean |estimate(G(x_a, b)) - b|, how well the generator
  satisfies its own age judge (low here with a high `gt_l1_ratio` means it fools the judge without
  aging the face).

Images are float32 (N, H, W, 3) in [-1, 1]; ages float32 (N,).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ganjax.evaluation.batching import batched


def ground_truth_pairs(identity: np.ndarray, age: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (src, dst) of the same identity at different ages, in a deterministic order."""
    src, dst = [], []
    for ident in np.unique(identity):
        members = np.flatnonzero(identity == ident)
        for i in members:
            for j in members:
                if age[i] != age[j]:
                    src.append(i)
                    dst.append(j)
    return np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)


def evaluate(
    eval_set: dict[str, np.ndarray],
    *,
    estimate_age: Callable[[np.ndarray], np.ndarray],
    age_faces: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    batch_size: int,
    use_label_as_current_age: bool,
    ground_truth: bool,
) -> dict[str, float]:
    """Runs the metrics above.

    estimate_age(images) -> (B,) estimated ages; age_faces(images, target_ages, current_ages) ->
    (B, H, W, 3) aged images (current_ages is ignored by models that estimate it).
    """
    images, ages = eval_set["image"], eval_set["age"].astype(np.float32)
    estimated = batched(estimate_age, (images,), batch_size)
    metrics = {"age_mae": float(np.mean(np.abs(estimated - ages)))}
    if not ground_truth:
        return metrics

    src, dst = ground_truth_pairs(eval_set["identity"], ages)
    current = ages[src] if use_label_as_current_age else estimated[src]
    aged = batched(age_faces, (images[src], ages[dst], current), batch_size)
    gt_l1 = float(np.mean(np.abs(aged - images[dst])))
    copy_l1 = float(np.mean(np.abs(images[src] - images[dst])))
    aged_age_mae = float(np.mean(np.abs(batched(estimate_age, (aged,), batch_size) - ages[dst])))
    metrics.update(
        gt_l1=gt_l1, copy_l1=copy_l1, gt_l1_ratio=gt_l1 / max(copy_l1, 1e-12), aged_age_mae=aged_age_mae
    )
    return metrics
