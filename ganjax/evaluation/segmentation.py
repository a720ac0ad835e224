"""FCN-score of label -> photo translations with a pluggable segmentation model.

pix2pix scores generated photos by segmenting them with a fixed network and comparing its labels with
the input layout: pixel accuracy, mean class accuracy and mean class IoU (`scene_labels.
scores_from_confusion`; pixels labelled `ignore_index` do not count, predictions outside
[0, num_classes) count as errors).

A *segmenter* is any object with
    num_classes: int
    __call__(photos float32 (N, H, W, 3) in [-1, 1]) -> int (N, H, W) class ids
Three kinds are provided, chosen by `load_segmenter(spec, style)` (config.eval.segmenter):
  ""                 the built-in classifier of the synthetic scenes (`scene_labels`), for the output style;
                     real data has no built-in segmenter (FCN-score is then skipped)
  PATH               a `jax.export` file written by `export_segmenter` (any JAX function, e.g. a Flax FCN
                     with its parameters baked in): float32 (b, H, W, 3) in [-1, 1] -> logits (b, H', W', K)
                     or class ids (b, H', W'); its sidecar PATH.json gives num_classes and the output kind.
                     Photos of another size are resized (bilinear) to H x W, and the labels back to the
                     photos' size (nearest)
  "module:function"  an importable factory; `module.function()` returns a segmenter (e.g. one that loads
                     a Flax FCN definition and its .npz parameters)

Real Cityscapes: pix2pix's FCN-8s is a Caffe model (not loadable here); GAN Compression's DRN-D-105
(drn-d-105_ms_cityscapes.pth) is a PyTorch model: `python -m ganjax.interop.drn_weights --weights PTH
--output FILE` converts it to Flax (`ganjax.models.drn`) and exports it; pass config.eval.segmenter=FILE
plus config.eval.segmentation_labels: a folder with one label map per test image (PNG of train ids
0..18, 255 = ignore; gtFine *_labelTrainIds.png), named so that sorting pairs them with the test images'
sorted file names. `scene_segmenter_function` is the
built-in classifier written as such a JAX function: it is exported and used through this interface in
the tests.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ganjax.data import synthetic_scenes
from ganjax.evaluation import scene_labels

IGNORE_INDEX = 255  # Cityscapes' train-id "ignore" (and the usual convention)
SIDECAR_FORMAT = "ganjax.segmenter/1"
OUTPUT_KINDS = ("logits", "labels")
LABEL_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")


# ---- Scores ------------------------------------------------------------------------------------------


def segmentation_scores(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> dict[str, float]:
    """{"pixel_accuracy", "mean_class_accuracy", "mean_iou"} of int (N, H, W) predictions against
    (N, H, W) labels; labels equal to `ignore_index` are left out, predictions outside [0, num_classes)
    are wrong."""
    labels, predictions = np.asarray(labels).astype(np.int64), np.asarray(predictions).astype(np.int64)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} do not match")
    keep = labels != ignore_index
    bad = (labels[keep] < 0) | (labels[keep] >= num_classes)
    if np.any(bad):
        raise ValueError(
            f"labels hold ids outside [0, {num_classes}) other than {ignore_index}, e.g. "
            f"{int(labels[keep][bad][0])}; use train ids (Cityscapes: *_labelTrainIds.png)."
        )
    predicted = np.where((predictions >= 0) & (predictions < num_classes), predictions, num_classes)
    confusion = scene_labels.confusion_matrix(labels[keep], predicted[keep], num_classes)
    return scene_labels.scores_from_confusion(confusion)


def score_photos(photos: np.ndarray, labels: np.ndarray, segmenter) -> dict[str, float]:
    """Segments (N, H, W, 3) float [-1, 1] photos and scores them against (N, H, W) labels."""
    return segmentation_scores(labels, segmenter(photos), segmenter.num_classes)


# ---- Segmenters ----------------------------------------------------------------------------------------


class BuiltinSceneSegmenter:
    """The synthetic scenes' fixed per-pixel classifier (`scene_labels`) for photos of `style`; pixels that
    look like no class get the id num_classes (an error)."""

    def __init__(self, style: str):
        if style not in synthetic_scenes.STYLES:
            raise ValueError(f"style must be one of {synthetic_scenes.STYLES}, got {style!r}")
        self.style = style
        self.num_classes = synthetic_scenes.NUM_CLASSES

    def __call__(self, photos: np.ndarray) -> np.ndarray:
        return scene_labels.predict_labels(photos, self.style)


def _resize_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of int (N, h, w) label maps (PIL's, as the datasets resize layouts)."""
    if labels.shape[1:] == (height, width):
        return labels
    out = np.empty((len(labels), height, width), np.int32)
    for i, lab in enumerate(labels):
        image = Image.fromarray(lab.astype(np.int32), mode="I")
        out[i] = np.asarray(image.resize((width, height), Image.Resampling.NEAREST))
    return out


class ExportedSegmenter:
    """A segmenter from a `jax.export` file and its sidecar (see `export_segmenter`)."""

    def __init__(self, path: str, batch_size: int = 8):
        from ganjax import export  # its loader checks input shapes, dtypes and ranges

        self.path = os.path.abspath(os.path.expanduser(path))
        model = export.load_exported(self.path)
        meta = model.metadata
        if meta.get("format") != SIDECAR_FORMAT:
            raise ValueError(
                f"{self.path}.json is not a segmenter sidecar (format {meta.get('format')!r}, expected "
                f"{SIDECAR_FORMAT!r}); write the file with ganjax.evaluation.segmentation.export_segmenter."
            )
        if meta.get("output") not in OUTPUT_KINDS:
            raise ValueError(
                f"{self.path}.json: output must be one of {OUTPUT_KINDS}, got {meta.get('output')!r}"
            )
        self.model, self.output = model, meta["output"]
        self.num_classes = int(meta["num_classes"])
        self.height, self.width = (int(d) for d in meta["inputs"][0]["shape"][1:3])
        self.batch_size = batch_size

    def __call__(self, photos: np.ndarray) -> np.ndarray:
        photos = np.asarray(photos, np.float32)
        n, h, w = photos.shape[:3]
        parts = []
        for start in range(0, n, self.batch_size):
            batch = photos[start : start + self.batch_size]
            if (h, w) != (self.height, self.width):
                batch = np.asarray(
                    jax.image.resize(batch, (len(batch), self.height, self.width, 3), "linear"), np.float32
                )
                batch = np.clip(batch, -1.0, 1.0)  # the resize's overshoot must not fail the range check
            out = np.asarray(self.model(batch))
            parts.append(out.argmax(-1) if self.output == "logits" else out)
        return _resize_labels(np.concatenate(parts).astype(np.int32), h, w)


def load_segmenter(spec: str, style: str | None = None):
    """The segmenter config.eval.segmenter names (see the module docstring); None when `spec` is empty
    and the outputs are not synthetic-scene photos (`style` None)."""
    spec = (spec or "").strip()
    if not spec:
        return BuiltinSceneSegmenter(style) if style is not None else None
    path = os.path.expanduser(spec)
    if os.path.isfile(path):
        return ExportedSegmenter(path)
    if ":" in spec and os.path.sep not in spec.split(":", 1)[0]:
        module_name, attr = spec.split(":", 1)
        factory = getattr(importlib.import_module(module_name), attr)
        segmenter = factory()
        if not callable(segmenter) or not hasattr(segmenter, "num_classes"):
            raise TypeError(
                f"config.eval.segmenter = {spec!r}: {attr}() must return a callable with num_classes."
            )
        return segmenter
    raise FileNotFoundError(
        f"config.eval.segmenter = {spec!r} is neither a file (a jax.export segmenter, see "
        "ganjax.evaluation.segmentation.export_segmenter) nor an importable 'module:function'."
    )


def export_segmenter(
    fn: Callable[[jax.Array], jax.Array],
    path: str,
    *,
    height: int,
    width: int,
    num_classes: int,
    output: str,
    description: str = "",
    platforms: tuple[str, ...] = ("cpu", "cuda", "tpu"),
) -> dict:
    """Writes `fn` (float32 (b, height, width, 3) in [-1, 1] -> logits (b, H', W', num_classes) or int
    class ids (b, H', W'), `output` "logits" / "labels") as a jax.export file with a symbolic batch, and its
    sidecar `path`.json. Returns the sidecar dict."""
    if output not in OUTPUT_KINDS:
        raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")
    (b,) = jax.export.symbolic_shape("b")
    spec = jax.ShapeDtypeStruct((b, height, width, 3), jnp.float32)
    exported = jax.export.export(jax.jit(fn), platforms=platforms)(spec)
    meta = {
        "format": SIDECAR_FORMAT,
        "function": "segment",
        "description": description,
        "inputs": [
            {"name": "images", "shape": ["b", height, width, 3], "dtype": "float32", "range": [-1.0, 1.0]}
        ],
        "output": output,
        "num_classes": int(num_classes),
        "platforms": list(exported.platforms),
        "jax_version": jax.__version__,
    }
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for target, data in (
        (path, bytes(exported.serialize())),
        (path + ".json", json.dumps(meta, indent=2).encode()),
    ):
        with open(target + ".tmp", "wb") as f:
            f.write(data)
        os.replace(target + ".tmp", target)
    return meta


# ---- The built-in classifier as a JAX function (an example of an exportable segmenter) ---------------


def _box_mean(x: jax.Array, radius: int) -> jax.Array:
    k = 2 * radius + 1
    pad = jnp.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="reflect")
    total = jax.lax.reduce_window(pad, 0.0, jax.lax.add, (1, k, k, 1), (1, 1, 1, 1), "VALID")
    return total / (k * k)


def scene_segmenter_function(style: str, size: int) -> Callable[[jax.Array], jax.Array]:
    """`scene_labels.classifier(style, size)` as a pure JAX function: float32 (b, size, size, 3) in [-1, 1]
    -> int32 (b, size, size) class ids, num_classes (scene_labels.UNKNOWN) for rejected pixels. The same
    features and Gaussians as the NumPy classifier, in float32 (a pixel on a decision boundary may flip)."""
    clf = scene_labels.classifier(style, size)
    means = jnp.asarray(clf.means, jnp.float32)  # (K, F)
    precisions = jnp.asarray(clf.precisions, jnp.float32)  # (K, F, F)
    log_dets = jnp.asarray(clf.log_dets, jnp.float32)  # (K,)
    luma_weights = jnp.asarray(scene_labels._LUMA)

    def segment(images: jax.Array) -> jax.Array:
        x = jnp.clip((images.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
        luma = (x @ luma_weights)[..., None]
        feats = [x]
        for radius in (1, 4):
            luma_mean = _box_mean(luma, radius)
            luma_var = jnp.maximum(_box_mean(luma * luma, radius) - luma_mean**2, 0.0)
            feats += [_box_mean(x, radius), jnp.sqrt(luma_var + 1e-6)]
        d = jnp.concatenate(feats, axis=-1)[..., None, :] - means  # (b, S, S, K, F)
        maha = jnp.einsum("...kf,kfg,...kg->...k", d, precisions, d)
        pred = jnp.argmax(-0.5 * (maha + log_dets), axis=-1)
        best = jnp.take_along_axis(maha, pred[..., None], axis=-1)[..., 0]
        return jnp.where(best > scene_labels.REJECT_THRESHOLD, scene_labels.UNKNOWN, pred).astype(jnp.int32)

    return segment


# ---- Label maps of real test images --------------------------------------------------------------------


def read_label_folder(folder: str, count: int, size: int) -> np.ndarray:
    """uint8 (count, size, size) label maps: the first `count` label images of `folder` in sorted file-name
    order (matching the test images' order), nearest-resized to size x size."""
    folder = os.path.abspath(os.path.expanduser(folder))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"config.eval.segmentation_labels = {folder} is not a folder.")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(LABEL_EXTENSIONS))
    if len(names) < count:
        raise ValueError(f"{folder} has {len(names)} label images but the test set has {count} images.")
    labels = np.zeros((count, size, size), np.uint8)
    for i, name in enumerate(names[:count]):
        with Image.open(os.path.join(folder, name)) as image:
            if image.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"{name}: mode {image.mode}; label maps must be single-channel class ids.")
            labels[i] = np.asarray(image.resize((size, size), Image.Resampling.NEAREST))
    return labels
