"""In-loop evaluation of image-to-image generators: ground-truth errors, the FCN-score analogue, grids.

On the built-in synthetic scenes every test input has its true translation and its layout, so the
outputs G(x) of a generator for the test inputs x with true translations y are scored by
  gt_l1                 mean |G(x) - y| over pixels and channels, images in [-1, 1] (0 = exact)
  copy_l1               mean |x - y|: the score of returning the input unchanged (a reference point)
  pixel_accuracy, mean_class_accuracy, mean_iou
                        `scene_labels.label_accuracy` of G(x), read as photos of the target style, against
                        the layouts (pix2pix's FCN-score analogue; only when the output domain is a photo)
On real image folders there is no ground truth here; the trainers only draw sample grids.

Generators are run as the reference's test.py runs them by default (`train_mode=True`): train mode with a
batch of one, so batch norm uses each test image's own statistics and dropout stays on (pix2pix's
"noise"); `train_mode=False` is the reference's `--eval` (running statistics, no dropout). With
instance norm and no dropout the two are the same.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from PIL import Image, ImageDraw

from ganjax import visualize
from ganjax.evaluation import scene_labels
from ganjax.evaluation.batching import batched

_DROPOUT_STREAM = 0x7E57  # folded into the seed: test-time dropout masks differ from training's


@dataclasses.dataclass(frozen=True)
class TestSet:
    """One translation direction's test data (host numpy, float32 images in [-1, 1], (N, S, S, 3)).

    targets: the true translations (paired data only); labels: uint8 (N, S, S) layouts (synthetic
    scenes only); style: the synthetic-scenes style ("A"/"B") of the outputs, None if not a photo.
    """

    name: str
    inputs: np.ndarray
    targets: np.ndarray | None = None
    labels: np.ndarray | None = None
    style: str | None = None


def make_translate_fn(generator: nn.Module, *, train_mode: bool, seed: int):
    """A jitted `translate(variables, images, indices) -> images`.

    variables: {"params": ..., "batch_stats": ...} of `generator`; images float32 (B, S, S, C) in [-1, 1];
    indices int32 (B,) test-set indices, which seed each image's dropout mask (so a test image gets the
    same output however the set is batched). Returns float32 (B, S, S, output_nc).
    """

    @jax.jit
    def translate(variables, images, indices):
        if not train_mode:
            return generator.apply(variables, images, train=False)
        base = jax.random.fold_in(jax.random.key(seed), _DROPOUT_STREAM)

        def one(image, index):
            out, _ = generator.apply(
                variables,
                image[None],
                train=True,
                mutable=["batch_stats"],  # the updated running statistics are dropped
                rngs={"dropout": jax.random.fold_in(base, index)},
            )
            return out[0]

        return jax.vmap(one)(images, indices)

    return translate


def scores(outputs: np.ndarray, test: TestSet) -> dict[str, float]:
    """The metrics of the module docstring for outputs (N, S, S, 3) of `test.inputs`; {} without targets."""
    if test.targets is None:
        return {}
    outputs = np.asarray(outputs, np.float32)
    metrics = {
        "gt_l1": float(np.mean(np.abs(outputs - test.targets))),
        "copy_l1": float(np.mean(np.abs(test.inputs - test.targets))),
    }
    if test.labels is not None and test.style is not None:
        metrics.update(scene_labels.label_accuracy(outputs, test.labels, test.style))
    return metrics


def translation_grid(columns: Sequence[np.ndarray], names: Sequence[str]) -> np.ndarray:
    """A picture with one row per test image and one column per entry of `columns` (e.g. input, output,
    target), each (R, S, S, 3) float in [-1, 1]; `names` label the columns in a header. Returns uint8."""
    rows = visualize.image_grid(visualize.to_uint8(np.stack(columns, axis=1)))
    size, padding, header = columns[0].shape[2], 2, 14
    canvas = Image.new("RGB", (rows.shape[1], rows.shape[0] + header), (255, 255, 255))
    canvas.paste(Image.fromarray(rows), (0, header))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(names):
        draw.text((padding + i * (size + padding) + 2, 1), name, fill=(0, 0, 0))
    return np.asarray(canvas)


def translate_all(translate: Callable, test: TestSet, batch_size: int) -> np.ndarray:
    """Host helper: `translate(images, indices)` over all of `test.inputs` in fixed-size batches."""
    return batched(translate, (test.inputs, np.arange(len(test.inputs), dtype=np.int32)), batch_size)
