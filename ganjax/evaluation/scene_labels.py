"""A fixed per-pixel classifier of synthetic-scene photos: the FCN-score analogue on built-in data.

pix2pix scores generated Cityscapes photos by running a pretrained FCN on them and comparing its
per-pixel labels with the input layout (pixel accuracy, mean class accuracy, mean IoU). On the
synthetic scenes (`ganjax.data.synthetic_scenes`) every class has its own colour statistics and
texture, so a much simpler fixed classifier does the FCN's job:

- features per pixel (11): the RGB value, the RGB means over 3x3 and 9x9 windows, and the standard
  deviation of the luminance over 3x3 and 9x9 windows (colour + texture);
- one Gaussian per class (quadratic discriminant analysis, equal priors), fit in closed form on
  renders of fixed seeds (disjoint from the dataset's seeds) at the resolution being scored, one
  classifier per style. Nothing is cached on disk; a fit takes about a second and is kept in memory.

Unlike an FCN, the classifier can also say "this pixel looks like no class": pixels far from every
class Gaussian (squared Mahalanobis distance > REJECT_THRESHOLD) count as errors. Without that, a
generator that merely copies the colourised label map would already get ~0.7 pixel accuracy; with
it, such a copy, the other style's photo and noise all score < 0.2, while the renderer's own photos
score ~0.98-0.99 (64-256 px).
"""

from __future__ import annotations

import functools

import numpy as np

from ganjax.data import synthetic_scenes

FIT_SEED_OFFSET = 20_000_000  # fit scenes: seeds 20_000_000 + k, disjoint from train and test scenes
FIT_SCENES = 48
_RIDGE = 1e-4  # added to each class covariance (features are in [0, 1] units)
NUM_FEATURES = 11
UNKNOWN = synthetic_scenes.NUM_CLASSES  # the predicted id of pixels that look like no class
# Squared Mahalanobis distance (11 features) beyond which a pixel is "unknown". Real renders stay
# within it (~99% of pixels); flat label maps, the other style's textures and noise mostly do not.
REJECT_THRESHOLD = 60.0
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _box_mean(x: np.ndarray, radius: int) -> np.ndarray:
    """Mean over a (2r+1)^2 window of (N, H, W, C), reflect-padded; via cumulative sums."""
    k = 2 * radius + 1
    pad = np.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="reflect")
    c = np.cumsum(pad, axis=1, dtype=np.float64)
    c = np.concatenate([np.zeros_like(c[:, :1]), c], axis=1)
    rows = c[:, k:] - c[:, :-k]
    c = np.cumsum(rows, axis=2)
    c = np.concatenate([np.zeros_like(c[:, :, :1]), c], axis=2)
    return ((c[:, :, k:] - c[:, :, :-k]) / (k * k)).astype(np.float32)


def pixel_features(photos: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) or float in [-1, 1] -> float32 (N, S, S, 11) per-pixel features."""
    x = _to_unit(photos)
    luma = (x @ _LUMA)[..., None]
    feats = [x]
    for radius in (1, 4):
        mean = _box_mean(x, radius)
        luma_mean = _box_mean(luma, radius)
        luma_var = np.maximum(_box_mean(luma * luma, radius) - luma_mean**2, 0.0)
        feats += [mean, np.sqrt(luma_var + 1e-6)]
    return np.concatenate(feats, axis=-1)


def _to_unit(photos: np.ndarray) -> np.ndarray:
    photos = np.asarray(photos)
    if photos.ndim != 4 or photos.shape[-1] != 3:
        raise ValueError(f"photos must be (N, S, S, 3), got {photos.shape}")
    if photos.dtype == np.uint8:
        return photos.astype(np.float32) / 255.0
    return np.clip((photos.astype(np.float32) + 1.0) / 2.0, 0.0, 1.0)


class SceneLabelClassifier:
    """Per-class Gaussians over `pixel_features`; `predict` gives the most likely class per pixel."""

    def __init__(self, means: np.ndarray, covariances: np.ndarray):
        self.means = means  # (K, F)
        self.precisions = np.linalg.inv(covariances)  # (K, F, F)
        self.log_dets = np.linalg.slogdet(covariances)[1]  # (K,)

    @classmethod
    def fit(
        cls, photos: np.ndarray, labels: np.ndarray, pixels_per_image: int = 4096
    ) -> SceneLabelClassifier:
        """Closed-form fit on uint8 photos (N, S, S, 3) and their class ids (N, S, S).

        Uses a fixed subsample of `pixels_per_image` pixels of each photo (bounded memory at 256 px).
        """
        rng = np.random.default_rng(0)
        feats, flat = [], []
        for photo, lab in zip(photos, labels, strict=True):
            f = pixel_features(photo[None]).reshape(-1, NUM_FEATURES)
            keep = rng.permutation(len(f))[:pixels_per_image]
            feats.append(f[keep].astype(np.float64))
            flat.append(np.asarray(lab).reshape(-1)[keep])
        feats, flat = np.concatenate(feats), np.concatenate(flat)
        means, covs = [], []
        for k in range(synthetic_scenes.NUM_CLASSES):
            f = feats[flat == k]
            if len(f) < 50:
                raise ValueError(f"Too few pixels of class {synthetic_scenes.SCENE_CLASSES[k]} to fit.")
            means.append(f.mean(axis=0))
            covs.append(np.cov(f, rowvar=False) + _RIDGE * np.eye(NUM_FEATURES))
        return cls(np.stack(means), np.stack(covs))

    def log_likelihoods(self, photos: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) photos -> float32 (N, S, S, K) Gaussian log-likelihoods (up to a constant)."""
        feats = pixel_features(photos)
        out = np.empty(feats.shape[:-1] + (len(self.means),), np.float32)
        for k, (mu, prec, log_det) in enumerate(zip(self.means, self.precisions, self.log_dets, strict=True)):
            d = feats - mu.astype(np.float32)
            maha = ((d @ prec.astype(np.float32)) * d).sum(-1)
            out[..., k] = -0.5 * (maha + log_det)
        return out

    def predict(self, photos: np.ndarray, reject_threshold: float | None = REJECT_THRESHOLD) -> np.ndarray:
        """(N, S, S, 3) uint8 or float [-1, 1] photos -> uint8 (N, S, S) class ids.

        With a `reject_threshold`, pixels whose squared Mahalanobis distance to the most likely class
        exceeds it look like no class at all and get the id UNKNOWN (= NUM_CLASSES).
        """
        photos = np.asarray(photos)
        batch_size = max(1, 2**18 // max(1, photos.shape[1] * photos.shape[2]))  # ~ 2^18 pixels at a time
        parts = []
        for i in range(0, len(photos), batch_size):
            loglik = self.log_likelihoods(photos[i : i + batch_size])
            pred = loglik.argmax(-1)
            if reject_threshold is not None:
                best = np.take_along_axis(loglik, pred[..., None], -1)[..., 0]
                maha = -2.0 * best - self.log_dets[pred]
                pred = np.where(maha > reject_threshold, UNKNOWN, pred)
            parts.append(pred.astype(np.uint8))
        return np.concatenate(parts) if parts else np.zeros(photos.shape[:3], np.uint8)


@functools.lru_cache(maxsize=8)
def classifier(style: str, size: int) -> SceneLabelClassifier:
    """The fixed classifier for photos of `style` ("A"/"B") at `size` px: fit on FIT_SCENES renders."""
    if style not in synthetic_scenes.STYLES:
        raise ValueError(f"style must be one of {synthetic_scenes.STYLES}, got {style!r}")
    labels = np.stack([synthetic_scenes.render_layout(FIT_SEED_OFFSET + k, size) for k in range(FIT_SCENES)])
    photos = np.stack(
        [synthetic_scenes.render_photo(lab, FIT_SEED_OFFSET + k, style) for k, lab in enumerate(labels)]
    )
    return SceneLabelClassifier.fit(photos, labels)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 (K + 1, K + 1) counts, rows true classes, columns predictions; index K is "unknown"."""
    k = num_classes + 1
    truth, pred = np.asarray(labels, np.int64).reshape(-1), np.asarray(predictions, np.int64).reshape(-1)
    return np.bincount(truth * k + pred, minlength=k * k).reshape(k, k)


def scores_from_confusion(confusion: np.ndarray) -> dict[str, float]:
    """pix2pix's FCN-score metrics from a `confusion_matrix`; "unknown" predictions count as errors.

    Classes absent from both labels and predictions are left out of the means.
    """
    confusion = confusion.astype(np.float64)
    k = confusion.shape[0] - 1
    diag = np.diag(confusion)[:k]
    true_count, pred_count = confusion[:k].sum(axis=1), confusion[:, :k].sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        class_acc = diag / true_count
        iou = diag / (true_count + pred_count - diag)
    return {
        "pixel_accuracy": float(diag.sum() / max(true_count.sum(), 1.0)),
        "mean_class_accuracy": float(np.nanmean(class_acc)) if np.any(true_count > 0) else float("nan"),
        "mean_iou": float(np.nanmean(iou)) if np.any(true_count + pred_count > 0) else float("nan"),
    }


def predict_labels(
    photos: np.ndarray, style: str, reject_threshold: float | None = REJECT_THRESHOLD
) -> np.ndarray:
    """(N, S, S, 3) uint8 or float [-1, 1] photos of `style` -> uint8 (N, S, S) class ids (or UNKNOWN)."""
    photos = np.asarray(photos)
    return classifier(style, photos.shape[1]).predict(photos, reject_threshold)


def label_accuracy(
    photos: np.ndarray,
    labels: np.ndarray,
    style: str = "A",
    reject_threshold: float | None = REJECT_THRESHOLD,
) -> dict[str, float]:
    """Scores photos (N, S, S, 3; uint8 or float in [-1, 1]) of `style` against layouts (N, S, S).

    Returns {"pixel_accuracy", "mean_class_accuracy", "mean_iou"} (floats in [0, 1]). Pixels that look
    like no class (see `SceneLabelClassifier.predict`) count as wrong; `reject_threshold=None` gives
    the plain argmax labelling of an FCN.
    """
    photos, labels = np.asarray(photos), np.asarray(labels)
    if photos.shape[:3] != labels.shape:
        raise ValueError(f"photos {photos.shape} and labels {labels.shape} do not match")
    predictions = predict_labels(photos, style, reject_threshold)
    return scores_from_confusion(confusion_matrix(labels, predictions, synthetic_scenes.NUM_CLASSES))
