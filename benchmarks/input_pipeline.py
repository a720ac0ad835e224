"""Throughput of the paired grain input pipeline (pix2pix's), for benchmarks/run.py.

The built-in synthetic scenes are built at `load_size` px (as the image-folder builders store images at
the reference's load size, 286 for 256 px crops) with a few scenes in a temporary data_dir, then read by
`ganjax.data.translation_pipeline.make_paired_iterator` exactly as training reads them: PNG decode of
both images, a random crop_size crop and flip shared by the pair, batching and the float32 [-1, 1]
conversion, in the main process (num_workers 0) or in grain worker processes. The scenes repeat (the
iterator is infinite), so a few of them measure the steady state of an epoch of any length.

Reported per worker count: examples (pairs) per second over `batches` batches after the first (which
includes starting the workers, reported separately as startup_s), and the build time of the scenes.
"""

from __future__ import annotations

import time

import ml_collections

from ganjax.data import image_folders, translation_pipeline


def data_config(data_dir: str, *, crop_size: int, load_size: int, num_images: int, num_workers: int):
    """A paired synthetic-scenes data config (the keys of configs/pix2pix_cityscapes.py's data block)."""
    config = ml_collections.ConfigDict()
    config.name = "synthetic_scenes"
    config.dataset = ""
    config.data_dir = data_dir
    config.load_size = load_size
    config.crop_size = crop_size
    config.flip = True
    config.direction = "AtoB"
    config.num_workers = num_workers
    config.synthetic = ml_collections.ConfigDict()
    config.synthetic.size = load_size
    config.synthetic.num_train = max(2, num_images)
    config.synthetic.num_test = 1
    config.synthetic.domain_a = "label_image"
    config.synthetic.domain_b = "photo_a"
    return config


def prepare(data_dir: str, *, crop_size: int, load_size: int, num_images: int) -> float:
    """Builds the scenes (once per data_dir); returns the seconds it took."""
    t0 = time.perf_counter()
    image_folders.prepare_translation(
        data_config(data_dir, crop_size=crop_size, load_size=load_size, num_images=num_images, num_workers=0)
    )
    return time.perf_counter() - t0


def measure(
    data_dir: str,
    *,
    crop_size: int,
    load_size: int,
    num_images: int,
    batch_size: int,
    batches: int,
    num_workers: int,
) -> dict:
    """One row: examples/s of the paired pipeline with `num_workers` workers (see the module docstring)."""
    config = data_config(
        data_dir, crop_size=crop_size, load_size=load_size, num_images=num_images, num_workers=num_workers
    )
    t0 = time.perf_counter()
    iterator = translation_pipeline.make_paired_iterator(config, global_batch_size=batch_size, seed=0)
    try:
        first = next(iterator)
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(batches):
            batch = next(iterator)
        seconds = time.perf_counter() - t0
    finally:
        close = getattr(iterator, "close", None)
        if callable(close):
            close()
    shape = tuple(batch["a"].shape) if batches else tuple(first["a"].shape)
    return {
        "num_workers": num_workers,
        "crop_size": crop_size,
        "load_size": load_size,
        "batch_size": batch_size,
        "batches": batches,
        "batch_shape": list(shape),
        "startup_s": startup,
        "seconds": seconds,
        "examples_per_s": batches * batch_size / seconds if seconds > 0 else None,
    }
