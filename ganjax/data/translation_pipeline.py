"""grain input pipelines for image-to-image translation (pix2pix paired, CycleGAN unpaired).

Every entry point calls `prepare_translation(data_config)` first, so a fresh machine builds the
built-in synthetic scenes on first use (image folders need their local copy; see image_folders).
Config keys are documented in `ganjax.data.image_folders.make_translation_builder`.

What "A" and "B" are, per dataset (before `data.direction = "BtoA"` swaps them):
  synthetic_scenes   the features data.synthetic.domain_a / domain_b of the same scene ("photo_a",
                     "photo_b" or "label_image"); unpaired training takes A from even and B from odd
                     train scenes, so no pair ever meets in a batch; the test split keeps the pairs
  aligned_folders    the left (A) and right (B) halves of each AB image; unpaired: even / odd records
  unaligned_folders  the trainA / trainB (testA / testB) folders; paired iteration is refused

Train preprocessing is the reference's `--preprocess resize_and_crop`: resize to load_size (already
done at build time for image folders), a uniform random crop_size crop and a horizontal flip with
probability 1/2 (data.flip) - the same window and flip for A and B of a pair, independent ones for
unpaired A and B. Test preprocessing resizes straight to crop_size (bicubic), no flip.
Images leave here as float32 in [-1, 1], shape (N, crop_size, crop_size, 3).
"""

from __future__ import annotations

import functools

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from ganjax.data.image_folders import prepare_translation
from ganjax.data.pipeline import ignore_interrupts
from ganjax.data.prepare import log_report

DIRECTIONS = ("AtoB", "BtoA")
SYNTHETIC_DOMAINS = ("photo_a", "photo_b", "label_image")
_STYLE_OF_FEATURE = {"photo_a": "A", "photo_b": "B"}


# ---- Config helpers -------------------------------------------------------------------------------


def _synthetic_domains(data_config) -> tuple[str, str]:
    s = data_config.get("synthetic") or {}
    domains = (str(s.get("domain_a", "photo_a")), str(s.get("domain_b", "photo_b")))
    for key, value in zip(("domain_a", "domain_b"), domains, strict=True):
        if value not in SYNTHETIC_DOMAINS:
            raise ValueError(f"config.data.synthetic.{key} = {value!r} is not one of {SYNTHETIC_DOMAINS}.")
    return domains


def _swap(data_config) -> bool:
    direction = data_config.get("direction", "AtoB")
    if direction not in DIRECTIONS:
        raise ValueError(f"config.data.direction = {direction!r} is not one of {DIRECTIONS}.")
    return direction == "BtoA"


def _sizes(data_config) -> tuple[int, int]:
    load, crop = int(data_config.load_size), int(data_config.crop_size)
    if not 0 < crop <= load:
        raise ValueError(f"config.data.crop_size = {crop} must be in [1, load_size = {load}].")
    return load, crop


def target_style(data_config) -> str | None:
    """The synthetic-scenes style ("A"/"B") of the generator's output domain, None if not a photo.

    That is the style to pass to `ganjax.evaluation.scene_labels.label_accuracy` for generated images.
    """
    if data_config.name != "synthetic_scenes":
        return None
    domain_a, domain_b = _synthetic_domains(data_config)
    return _STYLE_OF_FEATURE.get(domain_a if _swap(data_config) else domain_b)


def _derived_seed(*parts: int) -> int:
    """A 32-bit seed from integers (grain seeds must fit in uint32)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _data_source(builder: tfds.core.DatasetBuilder, split: str, keep: set[str]):
    """Random-access records of `split`; image features outside `keep` stay undecoded (bytes)."""
    features = builder.info.features
    skip = {k: tfds.decode.SkipDecoding() for k in features.keys() if k not in keep and k != "index"}
    return builder.as_data_source(split, decoders=skip)


# ---- Per-example transforms (module level: grain pickles them into workers) ---------------------


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3), PIL bicubic (the reference's transforms.Resize)."""
    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def _crop_flip(image: np.ndarray, top: int, left: int, crop: int, flip: bool) -> np.ndarray:
    out = image[top : top + crop, left : left + crop]
    return np.ascontiguousarray(out[:, ::-1] if flip else out)


def _random_window(rng: np.random.Generator, load: int, crop: int, flip: bool) -> tuple[int, int, bool]:
    """The reference's get_params: x, y uniform in [0, load - crop], flip with probability 1/2."""
    top, left = (int(v) for v in rng.integers(0, load - crop + 1, size=2))
    return top, left, bool(flip and rng.random() < 0.5)


def _paired_example(record, rng, *, keys: tuple[str, str], load: int, crop: int, flip: bool) -> dict:
    """A record -> {"a", "b"}: uint8 (crop, crop, 3), the SAME window and flip for both."""
    top, left, do_flip = _random_window(rng, load, crop, flip)
    a, b = (_crop_flip(resize_image(record[k], load), top, left, crop, do_flip) for k in keys)
    return {"a": a, "b": b}


def _single_example(record, rng, *, key: str, load: int, crop: int, flip: bool) -> np.ndarray:
    """A record -> uint8 (crop, crop, 3) with its own random window and flip."""
    top, left, do_flip = _random_window(rng, load, crop, flip)
    return _crop_flip(resize_image(record[key], load), top, left, crop, do_flip)


def _zip_pair(pair) -> dict:
    return {"a": pair[0], "b": pair[1]}


def _to_model(batch: dict, *, swap: bool) -> dict:
    """uint8 batch -> float32 in [-1, 1]; "a" is always the generator's input domain."""
    a, b = (batch["b"], batch["a"]) if swap else (batch["a"], batch["b"])
    return {"a": a.astype(np.float32) / 127.5 - 1.0, "b": b.astype(np.float32) / 127.5 - 1.0}


def _own_arrays(batch: dict) -> dict:
    return {k: np.array(v) for k, v in batch.items()}


# ---- Train iterators -------------------------------------------------------------------------------


def _check_sharding(global_batch_size: int, process_index: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by {process_count} processes"
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return global_batch_size // process_count


def _shard(source, process_index: int, process_count: int, what: str) -> grain.MapDataset:
    if len(source) < process_count:
        raise ValueError(f"{len(source)} {what} records cannot be sharded over {process_count} processes")
    return grain.MapDataset.source(source)[process_index::process_count]


def _finish(ds: grain.MapDataset, data_config, local_batch: int) -> grain.DatasetIterator:
    """Element dataset of uint8 {"a", "b"} -> iterator of float32 batches (optionally multiprocess)."""
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2 * local_batch)
    ds = ds.to_iter_dataset(read).batch(local_batch, drop_remainder=True)
    ds = ds.map(functools.partial(_to_model, swap=_swap(data_config)))
    num_workers = int(data_config.get("num_workers", 0))
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags
            flags.FLAGS.mark_as_parsed()
        options = grain.MultiprocessingOptions(num_workers=num_workers)
        ds = ds.mp_prefetch(options, worker_init_fn=ignore_interrupts)
        # Workers hand over shared-memory arrays; copy them so no caller manages their lifetime.
        ds = ds.map(_own_arrays)
    return iter(ds)


def paired_dataset(data_config, *, seed: int, process_index: int = 0, process_count: int = 1):
    """The infinite, per-example MapDataset behind `make_paired_iterator`: uint8 {"a", "b"}, A/B unswapped."""
    if data_config.name == "unaligned_folders":
        raise ValueError(
            "unaligned_folders (trainA/trainB) has no pairs: use make_unpaired_iterator, or an aligned "
            "dataset (aligned_folders, synthetic_scenes) for pix2pix."
        )
    load, crop = _sizes(data_config)
    builder, report = prepare_translation(data_config)
    log_report(builder, report)
    keys = (
        _synthetic_domains(data_config) if data_config.name == "synthetic_scenes" else ("image_a", "image_b")
    )
    ds = _shard(_data_source(builder, "train", set(keys)), process_index, process_count, "train")
    ds = ds.shuffle(seed=_derived_seed(seed, 0)).repeat()  # repeat() reshuffles every epoch
    transform = functools.partial(
        _paired_example, keys=keys, load=load, crop=crop, flip=bool(data_config.get("flip", True))
    )
    return ds.random_map(transform, seed=_derived_seed(seed, 1, process_index))


def unpaired_dataset(data_config, *, seed: int, process_index: int = 0, process_count: int = 1):
    """The infinite, per-example MapDataset behind `make_unpaired_iterator`: uint8 {"a", "b"}, unswapped.

    A and B come from disjoint record sets (different folders, or even / odd records of a paired
    dataset), each shuffled with its own seed and cropped / flipped independently.
    """
    load, crop = _sizes(data_config)
    builder, report = prepare_translation(data_config)
    log_report(builder, report)
    if data_config.name == "unaligned_folders":
        sources = [_data_source(builder, split, {"image"}) for split in ("trainA", "trainB")]
        sources = [_shard(src, process_index, process_count, "train") for src in sources]
        keys = ("image", "image")
    else:
        keys = (
            _synthetic_domains(data_config)
            if data_config.name == "synthetic_scenes"
            else ("image_a", "image_b")
        )
        source = _data_source(builder, "train", set(keys))
        if len(source) < 2 * process_count:
            raise ValueError(
                f"{len(source)} train records cannot be split into A/B over {process_count} processes"
            )
        # Even records give A, odd records give B: a scene's A and B never both appear.
        halves = (grain.MapDataset.source(source)[0::2], grain.MapDataset.source(source)[1::2])
        sources = [half[process_index::process_count] for half in halves]
    streams = []
    for domain, (ds, key) in enumerate(zip(sources, keys, strict=True)):
        ds = ds.shuffle(seed=_derived_seed(seed, 0, domain)).repeat()
        transform = functools.partial(
            _single_example, key=key, load=load, crop=crop, flip=bool(data_config.get("flip", True))
        )
        streams.append(ds.random_map(transform, seed=_derived_seed(seed, 1, domain, process_index)))
    return grain.experimental.ZipMapDataset(streams).map(_zip_pair)


def make_paired_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Infinite iterator of paired train batches for this process (pix2pix).

    Yields {"a": float32 (B, C, C, 3), "b": float32 (B, C, C, 3)} in [-1, 1], C = crop_size,
    B = global_batch_size // process_count; "a" is the generator's input (data.direction). A and B
    share the crop window and flip. Each process reads the disjoint record shard
    process_index::process_count; every epoch is reshuffled. Deterministic given the arguments;
    `get_state()` is a JSON-serialisable dict and `set_state(state)` reproduces the next batch (restore
    with the num_workers it was saved with). Call `close()` when done.
    """
    local_batch = _check_sharding(global_batch_size, process_index, process_count)
    ds = paired_dataset(data_config, seed=seed, process_index=process_index, process_count=process_count)
    return _finish(ds, data_config, local_batch)


def make_unpaired_iterator(
    data_config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Infinite iterator of unpaired train batches for this process (CycleGAN; the reference's unaligned
    dataset). Same output, sharding, determinism and state as `make_paired_iterator`, but A and B are
    drawn independently (see `unpaired_dataset`)."""
    local_batch = _check_sharding(global_batch_size, process_index, process_count)
    ds = unpaired_dataset(data_config, seed=seed, process_index=process_index, process_count=process_count)
    return _finish(ds, data_config, local_batch)


def epoch_size(data_config, *, paired: bool) -> int:
    """Train examples per epoch: the pair count, or max(|A|, |B|) for unpaired data as the reference."""
    builder, _ = prepare_translation(data_config)
    splits = builder.info.splits
    if data_config.name == "unaligned_folders":
        return max(splits["trainA"].num_examples, splits["trainB"].num_examples)
    n = splits["train"].num_examples
    return n if paired else (n + 1) // 2


# ---- Test set --------------------------------------------------------------------------------------


def _read_split(builder, split: str, keys: set[str], max_examples: int | None) -> list[dict]:
    """Records 0..n-1 of `split` (record i has index i: the builders store them in index order)."""
    source = _data_source(builder, split, keys)
    n = len(source) if max_examples is None else min(len(source), int(max_examples))
    records = [source[i] for i in range(n)]
    if any(int(r["index"]) != i for i, r in enumerate(records)):
        raise RuntimeError(f"{builder.name} {split}: records are not in index order; rebuild the dataset.")
    return records


def _stack(records: list[dict], key: str, crop: int) -> np.ndarray:
    out = np.zeros((len(records), crop, crop, 3), np.float32)
    for i, r in enumerate(records):
        out[i] = resize_image(r[key], crop).astype(np.float32) / 127.5 - 1.0
    return out


def eval_split_name(data_config, builder) -> str:
    """The split `load_test_set` reads for paired data: "test", or for aligned folders data.test_split
    ("" = "test" if it exists, else "val")."""
    if data_config.name != "aligned_folders":
        return "test"
    chosen = data_config.get("test_split", "") or ("test" if "test" in builder.info.splits else "val")
    if chosen not in builder.info.splits:
        raise ValueError(f"config.data.test_split = {chosen!r}; the dataset has {list(builder.info.splits)}.")
    return chosen


def load_test_set(data_config: ml_collections.ConfigDict, max_examples: int | None = None) -> dict:
    """The test images in index order, preprocessed as the reference's test mode.

    Returns "a", "b": float32 (N, C, C, 3) in [-1, 1], resized straight to crop_size (bicubic), no flip,
    "a" the generator's input (data.direction); "index_a", "index_b": int64 record indices. Paired
    datasets (synthetic scenes, aligned folders) also give "index" (N,) and a[i], b[i] are a true pair;
    synthetic scenes also give "labels": uint8 (N, C, C) class ids (nearest-resized), for the
    FCN-score analogue. Unaligned folders give testA and testB, whose sizes differ, unpaired.
    `max_examples` caps each domain.
    """
    _, crop = _sizes(data_config)
    builder, _ = prepare_translation(data_config)
    out: dict[str, np.ndarray] = {}
    if data_config.name == "unaligned_folders":
        for domain, split in (("a", "testA"), ("b", "testB")):
            records = _read_split(builder, split, {"image"}, max_examples)
            out[domain] = _stack(records, "image", crop)
            out[f"index_{domain}"] = np.array([r["index"] for r in records], np.int64)
    else:
        keys = (
            _synthetic_domains(data_config)
            if data_config.name == "synthetic_scenes"
            else ("image_a", "image_b")
        )
        synthetic = data_config.name == "synthetic_scenes"
        wanted = set(keys) | ({"labels"} if synthetic else set())
        records = _read_split(builder, eval_split_name(data_config, builder), wanted, max_examples)
        out["a"], out["b"] = _stack(records, keys[0], crop), _stack(records, keys[1], crop)
        out["index"] = np.array([r["index"] for r in records], np.int64)
        out["index_a"], out["index_b"] = out["index"], out["index"]
        if synthetic:
            labels = np.zeros((len(records), crop, crop), np.uint8)
            for i, r in enumerate(records):
                lab = np.asarray(r["labels"], np.uint8)
                if lab.shape != (crop, crop):
                    lab = np.asarray(Image.fromarray(lab).resize((crop, crop), Image.Resampling.NEAREST))
                labels[i] = lab
            out["labels"] = labels
    if _swap(data_config):
        out["a"], out["b"] = out["b"], out["a"]
        out["index_a"], out["index_b"] = out["index_b"], out["index_a"]
    return out
