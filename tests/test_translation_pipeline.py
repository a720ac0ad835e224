"""Translation input pipelines: paired / unpaired train iterators, test sets, state, sharding."""

import hashlib
import json
import multiprocessing
import os
import signal

import ml_collections
import numpy as np
import pytest
from PIL import Image

from ganjax.data import synthetic_scenes as ss
from ganjax.data import translation_pipeline as tp
from ganjax.evaluation import scene_labels

SYN_SIZE, SYN_TRAIN, SYN_TEST = 32, 16, 6
AL_LOAD, AL_TRAIN = 12, 8


def _config(**kw) -> ml_collections.ConfigDict:
    base = {
        "name": "synthetic_scenes",
        "data_dir": "",
        "manual_dir": "",
        "dataset": "",
        "load_size": SYN_SIZE,
        "crop_size": SYN_SIZE,
        "flip": False,
        "direction": "AtoB",
        "num_workers": 0,
        "test_split": "",
        "synthetic": {
            "size": SYN_SIZE,
            "num_train": SYN_TRAIN,
            "num_test": SYN_TEST,
            "domain_a": "photo_a",
            "domain_b": "photo_b",
        },
    }
    synthetic = {**base["synthetic"], **kw.pop("synthetic", {})}
    return ml_collections.ConfigDict({**base, **kw, "synthetic": synthetic})


def _random_rgb(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def aligned_root(tmp_path_factory):
    """facades/{train,val}: AB images whose A and B halves are the same random picture."""
    root = tmp_path_factory.mktemp("src") / "facades"
    for split, n, offset in (("train", AL_TRAIN, 0), ("val", 3, 100)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            half = _random_rgb(offset + i, AL_LOAD)
            Image.fromarray(np.concatenate([half, half], axis=1)).save(root / split / f"{i:03d}.png")
    return str(root)


@pytest.fixture(scope="module")
def unaligned_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("src") / "apple2orange"
    for split, n, offset in (("trainA", 5, 0), ("trainB", 3, 100), ("testA", 2, 200), ("testB", 3, 300)):
        (root / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(_random_rgb(offset + i, AL_LOAD)).save(root / split / f"{i:03d}.png")
    return str(root)


def _aligned(data_dir, root, **kw):
    kw.setdefault("crop_size", AL_LOAD)
    return _config(
        name="aligned_folders", data_dir=data_dir, manual_dir=root, dataset="facades", load_size=AL_LOAD, **kw
    )


def _unaligned(data_dir, root, **kw):
    kw.setdefault("crop_size", AL_LOAD)
    return _config(
        name="unaligned_folders",
        data_dir=data_dir,
        manual_dir=root,
        dataset="apple2orange",
        load_size=AL_LOAD,
        **kw,
    )


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def _to_uint8(batch: np.ndarray) -> np.ndarray:
    return np.rint((batch + 1.0) * 127.5).astype(np.uint8)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


# ---- Paired -----------------------------------------------------------------------------------------


def test_paired_batches_shapes_and_ranges(data_dir):
    config = _config(data_dir=data_dir, load_size=36, crop_size=SYN_SIZE, flip=True)
    config.synthetic.domain_a = "label_image"
    it = tp.make_paired_iterator(config, global_batch_size=4, seed=0)
    for batch in _take(it, 3):
        assert set(batch) == {"a", "b"}
        for x in batch.values():
            assert x.shape == (4, SYN_SIZE, SYN_SIZE, 3) and x.dtype == np.float32
            assert -1.0 <= x.min() and x.max() <= 1.0
    it.close()


def test_paired_crops_share_window_and_flip(data_dir, aligned_root):
    config = _aligned(data_dir, aligned_root, crop_size=8, flip=True)
    # Every possible (record, window, flip) crop of the stored images, to identify what came out.
    source = tp.prepare_translation(config)[0].as_data_source("train")
    stored = [source[i]["image_a"] for i in range(AL_TRAIN)]
    crops = {}
    for r, image in enumerate(stored):
        for top in range(AL_LOAD - 8 + 1):
            for left in range(AL_LOAD - 8 + 1):
                window = image[top : top + 8, left : left + 8]
                crops.setdefault(_digest(window), (r, top, left, False))
                crops.setdefault(_digest(window[:, ::-1]), (r, top, left, True))
    it = tp.make_paired_iterator(config, global_batch_size=4, seed=3)
    seen = []
    for batch in _take(it, 6):
        np.testing.assert_array_equal(batch["a"], batch["b"])  # same picture, so same window => equal
        seen += [crops[_digest(x)] for x in _to_uint8(batch["a"])]
    it.close()
    assert {flip for *_, flip in seen} == {False, True}
    assert len({(top, left) for _, top, left, _ in seen}) > 5  # the window moves


def test_paired_refuses_unaligned_folders(data_dir, unaligned_root):
    with pytest.raises(ValueError, match="no pairs"):
        tp.make_paired_iterator(_unaligned(data_dir, unaligned_root), global_batch_size=2, seed=0)


# ---- Unpaired ---------------------------------------------------------------------------------------


def test_unpaired_synthetic_takes_a_and_b_from_different_scenes(data_dir):
    scenes = [ss.render_scene(ss.scene_seed("train", i), SYN_SIZE) for i in range(SYN_TRAIN)]
    which_a = {_digest(s["photo_a"]): i for i, s in enumerate(scenes)}
    which_b = {_digest(s["photo_b"]): i for i, s in enumerate(scenes)}
    it = tp.make_unpaired_iterator(_config(data_dir=data_dir), global_batch_size=4, seed=0)
    pairs = []
    for batch in _take(it, 8):  # 32 examples: four epochs of each 8-scene half
        ia = [which_a[_digest(x)] for x in _to_uint8(batch["a"])]
        ib = [which_b[_digest(x)] for x in _to_uint8(batch["b"])]
        pairs += list(zip(ia, ib, strict=True))
    it.close()
    assert all(a % 2 == 0 and b % 2 == 1 for a, b in pairs)  # A from even scenes, B from odd ones
    assert {a for a, _ in pairs} == set(range(0, SYN_TRAIN, 2))
    assert {b for _, b in pairs} == set(range(1, SYN_TRAIN, 2))
    # Independent shuffles: a given A image meets different B images across epochs.
    partners = {}
    for a, b in pairs:
        partners.setdefault(a, set()).add(b)
    assert max(len(v) for v in partners.values()) > 1


def test_unpaired_folders_read_train_a_and_train_b(data_dir, unaligned_root):
    def images(split):
        folder = f"{unaligned_root}/{split}"
        n = {"trainA": 5, "trainB": 3}[split]
        return {_digest(np.asarray(Image.open(f"{folder}/{i:03d}.png"))) for i in range(n)}

    for direction, (first, second) in (("AtoB", ("trainA", "trainB")), ("BtoA", ("trainB", "trainA"))):
        config = _unaligned(data_dir, unaligned_root, direction=direction)
        it = tp.make_unpaired_iterator(config, global_batch_size=3, seed=1)
        batches = _take(it, 4)
        it.close()
        assert {_digest(x) for b in batches for x in _to_uint8(b["a"])} == images(first)
        assert {_digest(x) for b in batches for x in _to_uint8(b["b"])} == images(second)


# ---- Determinism, state, sharding ----------------------------------------------------------------


@pytest.mark.parametrize("paired", [True, False])
def test_state_round_trip_reproduces_next_batch(data_dir, aligned_root, paired):
    make = tp.make_paired_iterator if paired else tp.make_unpaired_iterator
    config = _aligned(data_dir, aligned_root, crop_size=8, flip=True)
    it = make(config, global_batch_size=2, seed=5)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    expected = _take(it, 2)
    it.set_state(state)
    for want, got in zip(expected, _take(it, 2), strict=True):
        np.testing.assert_array_equal(want["a"], got["a"])
        np.testing.assert_array_equal(want["b"], got["b"])
    fresh = make(config, global_batch_size=2, seed=5)  # a restarted job
    fresh.set_state(state)
    np.testing.assert_array_equal(next(fresh)["a"], expected[0]["a"])
    other_seed = make(config, global_batch_size=2, seed=6)
    assert not np.array_equal(next(other_seed)["a"], next(make(config, global_batch_size=2, seed=5))["a"])
    for i in (it, fresh, other_seed):
        i.close()


def test_process_shards_are_disjoint_and_epochs_reshuffle(data_dir, aligned_root):
    config = _aligned(data_dir, aligned_root, crop_size=AL_LOAD, flip=False)  # elements = stored images
    epochs = {}
    for p in range(2):
        it = tp.make_paired_iterator(config, global_batch_size=8, seed=0, process_index=p, process_count=2)
        epochs[p] = [[_digest(x) for x in _to_uint8(next(it)["a"])] for _ in range(3)]  # 4 = one shard epoch
        it.close()
    shard0, shard1 = set(epochs[0][0]), set(epochs[1][0])
    assert len(shard0) == len(shard1) == AL_TRAIN // 2 and not shard0 & shard1
    for p in range(2):
        assert all(set(e) == set(epochs[p][0]) for e in epochs[p])  # each epoch is a permutation
        assert len({tuple(e) for e in epochs[p]}) > 1  # ... reshuffled between epochs
    with pytest.raises(ValueError, match="divisible"):
        tp.make_paired_iterator(config, global_batch_size=3, seed=0, process_index=0, process_count=2)


def test_worker_processes_give_the_same_stream(data_dir):
    config = _config(data_dir=data_dir, load_size=36, flip=True)
    in_process = tp.make_paired_iterator(config, global_batch_size=4, seed=2)
    expected = _take(in_process, 3)
    in_process.close()
    config.num_workers = 1
    it = tp.make_paired_iterator(config, global_batch_size=4, seed=2)
    np.testing.assert_array_equal(next(it)["a"], expected[0]["a"])
    # A terminal's Ctrl-C reaches the workers too; they leave it to the trainer (which saves, then closes
    # them) instead of dying under the iterator.
    workers = [p for p in multiprocessing.active_children() if p.name.startswith("grain")]
    assert workers
    for worker in workers:
        os.kill(worker.pid, signal.SIGINT)
    state = json.loads(json.dumps(it.get_state()))
    np.testing.assert_array_equal(next(it)["b"], expected[1]["b"])
    it.set_state(state)
    np.testing.assert_array_equal(next(it)["b"], expected[1]["b"])
    it.close()


# ---- Test sets --------------------------------------------------------------------------------------


def test_synthetic_test_set_holds_true_translations(data_dir):
    config = _config(data_dir=data_dir)
    test = tp.load_test_set(config)
    assert test["a"].shape == (SYN_TEST, SYN_SIZE, SYN_SIZE, 3) and test["a"].dtype == np.float32
    np.testing.assert_array_equal(test["index"], np.arange(SYN_TEST))
    for i in range(SYN_TEST):
        scene = ss.render_scene(ss.scene_seed("test", i), SYN_SIZE)
        np.testing.assert_array_equal(_to_uint8(test["a"][i]), scene["photo_a"])
        np.testing.assert_array_equal(_to_uint8(test["b"][i]), scene["photo_b"])
        np.testing.assert_array_equal(test["labels"][i], scene["labels"])
    # The ground-truth translations score high on the FCN-score analogue, in the target's style.
    assert tp.target_style(config) == "B"
    assert scene_labels.label_accuracy(test["b"], test["labels"], "B")["pixel_accuracy"] > 0.9

    swapped = tp.load_test_set(_config(data_dir=data_dir, direction="BtoA"), max_examples=2)
    np.testing.assert_array_equal(swapped["a"], test["b"][:2])
    np.testing.assert_array_equal(swapped["b"], test["a"][:2])
    assert tp.target_style(_config(direction="BtoA")) == "A"
    assert tp.target_style(_config(synthetic={"domain_a": "label_image", "domain_b": "photo_a"})) == "A"
    assert tp.target_style(_config(synthetic={"domain_a": "label_image"}, direction="BtoA")) is None


def test_synthetic_test_set_resizes_to_crop_size(data_dir):
    test = tp.load_test_set(_config(data_dir=data_dir, load_size=20, crop_size=16), max_examples=3)
    assert test["a"].shape == (3, 16, 16, 3) and test["labels"].shape == (3, 16, 16)
    scene = ss.render_scene(ss.scene_seed("test", 0), SYN_SIZE)
    want = np.asarray(Image.fromarray(scene["photo_a"]).resize((16, 16), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(_to_uint8(test["a"][0]), want)
    nearest = np.asarray(Image.fromarray(scene["labels"]).resize((16, 16), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(test["labels"][0], nearest)


def test_folder_test_sets(data_dir, aligned_root, unaligned_root):
    aligned = tp.load_test_set(_aligned(data_dir, aligned_root, crop_size=8))  # no test/: reads val/
    assert aligned["a"].shape == (3, 8, 8, 3) and "labels" not in aligned
    np.testing.assert_array_equal(aligned["a"], aligned["b"])
    want = np.asarray(Image.fromarray(_random_rgb(100, AL_LOAD)).resize((8, 8), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(_to_uint8(aligned["a"][0]), want)
    with pytest.raises(ValueError, match="test_split"):
        tp.load_test_set(_aligned(data_dir, aligned_root, crop_size=8, test_split="test"))

    unaligned = tp.load_test_set(_unaligned(data_dir, unaligned_root, crop_size=AL_LOAD))
    assert unaligned["a"].shape[0] == 2 and unaligned["b"].shape[0] == 3
    np.testing.assert_array_equal(unaligned["index_b"], np.arange(3))
    np.testing.assert_array_equal(_to_uint8(unaligned["b"][1]), _random_rgb(301, AL_LOAD))
    assert tp.epoch_size(_unaligned(data_dir, unaligned_root), paired=False) == 5
