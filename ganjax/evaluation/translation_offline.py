"""`--mode eval` metrics of the translation trainers (pix2pix, CycleGAN, their SRPKD students) beyond the
in-loop ones (gt_l1, copy_l1 and the built-in FCN-score analogue of `translation_in_loop`).

Per direction ("AtoB" = the run's forward generator, "BtoA" = CycleGAN's backward one), on *all* the
images of the run's test split (the in-loop metrics use the first config.eval.num_examples):
  fid, kid_mean, kid_std
      the test-vs-test protocol (Co-Evolution, SRPKD; `fid.protocol_test_vs_test`'s computation): the real
      test images of the output domain vs the translations of the input domain's test images, both as
      8-bit images, through pytorch-fid's Inception. Needs config.eval.inception_weights (the .pth or its
      converted .npz, see docs/evaluation.md; it cannot be downloaded at run time): empty = skipped, with
      a note. The real images' features are computed once per process, not per checkpoint.
  fcn_pixel_accuracy, fcn_mean_class_accuracy, fcn_mean_iou
      config.eval.segmenter (`segmentation.load_segmenter`: a jax.export file or "module:function") on the
      translations, against the synthetic scenes' layouts, or, on real data, the label maps in
      config.eval.segmentation_labels (forward direction only). Empty = not computed here; on the synthetic
      scenes the built-in classifier's scores are the in-loop pixel_accuracy, mean_class_accuracy, mean_iou.

Images are float32 (N, S, S, 3) in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from absl import logging

from ganjax.data import translation_pipeline
from ganjax.evaluation import fid, segmentation
from ganjax.evaluation.translation_in_loop import TestSet
from ganjax.models import inception
from ganjax.trainers import translation_common as tc

FORWARD, BACKWARD = "AtoB", "BtoA"  # the names of translation_common.load_test_sets' TestSets


def load_inception_variables(path: str) -> dict:
    """The FID Inception's variables from `path` (pytorch-fid's .pth or its converted .npz).

    Test-only hook: tests replace this function (monkeypatch) to use random variables, because the real
    weights cannot be downloaded here. Numbers from random variables are not FIDs.
    """
    from ganjax.interop import inception_weights

    return inception_weights.load_variables(path, None, inception.FIDInceptionV3())


class TranslationExtras:
    """Builds the Inception extractor, the segmenter and the full test sets once; `metrics` scores one
    checkpoint's generators. `notes` says what is skipped and why."""

    def __init__(self, config, mesh, batch_size: int, directions: tuple[str, ...]):
        self.notes: list[str] = []
        self.directions = directions
        e, data = config.eval, config.data
        weights, spec = str(e.get("inception_weights", "")), str(e.get("segmenter", ""))
        self.features = None
        if weights:
            self.features = fid.InceptionFeatures(load_inception_variables(weights), mesh, batch_size)
        else:
            self.notes.append(
                "FID/KID skipped: config.eval.inception_weights is empty (pytorch-fid's "
                f"{inception.FID_WEIGHTS_FILENAME}, see docs/evaluation.md)."
            )
        self.tests: dict[str, TestSet] = {}
        self.reals: dict[str, np.ndarray] = {}
        self._real_stats: dict[str, fid.Statistics] = {}
        self.segmenter = None
        self.labels: dict[str, np.ndarray] = {}
        if not weights and not spec:
            return

        raw = translation_pipeline.load_test_set(data, max_examples=None)
        synthetic = data.name == "synthetic_scenes"
        labels = raw.get("labels") if synthetic else None
        styles = {FORWARD: translation_pipeline.target_style(data), BACKWARD: tc.opposite_style(data)}
        # The output domain's real test images: the true translations where paired, else the other domain.
        for name, inputs, reals in ((FORWARD, raw["a"], raw["b"]), (BACKWARD, raw["b"], raw["a"])):
            if name in directions:
                self.tests[name] = TestSet(name, inputs, labels=labels, style=styles[name])
                self.reals[name] = reals
        if spec:
            self.segmenter = segmentation.load_segmenter(spec)
            for name, test in self.tests.items():
                if synthetic and test.style is not None:
                    self.labels[name] = labels
                elif not synthetic and name == FORWARD and e.get("segmentation_labels", ""):
                    self.labels[name] = segmentation.read_label_folder(
                        e.segmentation_labels, len(test.inputs), test.inputs.shape[1]
                    )
                else:
                    if synthetic:
                        why = "its outputs are not photos"
                    elif name != FORWARD:
                        why = "label maps apply to the forward direction only"
                    else:
                        why = "config.eval.segmentation_labels is empty"
                    self.notes.append(f"{name}: FCN-score with config.eval.segmenter skipped: {why}.")

    def _real_statistics(self, name: str) -> fid.Statistics:
        if name not in self._real_stats:
            # Test-vs-test: the real images as their 8-bit files ("round"), with features for KID.
            feats = self.features(fid.to_uint8(self.reals[name], "round"), name=f"real {name}")
            self._real_stats[name] = fid.statistics(feats, keep_features=True)
        return self._real_stats[name]

    def metrics(self, translate: Callable[[TestSet], np.ndarray]) -> dict[str, dict[str, float]]:
        """direction -> metrics, for `translate(test) -> outputs (N, S, S, 3)` of one checkpoint."""
        out: dict[str, dict[str, float]] = {}
        for name, test in self.tests.items():
            outputs = translate(test)
            scores: dict[str, float] = {}
            if self.features is not None:
                result = fid.protocol_gan_compression(self.features, outputs, self._real_statistics(name))
                scores.update(fid=result["fid"], kid_mean=result["kid_mean"], kid_std=result["kid_std"])
            if self.segmenter is not None and name in self.labels:
                seg = segmentation.score_photos(outputs, self.labels[name], self.segmenter)
                scores.update({f"fcn_{k}": v for k, v in seg.items()})
            logging.info("%s: %s", name, scores)
            out[name] = scores
        return out
