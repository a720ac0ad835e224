"""FID and KID with the FID Inception-v3 in JAX, reproducing pytorch-fid / torch-fidelity numbers.

Features: `InceptionFeatures` runs `ganjax.models.inception.FIDInceptionV3` (pytorch-fid's network and
weights, see `ganjax.interop.inception_weights`) jitted, with each fixed-size batch split over the
mesh's "data" axis; images are (N, H, W, 3) uint8 in [0, 255] or float in [-1, 1], features (N, 2048)
float32. Statistics are float64: mu (2048,) = mean, sigma (2048, 2048) = `np.cov(rowvar=False)` (ddof 1),
saved as .npz with keys `mu` and `sigma`, the format pytorch-fid and GAN Compression read and write.

FID = |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), all in float64. The trace
of the matrix square root is computed from the symmetric matrix sigma1^(1/2) sigma2 sigma1^(1/2), which
has the same eigenvalues as sigma1 sigma2, by symmetric eigendecompositions: no complex parts, no
eps fallback, and finite also when N < 2048 makes both covariances singular (pytorch-fid's
`scipy.linalg.sqrtm` then needs its eps offset). Where scipy succeeds the two agree to ~1e-8 (relative).

KID (Binkowski et al. 2018) = the unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged over
`num_subsets` random subsets of `subset_size` features of each set, reported as (mean, std) over subsets
as torch-fidelity does (clean-fid reports the mean). The subset size is capped at the smaller set size.

The two evaluation protocols in use for image-to-image GANs:
- `protocol_test_vs_test` (Co-Evolution, SRPKD): the real test images of the target domain vs the generator's
  translations of the source domain's test images, both through pytorch-fid as image files.
- `protocol_gan_compression` (GAN Compression): the translations vs precomputed real statistics of a chosen
  split (`reference_statistics`, or GAN Compression's own `real_stat/*.npz` files, loadable here).
Both first turn float images into the 8-bit images the reference code measures: generated images as
saved by the reference's `tensor2im` ((x + 1) / 2 * 255 in float32, truncated). Real images: the files'
own pixels for test-vs-test (float [-1, 1] images are rounded back), while GAN Compression's
`get_real_stat.py` also truncates the real tensors (which shifts 63 of the 256 levels down by one); use
uint8 images to skip all of this.

Command line (FID/KID of two folders, or of a folder against saved statistics; --out saves --real's
statistics for reuse):
  python -m ganjax.evaluation.fid --weights pt_inception-2015-12-05-6726825d.pth \\
      --real data/horse2zebra/testB --fake runs/h2z/test_AtoB --out stats/horse2zebra_testB.npz
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh
from PIL import Image

from ganjax import sharding
from ganjax.interop import inception_weights
from ganjax.models import inception

# pytorch-fid's IMAGE_EXTENSIONS (compared case-insensitively here); folders are read non-recursively.
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")
DEFAULT_BATCH_SIZE = 50  # pytorch-fid's default; results do not depend on it
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000
# KID computes the full Gram matrices once when they fit in this many bytes (float64) and cost less
# than the per-subset products; otherwise it multiplies each subset's features.
KID_GRAM_BYTES = 2**30
PROTOCOLS = ("test_vs_test", "gan_compression")

ImageSource = np.ndarray | Iterable[np.ndarray]  # (N, H, W, 3) array, or an iterable of such batches


# ----------------------------------------------------------------------------------------------------
# Statistics and the Fréchet distance (float64, host numpy).
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Statistics:
    """Gaussian statistics of a feature set: mu float64 (D,), sigma float64 (D, D).

    features: float32 (N, D), kept only when asked for (KID needs the features, FID only mu/sigma).
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int | None = None
    features: np.ndarray | None = None


def statistics(features: np.ndarray, keep_features: bool = False) -> Statistics:
    """(N, D) features -> mean and covariance in float64, as pytorch-fid's (np.cov with ddof 1)."""
    features = np.asarray(features)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must be (N >= 2, D), got {features.shape}")
    feats64 = features.astype(np.float64)
    return Statistics(
        mu=feats64.mean(axis=0),
        sigma=np.cov(feats64, rowvar=False),
        num_images=len(features),
        features=features.astype(np.float32) if keep_features else None,
    )


def save_statistics(path: str | os.PathLike, stats: Statistics) -> None:
    """Writes an .npz with `mu` and `sigma` (pytorch-fid's format) plus `num_images` and, if kept,
    `features` (extra keys that pytorch-fid ignores)."""
    arrays = {"mu": np.asarray(stats.mu, np.float64), "sigma": np.asarray(stats.sigma, np.float64)}
    if stats.num_images is not None:
        arrays["num_images"] = np.asarray(stats.num_images, np.int64)
    if stats.features is not None:
        arrays["features"] = np.asarray(stats.features, np.float32)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to other suffixes
        np.savez(f, **arrays)


def load_statistics(path: str | os.PathLike) -> Statistics:
    """Reads statistics written by `save_statistics`, pytorch-fid or GAN Compression (`mu`, `sigma`)."""
    path = os.fspath(path)
    with np.load(path) as data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(f"{path} has no {missing[0]!r} array (keys: {data.files}); not FID statistics.")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        num = int(data["num_images"]) if "num_images" in data.files else None
        features = data["features"].astype(np.float32) if "features" in data.files else None
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not (D,) and (D, D).")
    return Statistics(mu, sigma, num, features)


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric PSD square root of a symmetric PSD matrix (float64), via `np.linalg.eigh`.

    Eigenvalues that rounding made slightly negative are set to zero.
    """
    a = np.asarray(matrix, np.float64)
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrtm_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^(1/2)) for symmetric PSD sigma1, sigma2 (float64).

    sigma1 sigma2 is similar to the symmetric PSD matrix s sigma2 s, s = sigma1^(1/2), so its square
    root's eigenvalues are the square roots of that matrix's (real, non-negative) eigenvalues.
    """
    s = sqrtm_psd(sigma1)
    m = s @ np.asarray(sigma2, np.float64) @ s
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64 (see module docstring)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = (
        np.atleast_2d(np.asarray(sigma1, np.float64)),
        np.atleast_2d(np.asarray(sigma2, np.float64)),
    )
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(
            f"shapes do not match: mu1 {mu1.shape}, mu2 {mu2.shape}, "
            f"sigma1 {sigma1.shape}, sigma2 {sigma2.shape}"
        )
    for name, x in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{name} has NaN or Inf entries")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrtm_product(sigma1, sigma2)
    return float(value)


def fid_from_statistics(a: Statistics, b: Statistics) -> float:
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma)


# ----------------------------------------------------------------------------------------------------
# KID: unbiased polynomial-kernel MMD^2 over random subsets (float64, host numpy).
# ----------------------------------------------------------------------------------------------------


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3 for rows of x (n, d) and y (m, d) -> (n, m) float64."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _mmd2_from_kernels(k_xx: np.ndarray, k_yy: np.ndarray, k_xy: np.ndarray) -> float:
    # Unbiased: the within-set means leave out the diagonal (k(x_i, x_i)), the cross term does not.
    m = k_xx.shape[0]
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 estimate of two equally sized samples x, y (m, d) with `polynomial_kernel`."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"x and y need the same number (>= 2) of rows, got {len(x)} and {len(y)}")
    return _mmd2_from_kernels(polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y))


def kid_subset_values(
    features_a: np.ndarray,
    features_b: np.ndarray,
    num_subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
    precompute_gram: bool | None = None,
) -> np.ndarray:
    """float64 (num_subsets,) unbiased MMD^2 of random subsets (drawn without replacement).

    The subset size is min(subset_size, N_a, N_b). precompute_gram: None chooses by cost and memory
    (see KID_GRAM_BYTES); both ways give the same values for the same seed.
    """
    a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {a.shape} and {b.shape}")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {len(a)} and {len(b)}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be positive, got {num_subsets}")
    n = len(a) + len(b)
    if precompute_gram is None:
        precompute_gram = n * n * 8 <= KID_GRAM_BYTES and n * n <= num_subsets * (2 * m) ** 2
    rng = np.random.default_rng(seed)
    if precompute_gram:
        k_aa, k_bb, k_ab = polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b)
    values = np.empty(num_subsets, np.float64)
    for i in range(num_subsets):
        ia = rng.choice(len(a), m, replace=False)
        ib = rng.choice(len(b), m, replace=False)
        if precompute_gram:
            values[i] = _mmd2_from_kernels(k_aa[np.ix_(ia, ia)], k_bb[np.ix_(ib, ib)], k_ab[np.ix_(ia, ib)])
        else:
            values[i] = mmd2_unbiased(a[ia], b[ib])
    return values


def kid(
    features_a: np.ndarray,
    features_b: np.ndarray,
    num_subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance of two feature sets (N, D): (mean, std) of the subsets' MMD^2."""
    values = kid_subset_values(features_a, features_b, num_subsets, subset_size, seed)
    return float(values.mean()), float(values.std())


# ----------------------------------------------------------------------------------------------------
# Feature extraction: jitted, batch-sharded over the mesh, fixed-size batches, progress in the log.
# ----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _compiled_features(model: inception.FIDInceptionV3, mesh: Mesh) -> Callable:
    """One jitted function per (model, mesh), shared by all extractors (compiles once per input shape)."""

    def features(variables, images):
        if images.dtype == jnp.uint8:  # converted on device: 4x less host-to-device traffic
            images = images.astype(jnp.float32) / 127.5 - 1.0
        return model.apply(variables, images)

    # Replicated output: every process gets all features (an all-gather of (B, 2048) floats).
    return jax.jit(
        features,
        in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )


def _fixed_batches(source: ImageSource, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """Re-chunks an array or iterable of batches into (batch_size, ...) batches; the last one is padded
    by repeating its last image (one compiled shape). Yields (batch, number of real images)."""
    if isinstance(source, np.ndarray):
        array = source
        source = (array[i : i + batch_size] for i in range(0, len(array), batch_size))
    buffer, count = [], 0
    for chunk in source:
        chunk = np.asarray(chunk)
        if chunk.ndim != 4 or chunk.shape[-1] != 3:
            raise ValueError(f"image batches must be (B, H, W, 3), got {chunk.shape}")
        buffer.append(chunk)
        count += len(chunk)
        while count >= batch_size:
            joined = np.concatenate(buffer)
            yield joined[:batch_size], batch_size
            buffer, count = [joined[batch_size:]], count - batch_size
    if count:
        joined = np.concatenate(buffer)
        pad = np.repeat(joined[-1:], batch_size - count, axis=0)
        yield np.concatenate([joined, pad]), count


class InceptionFeatures:
    """FID Inception pool3 features of images, batch-parallel over the "data" axis of a mesh.

    variables: from `ganjax.interop.inception_weights.load_variables`. mesh: default all devices on
    "data". batch_size: images per step (rounded up to a multiple of the data-axis size; features do
    not depend on it). Every process must pass the same images (e.g. read from the same folder).
    Calling it on (N, H, W, 3) uint8 [0, 255] / float [-1, 1] images, or an iterable of such batches
    (all of one size), returns float32 (N, 2048).
    """

    def __init__(
        self,
        variables: dict,
        mesh: Mesh | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        model: inception.FIDInceptionV3 | None = None,
        log_every: int = 10,
    ):
        self.mesh = sharding.make_mesh(((sharding.DATA_AXIS, -1),)) if mesh is None else mesh
        self.model = inception.FIDInceptionV3() if model is None else model
        data = sharding.data_parallel_size(self.mesh)
        self.batch_size = -(-batch_size // data) * data
        if self.batch_size != batch_size:
            logging.info(
                "FID features: batch size %d -> %d (a multiple of %d)", batch_size, self.batch_size, data
            )
        self.log_every = log_every
        self._variables = jax.device_put(variables, sharding.replicated(self.mesh))
        self._fn = _compiled_features(self.model, self.mesh)

    def __call__(self, images: ImageSource, total: int | None = None, name: str = "images") -> np.ndarray:
        """total: the number of images, for the progress log (taken from arrays and sized sources)."""
        if total is None:
            try:
                total = len(images)
            except TypeError:  # a generator of batches: the total is unknown
                total = None
        outputs, done, start, pending = [], 0, time.perf_counter(), None
        for step, (batch, valid) in enumerate(_fixed_batches(images, self.batch_size), start=1):
            if batch.dtype != np.uint8:
                batch = batch.astype(np.float32)
            feats = self._fn(self._variables, sharding.put_replicated_batch(batch, self.mesh))
            # Fetch the previous step's features only now: the device works while the host reads on.
            if pending is not None:
                outputs.append(np.asarray(pending[0])[: pending[1]])
            pending = (feats, valid)
            done += valid
            if step % self.log_every == 0:
                rate = done / max(time.perf_counter() - start, 1e-9)
                of = f"/{total}" if total else ""
                logging.info("FID features (%s): %d%s images, %.1f images/s", name, done, of, rate)
        if pending is None:
            raise ValueError(f"no images in {name}")
        outputs.append(np.asarray(pending[0])[: pending[1]])
        logging.info("FID features (%s): %d images in %.1f s", name, done, time.perf_counter() - start)
        return np.concatenate(outputs)


# ----------------------------------------------------------------------------------------------------
# Image folders.
# ----------------------------------------------------------------------------------------------------


def list_images(folder: str | os.PathLike) -> list[str]:
    """Sorted image files directly in `folder` (not recursive), as pytorch-fid lists them."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"image folder {folder} does not exist")
    names = sorted(n for n in os.listdir(folder) if n.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)
    if not names:
        raise ValueError(f"{folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return [os.path.join(folder, n) for n in names]


def _read_rgb(path: str) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))  # as pytorch-fid: greyscale/RGBA/palette -> RGB


class ImageFolder:
    """Iterable of uint8 (B, H, W, 3) batches of a folder's images (decoded by a few threads).

    All images must have one size (the network resizes each batch to 299 x 299; pytorch-fid batches
    them the same way and fails on mixed sizes too).
    """

    def __init__(self, folder: str | os.PathLike, batch_size: int = DEFAULT_BATCH_SIZE, workers: int = 4):
        self.files = list_images(folder)
        self.num_images = len(self.files)
        self.batch_size = batch_size
        self.workers = workers

    def __len__(self) -> int:
        return self.num_images

    def __iter__(self) -> Iterator[np.ndarray]:
        shape = None
        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            for i in range(0, len(self.files), self.batch_size):
                names = self.files[i : i + self.batch_size]
                images = list(pool.map(_read_rgb, names))
                for name, image in zip(names, images, strict=True):
                    shape = image.shape if shape is None else shape
                    if image.shape != shape:
                        raise ValueError(
                            f"{name} is {image.shape[1]}x{image.shape[0]} but earlier images are "
                            f"{shape[1]}x{shape[0]}; resize the folder's images to one size first."
                        )
                yield np.stack(images)


# ----------------------------------------------------------------------------------------------------
# The evaluation protocols.
# ----------------------------------------------------------------------------------------------------


def to_uint8(images: np.ndarray, rounding: str = "truncate") -> np.ndarray:
    """float [-1, 1] (B, H, W, 3) -> the uint8 images the reference code measures; uint8 unchanged.

    "truncate": the reference's `tensor2im`, ((x + 1) / 2 * 255 in float32, clipped, cast), which is
    how generated images are saved. "round": recovers the pixels of images decoded from 8-bit files.
    """
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    scaled = np.clip((images.astype(np.float32) + 1.0) / 2.0 * 255.0, 0.0, 255.0)
    if rounding == "round":
        scaled = np.rint(scaled)
    elif rounding != "truncate":
        raise ValueError(f"rounding must be 'truncate' or 'round', got {rounding!r}")
    return scaled.astype(np.uint8)


class _Quantized:
    """`to_uint8` applied to each batch of an iterable source (keeps its length for the progress log)."""

    def __init__(self, source: Iterable[np.ndarray], rounding: str):
        self.source, self.rounding = source, rounding

    def __len__(self) -> int:
        return len(self.source)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (to_uint8(batch, self.rounding) for batch in self.source)


def _quantized(images: ImageSource, rounding: str | None) -> ImageSource:
    if rounding is None:
        return images
    if isinstance(images, np.ndarray):
        return to_uint8(images, rounding)
    return _Quantized(images, rounding)


def _metrics(real: Statistics, fake: Statistics, kid_subsets: int, kid_subset_size: int, seed: int) -> dict:
    out = {"fid": fid_from_statistics(real, fake), "num_real": real.num_images, "num_fake": fake.num_images}
    if real.features is not None and fake.features is not None:
        values = kid_subset_values(real.features, fake.features, kid_subsets, kid_subset_size, seed)
        out.update(
            kid_mean=float(values.mean()),
            kid_std=float(values.std()),
            kid_subset_size=min(kid_subset_size, len(real.features), len(fake.features)),
            kid_subsets=kid_subsets,
        )
    return out


def protocol_test_vs_test(
    features_fn: Callable[[ImageSource], np.ndarray],
    real_images: ImageSource,
    fake_images: ImageSource,
    *,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
    quantize: bool = True,
) -> dict:
    """Co-Evolution / SRPKD protocol: real test images of the target domain vs the translations of the
    source domain's test images. Returns {"fid", "kid_mean", "kid_std", "kid_subset_size",
    "kid_subsets", "num_real", "num_fake"}.

    features_fn: e.g. an `InceptionFeatures`. quantize: measure the 8-bit images the reference saves
    and reads (fakes truncated as `tensor2im`, float reals rounded back to their file pixels).
    """
    real = statistics(features_fn(_quantized(real_images, "round" if quantize else None)), keep_features=True)
    fake = statistics(
        features_fn(_quantized(fake_images, "truncate" if quantize else None)), keep_features=True
    )
    return _metrics(real, fake, kid_subsets, kid_subset_size, seed)


def reference_statistics(
    features_fn: Callable[[ImageSource], np.ndarray],
    real_images: ImageSource,
    *,
    keep_features: bool = False,
    quantize: bool = True,
    path: str | os.PathLike | None = None,
) -> Statistics:
    """GAN Compression's real statistics (`get_real_stat.py`) of the images of a chosen split.

    quantize: truncate float images as get_real_stat.py does (`tensor2im`). keep_features: store the
    features too, so that KID can be computed against them. path: also save them as .npz.
    """
    stats = statistics(features_fn(_quantized(real_images, "truncate" if quantize else None)), keep_features)
    if path is not None:
        save_statistics(path, stats)
    return stats


def protocol_gan_compression(
    features_fn: Callable[[ImageSource], np.ndarray],
    fake_images: ImageSource,
    reference: Statistics | str | os.PathLike,
    *,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
    quantize: bool = True,
) -> dict:
    """GAN Compression protocol: translations vs saved real statistics (`Statistics` or .npz path).

    Returns {"fid", "num_real", "num_fake"} plus the KID entries when the reference kept features.
    """
    real = reference if isinstance(reference, Statistics) else load_statistics(reference)
    fake = statistics(
        features_fn(_quantized(fake_images, "truncate" if quantize else None)), keep_features=True
    )
    return _metrics(real, fake, kid_subsets, kid_subset_size, seed)


# ----------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ganjax.evaluation.fid",
        description="FID/KID between two image folders, or a folder and saved statistics (.npz), with "
        "pytorch-fid's Inception. Prints the metrics as JSON.",
    )
    p.add_argument(
        "--weights",
        required=True,
        help=f"{inception.FID_WEIGHTS_FILENAME} (from {inception.FID_WEIGHTS_URL}) or its converted .npz",
    )
    p.add_argument(
        "--cache", default=None, help="where to cache the converted weights (default: beside --weights)"
    )
    p.add_argument("--real", required=True, help="folder of real images, or statistics .npz")
    p.add_argument("--fake", default=None, help="folder of generated images, or statistics .npz")
    p.add_argument("--out", default=None, help="save the statistics of the --real folder to this .npz")
    p.add_argument("--keep_features", action="store_true", help="with --out: store the features (for KID)")
    p.add_argument("--metrics_json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE)
    p.add_argument("--kid_subsets", type=int, default=KID_SUBSETS)
    p.add_argument("--kid_subset_size", type=int, default=KID_SUBSET_SIZE)
    p.add_argument("--seed", type=int, default=0, help="KID subset sampling seed")
    p.add_argument("--precision", choices=("highest", "default"), default="highest")
    return p


def main(argv: list[str] | None = None) -> dict:
    """The command line; returns the metrics (empty when only --out statistics were computed)."""
    args = _parser().parse_args(argv)
    if args.fake is None and args.out is None:
        raise SystemExit("nothing to do: give --fake (metrics) and/or --out (statistics of --real)")
    if args.out is not None and args.real.endswith(".npz"):
        raise SystemExit("--out saves the statistics of a --real folder, but --real is already an .npz")
    model = inception.FIDInceptionV3(precision=args.precision)
    extractor = None

    def stats_of(path: str, keep: bool) -> Statistics:
        nonlocal extractor
        if path.endswith(".npz"):
            return load_statistics(path)
        if extractor is None:
            variables = inception_weights.load_variables(args.weights, args.cache, model)
            extractor = InceptionFeatures(variables, batch_size=args.batch_size, model=model)
        folder = ImageFolder(path, extractor.batch_size)
        return statistics(extractor(folder, name=path), keep_features=keep)

    real = stats_of(args.real, keep=args.fake is not None or args.keep_features)
    if args.out is not None:
        to_save = real if args.keep_features else dataclasses.replace(real, features=None)
        save_statistics(args.out, to_save)
        logging.info("FID: saved the statistics of %s to %s", args.real, args.out)
    metrics = {}
    if args.fake is not None:
        fake = stats_of(args.fake, keep=True)
        metrics = _metrics(real, fake, args.kid_subsets, args.kid_subset_size, args.seed)
        metrics.update(real=args.real, fake=args.fake)
        print(json.dumps(metrics), file=sys.stdout, flush=True)
        if args.metrics_json is not None:
            with open(args.metrics_json, "w") as f:
                json.dump(metrics, f, indent=2)
    return metrics


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    main()
