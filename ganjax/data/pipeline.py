"""grain input pipelines over the face datasets: an infinite shuffled train stream and eval arrays.

Both entry points call `prepare(data_config)` first, so a fresh machine builds the built-in
synthetic dataset on first use (UTKFace needs its local folder; see ganjax.data.utkface).

Images leave here as float32 in [-1, 1], shape (N, S, S, 3) with S = data_config.size; ages as
float32 years.
"""

from __future__ import annotations

import functools
import io
import signal

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from ganjax.data.prepare import log_report, prepare


def to_model_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (size, size, 3) in [-1, 1], resized (LANCZOS) if H, W != size."""
    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.LANCZOS))
    return image.astype(np.float32) / 127.5 - 1.0


def _train_example(record: dict, rng: np.random.Generator, *, size: int, flip: bool) -> dict:
    """One decoded record -> {"image": (S, S, 3) float32, "age": () float32}."""
    image = to_model_image(record["image"], size)
    if flip and rng.random() < 0.5:
        image = image[:, ::-1]
    return {"image": np.ascontiguousarray(image), "age": np.float32(record["age"])}


def _own_arrays(batch: dict) -> dict:
    return {k: np.array(v) for k, v in batch.items()}


def ignore_interrupts(worker_index: int, worker_count: int) -> None:
    """grain worker init: a terminal's Ctrl-C reaches the whole process group, but only the trainer
    should act on it (finish the step, save, then close these workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _derived_seed(*parts: int) -> int:
    """A 32-bit seed from integers (grain seeds must fit in uint32)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def make_train_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Infinite iterator of train batches for this process.

    Yields {"image": float32 (B, S, S, 3) in [-1, 1], "age": float32 (B,)} with
    B = global_batch_size // process_count. Each process reads the disjoint shard of records
    process_index::process_count; every epoch of the shard is shuffled afresh; flips (when
    data_config.flip) are seeded by (seed, process_index). Deterministic given the arguments;
    `get_state()` is a JSON-serialisable dict and `set_state(state)` reproduces the next batch.

    data_config.num_workers > 0 decodes in that many worker processes. Each worker batches its own
    slice, so the stream (and the state's layout) depends on num_workers: restore a state with the
    num_workers it was saved with. Call `it.close()` when done, and drop the iterator before the
    interpreter exits (grain's finalizers complain at shutdown otherwise).
    """
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by {process_count} processes"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    local_batch = global_batch_size // process_count
    builder, report = prepare(data_config)
    log_report(builder, report)
    source = builder.as_data_source("train")
    if len(source) < process_count:
        raise ValueError(f"{len(source)} train records cannot be sharded over {process_count}")

    ds = grain.MapDataset.source(source)[process_index::process_count]
    ds = ds.shuffle(seed=_derived_seed(seed, 0)).repeat()  # repeat() reshuffles every epoch
    transform = functools.partial(_train_example, size=int(data_config.size), flip=data_config.flip)
    ds = ds.random_map(transform, seed=_derived_seed(seed, 1, process_index))
    # A small read-ahead: decoding is cheap and the buffer holds decoded float images.
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2 * local_batch)
    ds = ds.to_iter_dataset(read).batch(local_batch, drop_remainder=True)
    if data_config.num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags
            flags.FLAGS.mark_as_parsed()
        options = grain.MultiprocessingOptions(num_workers=data_config.num_workers)
        ds = ds.mp_prefetch(options, worker_init_fn=ignore_interrupts)
        # Workers hand over shared-memory arrays; copy them into ordinary arrays so no caller has
        # to manage shared-memory lifetimes (~1 MB per batch, negligible).
        ds = ds.map(_own_arrays)
    return iter(ds)


def load_eval_set(
    data_config: ml_collections.ConfigDict, split: str = "test", max_examples: int | None = None
) -> dict[str, np.ndarray]:
    """The first `max_examples` records of `split` in index order, as arrays.

    Returns image float32 (N, S, S, 3) in [-1, 1], age float32 (N,), identity int64 (N,) (-1 where
    the dataset has no identities, e.g. UTKFace) and index int64 (N,).
    """
    builder, _ = prepare(data_config)
    # Read the labels of every record without decoding images, then decode only the chosen ones.
    source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    records = [source[i] for i in range(len(source))]
    records.sort(key=lambda r: int(r["index"]))
    records = records[:max_examples] if max_examples is not None else records
    size = int(data_config.size)
    images = np.zeros((len(records), size, size, 3), np.float32)
    for i, r in enumerate(records):
        decoded = np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"))
        images[i] = to_model_image(decoded, size)
    return {
        "image": images,
        "age": np.array([r["age"] for r in records], np.float32),
        "identity": np.array([r.get("identity", -1) for r in records], np.int64),
        "index": np.array([r["index"] for r in records], np.int64),
    }
