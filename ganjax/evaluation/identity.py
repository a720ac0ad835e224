"""Identity preservation of aged faces with dlib's 128-d face-recognition ResNet.

For every (input face, aged face) pair, both images go through the same pipeline as
`dlib.face_recognition_model_v1.compute_face_descriptor(image, landmarks)`: dlib's HOG face detector
(upsampled `upsample` times; the highest-scoring face is used), the 5-point landmark model, the
150 x 150 face chip with padding 0.25 (`ganjax.age.FaceAligner`), and the ResNet's descriptor
(float64 (128,), norm ~1). Then
  cosine            mean cosine similarity of the two descriptors (1 = same direction)
  distance          mean Euclidean distance (0 = identical); dlib calls a pair the same person below 0.6
  verification_rate share of scored pairs with distance < VERIFICATION_THRESHOLD (dlib's 0.6)
  verified_of_all   verified pairs / all pairs: a face the detector cannot find counts as not verified
  pairs, pairs_scored, inputs_without_face, outputs_without_face
                    counts: faces that are not found are reported, never silently dropped
over the pairs in which both faces are found. Images: (N, H, W, 3) uint8, or float in [-1, 1].

Needs the [faces] extra (dlib-bin, face-recognition-models: nothing is downloaded). dlib's models were
trained on real photos; on the built-in synthetic faces they do not apply (the aging evaluation reports
the ground-truth L1 there instead).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from ganjax import age as face_tools

VERIFICATION_THRESHOLD = 0.6  # dlib's: distances below it are "the same person" (99.38% on LFW)
CHIP_SIZE = 150  # the face chip the recognition ResNet takes
CHIP_PADDING = 0.25  # compute_face_descriptor's padding around the landmarks' box
RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) float in [-1, 1] -> uint8 (rounded); uint8 unchanged."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    return np.clip(np.rint((images.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


class FaceEmbedder:
    """Image -> dlib face descriptor (float64 (128,)) of its highest-scoring face, or None if none is found.

    upsample: detector upsampling (1 finds faces down to ~40 px, 2 down to ~20 px; each costs 4x time);
    min_score: smallest HOG score accepted as a face.
    """

    def __init__(self, *, upsample: int = 1, min_score: float = 0.0):
        import dlib  # FaceAligner below has already reported a missing dlib with install instructions

        self._aligner = face_tools.FaceAligner(
            CHIP_SIZE, padding=CHIP_PADDING, upsample=upsample, min_score=min_score
        )
        self._model = dlib.face_recognition_model_v1(
            os.path.join(face_tools.face_models_dir(), RECOGNITION_MODEL)
        )

    def __call__(self, image: np.ndarray) -> np.ndarray | None:
        """uint8 (H, W, 3) RGB image -> descriptor, or None."""
        faces = self._aligner(np.ascontiguousarray(image))
        if not faces:
            return None
        best = max(faces, key=lambda f: f.score)
        return np.asarray(self._model.compute_face_descriptor(best.chip), np.float64)

    def embed_all(self, images: np.ndarray) -> list[np.ndarray | None]:
        """(N, H, W, 3) uint8 or float [-1, 1] -> N descriptors (None where no face is found)."""
        return [self(image) for image in to_uint8(images)]


def pair_scores(
    inputs: Sequence[np.ndarray | None], outputs: Sequence[np.ndarray | None]
) -> dict[str, float]:
    """The metrics of the module docstring from two equally long lists of descriptors (None = no face).

    Averages are NaN when no pair has both faces; the counts say why.
    """
    if len(inputs) != len(outputs):
        raise ValueError(f"{len(inputs)} input descriptors but {len(outputs)} output descriptors")
    both = [(a, b) for a, b in zip(inputs, outputs, strict=True) if a is not None and b is not None]
    n = len(inputs)
    counts = {
        "pairs": float(n),
        "pairs_scored": float(len(both)),
        "inputs_without_face": float(sum(a is None for a in inputs)),
        "outputs_without_face": float(sum(b is None for b in outputs)),
    }
    if not both:
        nan = float("nan")
        return {"cosine": nan, "distance": nan, "verification_rate": nan, "verified_of_all": 0.0, **counts}
    a, b = np.stack([p[0] for p in both]), np.stack([p[1] for p in both])
    distance = np.linalg.norm(a - b, axis=1)
    cosine = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    verified = distance < VERIFICATION_THRESHOLD
    return {
        "cosine": float(np.mean(cosine)),
        "distance": float(np.mean(distance)),
        "verification_rate": float(np.mean(verified)),
        "verified_of_all": float(np.sum(verified) / max(n, 1)),
        **counts,
    }


def identity_scores(inputs: np.ndarray, outputs: np.ndarray, embedder: FaceEmbedder) -> dict[str, float]:
    """Scores (N, H, W, 3) outputs against their (N, H, W, 3) inputs (see the module docstring)."""
    return pair_scores(embedder.embed_all(inputs), embedder.embed_all(outputs))
